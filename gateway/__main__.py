"""`python -m gateway` serves; `python -m gateway demo` runs a self-contained call;
`python -m gateway call --to +E164 [--persona NAME]` places an outbound call (gateway.outbound).

Serving starts once the backend's models API accepts the key and every model a persona uses;
a refusal stops the start with one line naming the setting, exit code 2 (gateway.live.models).

Serving drains gracefully: the first SIGTERM/SIGINT fails readiness and turns new
calls away while calls in progress go on (up to DRAIN_TIMEOUT, then they are closed),
and the process exits 0. A second signal ends the process at once with 128 + the
signal number (143 for SIGTERM, 130 for SIGINT), the shell's "killed by a signal":
calls still in progress were cut, which an exit 0 would hide.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from types import ModuleType

try:  # a dependency except on Windows; the bench's asyncio runs hide it (sys.modules)
    import uvloop as _uvloop

    UVLOOP: ModuleType | None = _uvloop
except ImportError:
    UVLOOP = None
from gateway.backend import Backend, resolve
from gateway.config import ConfigError, Settings, load_settings, required_settings
from gateway.listener import raise_open_file_limit
from gateway.live.models import BackendRefused
from gateway.logs import configure_logging
from gateway.personas import PersonaTable
from gateway.server import (
    STATE,
    create_app,
    listen_backlog,
    start_draining,
    start_server,
    wait_calls_done,
)
from gateway.transcript import check_directory

log = logging.getLogger("gateway")


async def serve(settings: Settings, personas: PersonaTable, backend: Backend) -> int:
    """Run the server until a signal, then drain."""
    check_open_files(settings)
    log.info("live backend: %s", backend.describe())
    app = create_app(settings, personas, backend=backend)
    # shutdown_timeout: what the calls left after the drain get to close, not the drain.
    try:
        runner = await start_server(
            app, settings.host, settings.port, handle_signals=False, shutdown_timeout=5.0
        )
    except OSError as exc:  # the port taken, the address not this host's, ...
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"gateway: cannot listen on {settings.host}:{settings.port}: {why}", file=sys.stderr)
        return 2
    backlog = listen_backlog(settings.max_calls)
    log.info("listening on %s:%d (backlog %d)", settings.host, settings.port, backlog)
    log.info("gc: %d objects of the started process frozen", freeze_startup_objects())

    loop = asyncio.get_running_loop()
    # Which loop the process serves on: uvloop is the measured fast path (docs/benchmarks.md).
    log.info("event loop: %s", loop_name(loop))
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("signal %d: draining", signum)
            start_draining(app)
            stop.set()
        else:
            calls = app[STATE].in_progress()
            log.warning("second signal %d: exiting now, cutting %s", signum, calls)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    all_done = await wait_calls_done(app, settings.drain_timeout)
    if not all_done:
        log.warning("drain timeout: closing %s still in progress", app[STATE].in_progress())
    await runner.cleanup()
    log.info("stopped")
    return 0


#: Descriptors a call holds: its Twilio stream, its Live connection (two while one replaces
#: the other), its transcript file.
FILES_PER_CALL = 4
#: Descriptors for everything else: probes, webhooks, idle clients, libraries.
FILES_RESERVE = 1024


def check_open_files(settings: Settings) -> None:
    """Raise the open-file limit to the hard limit, and say so; warn if it is still low.

    Past the limit the server can accept nothing, health probes included. Idle sockets
    are closed within seconds (HTTP_HEADER_TIMEOUT_S), but while they are held, each
    is a descriptor.
    """
    before, now, hard = raise_open_file_limit()
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if now != before:
        log.info("open-file limit %d (raised from %d; hard limit %s)", now, before, shown)
    else:
        log.info("open-file limit %d (hard limit %s)", now, shown)
    needed = settings.max_calls * FILES_PER_CALL + FILES_RESERVE
    if now != resource.RLIM_INFINITY and now < needed:
        log.warning(
            "open-file limit %d is low for MAX_CALLS=%d: raise the hard limit to at least %d "
            "(ulimit -n, LimitNOFILE, the container's nofile ulimit)",
            now,
            settings.max_calls,
            needed,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="required settings (environment variables, or keys in config/gateway.toml):\n  "
        + ", ".join(required_settings())
        + "\n  (Vertex AI instead of a key: GOOGLE_GENAI_USE_VERTEXAI=true, GOOGLE_CLOUD_PROJECT,"
        + " GOOGLE_CLOUD_LOCATION and Application Default Credentials)"
        + "\nevery setting, its default and meaning: docs/configuration.md",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the gateway (default)")
    demo = sub.add_parser("demo", help="a simulated call against the bundled emulator")
    demo.add_argument("--out", default="call.wav", help="where to write the stereo WAV")
    call = sub.add_parser("call", help="place an outbound call through Twilio to the gateway")
    call.add_argument("--to", required=True, help="number to call, E.164 (+15551234567)")
    call.add_argument("--persona", help="persona that speaks (default: the caller ID's)")
    call.add_argument("--from", dest="from_", help="caller ID (default: the persona's number)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        try:
            from gateway.demo import run_demo
        except ModuleNotFoundError as exc:  # a runtime-only install, such as the image
            print(
                f"gateway: the demo needs the test bed ({exc.name} is missing): "
                "pip install 'gateway[demo]'",
                file=sys.stderr,
            )
            return 2
        return asyncio.run(run_demo(out=args.out))

    if args.command == "call":  # Twilio's settings only
        from gateway.outbound import call_main

        return asyncio.run(call_main(args.to, args.persona, args.from_))
    try:
        settings = load_settings()
        personas = PersonaTable.from_settings(settings)  # the one table, checked at start
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if settings.transcript_dir is not None:
        try:
            check_directory(settings.transcript_dir)
        except OSError as exc:
            where = exc.filename or settings.transcript_dir
            why = f"{where}: {exc.strerror or exc}"
            print(f"gateway: invalid setting TRANSCRIPT_DIR: {why}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level, settings.log_format)
    try:  # the Live backend's credentials and the model's location, checked at start
        backend = resolve(settings, tuple(personas.models()))
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            return runner.run(serve(settings, personas, backend))
        except BackendRefused as exc:  # the key or a model, as the backend's models API says
            print(f"gateway: {exc}", file=sys.stderr)
            return 2


def freeze_startup_objects() -> int:
    """Move what the start built (modules, the SDK's and pydantic's types, the app: ~117k
    objects) out of the garbage collector's reach, and return how many.

    They live as long as the process, yet every full collection walked them all, holding the
    event loop ~40 ms on these machines, for every call at once; frozen, a collection walks
    only what calls have made since (gateway_gc_pause_seconds times each; docs/benchmarks.md
    has the figures).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency, except on Windows), else
    asyncio's.

    Measured with ``python -m bench --gateway-loop``: ~8% less CPU per call and about half
    the resident memory per call.
    """
    if UVLOOP is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = UVLOOP.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio _UnixSelectorEventLoop``: the loop's package and kind."""
    package = type(loop).__module__.partition(".")[0]
    if package == "uvloop" and UVLOOP is not None:
        return f"uvloop {UVLOOP.__version__}"
    return f"{package} {type(loop).__name__}"


if __name__ == "__main__":
    sys.exit(main())
