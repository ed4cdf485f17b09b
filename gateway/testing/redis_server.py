"""A real ``redis-server`` for the tests and the benchmark, on a unix socket in a temp dir.

The call-state store's Redis side is tested against the real server, never a mock: this
starts one (no persistence, no TCP port, a socket only its owner may open) and stops it.
Nothing is installed here: ``scripts/test`` installs Debian's ``redis-server``; elsewhere it is
found on ``PATH`` or at ``REDIS_SERVER``, and when it is missing :class:`RedisMissing`
says how to get one (a test that needs it fails with that message: it is never skipped).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["INSTALL_HINT", "RedisMissing", "RedisServer", "find_redis_server"]

INSTALL_HINT = (
    "redis-server not found: the Redis tests run a real one. Install it "
    "(Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`) "
    "or set REDIS_SERVER to its path. .ci/run installs it on CI."
)
START_LIMIT_S = 10.0


class RedisMissing(RuntimeError):
    """No ``redis-server`` executable on this machine."""


def find_redis_server() -> str:
    """The ``redis-server`` to run: ``REDIS_SERVER``, else the one on ``PATH``."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not found or not Path(found).is_file():
        raise RedisMissing(INSTALL_HINT)
    return found


def _pong(path: str) -> bool:
    """Whether a server answers PING on the unix socket at ``path`` (RESP, by hand: no
    client needed to know the server is up)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process: ``with RedisServer() as server: server.url``.

    It listens on ``<tmp>/redis.sock`` only (``port 0``), keeps nothing on disk, and is
    stopped (SIGTERM, then SIGKILL) when the block ends.
    """

    def __init__(self) -> None:
        self._dir = Path()
        self.socket_path = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` that reaches it."""
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        executable = find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))  # short: sun_path holds 107
        self.socket_path = str(self._dir / "redis.sock")
        argv = [
            executable,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_LIMIT_S
        while not _pong(self.socket_path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = self._dir / "redis.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start: {detail}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.socket_path:
            shutil.rmtree(self._dir, ignore_errors=True)
            self.socket_path = ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
