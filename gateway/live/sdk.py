"""Every private name of google-genai (and of the websocket under it) the gateway uses.

One module, one reason each, checked at start by `probe()` (logged once, exported as a
metric; tests/test_sdk_paths.py fails if a fast path silently falls back). pyproject.toml
caps google-genai to the versions the tests ran on.

* ``AsyncSession._ws`` (the websockets client connection): caller audio is written as the
  wire JSON directly, because ``send_realtime_input`` spends ~80 µs of pydantic per
  message, fifty times a second per call; raw frames are read so that messages carrying
  nothing but model audio skip the SDK's models (~90 µs each, 25 a second per reply); and
  the connection is pinged now and then: any pong, however late, is a sign of life
  (`gateway.live.liveness`), and a prompt one measures the round trip, which places
  resumption handles (`gateway.live.machine`); when it is a :class:`TimedSocket`, its
  handshake's end times the setup's round trip (:func:`setup_round_trip`), each message
  is stamped with when it reached the socket (:func:`received_at`), and a write returns once
  the transport has handed it on.
* ``google.genai._live_converters._LiveServerMessage_from_mldev`` and, on Vertex AI,
  ``_LiveServerMessage_from_vertex`` (which also renames Vertex's usage fields): the SDK's
  own wire to model converters, for every message that is not audio only (the public
  ``receive()`` calls them too, after reading the socket itself).
* ``LiveServerMessage._from_response``: the SDK's own model construction from it.
* ``BaseApiClient._ensure_websocket_ssl_ctx``: the SDK's filter of ``async_client_args`` for
  websockets' ``connect``, to check at start that the options the gateway gives the Live
  socket (keepalive off, compression) reach it (:func:`passes_socket_args`).

Without them everything goes through the public API: slower, handles are placed with the
default round trip (more input is replayed twice at a reset, none is lost), and a stalled
connection is noticed only when its socket fails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, overload

import orjson
from google.genai import _api_client, _live_converters, errors, types
from google.genai.live import AsyncSession
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, Frame
from websockets.protocol import Event
from websockets.typing import Data

from gateway.live.liveness import UNACKED_S

log = logging.getLogger(__name__)

INPUT_RATE = 16000
INPUT_MIME = f"audio/pcm;rate={INPUT_RATE}"


@dataclass(frozen=True)
class SdkPaths:
    """Which fast paths work with the installed SDK."""

    socket: bool  # AsyncSession keeps its websocket in `_ws`
    converter: bool  # _LiveServerMessage_from_mldev + LiveServerMessage._from_response work
    vertex_converter: bool = False  # _LiveServerMessage_from_vertex too

    @property
    def fast(self) -> bool:
        """Every fast path works, on both backends."""
        return self.socket and self.converter and self.vertex_converter

    def fast_on(self, vertex: bool) -> bool:
        """The fast receive path works on this backend."""
        return self.socket and (self.vertex_converter if vertex else self.converter)

    def describe(self) -> str:
        if self.fast:
            return "fast (direct socket writes, audio-only messages decoded without the SDK)"
        missing = [
            name
            for name, ok in (
                ("AsyncSession._ws", self.socket),
                ("converter", self.converter),
                ("Vertex converter", self.vertex_converter),
            )
            if not ok
        ]
        return "public SDK API (missing: " + ", ".join(missing) + ")"


class _Client:
    vertexai = False


def probe() -> SdkPaths:
    """Check every private name against a dummy session and sample messages."""
    marker = object()
    try:
        session = AsyncSession(api_client=_Client(), websocket=marker)  # type: ignore[arg-type]
        socket = getattr(session, "_ws", None) is marker
    except Exception:
        socket = False
    return SdkPaths(
        socket=socket,
        converter=_converts("_LiveServerMessage_from_mldev", "responseTokenCount"),
        vertex_converter=_converts("_LiveServerMessage_from_vertex", "candidatesTokenCount"),
    )


def _converts(name: str, output_tokens: str) -> bool:
    """The SDK's converter `name` turns a sample message (with usage as that backend words
    it) into the model the public ``receive()`` returns."""
    try:
        convert = getattr(_live_converters, name, None)
        if convert is None:
            return False
        sample = {
            "serverContent": {"turnComplete": True},
            "sessionResumptionUpdate": {
                "newHandle": "h",
                "resumable": True,
                "lastConsumedClientMessageIndex": "7",
            },
            "usageMetadata": {"promptTokenCount": 3, output_tokens: 5},
        }
        message = types.LiveServerMessage._from_response(response=convert(sample), kwargs={})
        update = message.session_resumption_update
        usage = message.usage_metadata
        return (
            message.server_content is not None
            and message.server_content.turn_complete is True
            and update is not None
            and update.new_handle == "h"
            and update.last_consumed_client_message_index == 7
            and usage is not None
            and usage.response_token_count == 5
        )
    except Exception:
        return False


_PATHS: SdkPaths | None = None


def paths() -> SdkPaths:
    global _PATHS
    if _PATHS is None:
        _PATHS = probe()
        log.info("google-genai live path: %s", _PATHS.describe())
    return _PATHS


def audio_message(pcm16k: bytes) -> str:
    """The JSON `send_realtime_input(audio=Blob(pcm16k, INPUT_MIME))` writes, built directly.

    tests/test_bench.py checks the two agree.
    """
    data = base64.urlsafe_b64encode(pcm16k).decode("ascii")
    return f'{{"realtime_input":{{"audio":{{"data":"{data}","mime_type":"{INPUT_MIME}"}}}}}}'


async def write_audio(session: AsyncSession, pcm16k: bytes) -> None:
    """Write caller audio to a Live connection, as send_realtime_input would, only cheaper."""
    if not paths().socket:
        await session.send_realtime_input(audio=types.Blob(data=pcm16k, mime_type=INPUT_MIME))
        return
    await session._ws.send(audio_message(pcm16k))


async def ping(session: AsyncSession) -> asyncio.Future[float] | None:
    """Send a WebSocket ping; its pong completes the future with the round trip in seconds
    (None without the socket path, or if the ping could not be sent)."""
    if not paths().socket:
        return None
    try:
        pong = await session._ws.ping()
    except Exception:
        return None
    return pong if isinstance(pong, asyncio.Future) else None


class TimedSocket(ClientConnection):
    """websockets' client connection, timing what placing resumption handles needs (passed
    as ``create_connection``, websockets' own hook):

    * ``opened_at``: when its opening handshake completed. The SDK sends the setup right
      after, so from then to ``connect()``'s return is the setup's round trip alone.
    * ``received_at``: when the message ``recv()`` returned last reached the connection:
      the bytes that completed it were handed to it (``data_received``, as the event loop
      read the socket), not when a reader got to it. A reader late by tens of ms (a busy
      event loop, a backlog of model audio) would place a handle that late, taking input
      written after the service issued the handle as held by it.
    * Its transport pauses writing while it holds anything: websockets' ``send`` then returns
      only once the transport holds nothing of the message (flow control: ``drain`` waits
      for ``resume_writing``), so input stamped written when ``send`` returns has been
      handed to the kernel, not left waiting in the process. (Under TLS the TCP transport
      below is not visible from here: it passes bytes on at once unless the kernel's send
      buffer is full, and then pauses the TLS layer past its high-water mark.)

    Its socket gives up on what the service's side leaves unacknowledged for ``UNACKED_S``
    (``TCP_USER_TIMEOUT``): a dead path (`gateway.live.liveness`).
    """

    opened_at: float | None = None
    received_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):  # a dead path: Linux
            with contextlib.suppress(OSError):  # not TCP (a test's Unix socket): no such bound
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(UNACKED_S * 1e3))
        self._read_at = time.monotonic()
        self._arrivals: deque[float] = deque()  # completed messages not yet returned
        # Paused from the first byte held (asyncio's TLS layer, which pauses at a high-water
        # mark reached rather than passed, would never resume with 0), resumed when empty.
        self.transport.set_write_buffer_limits(high=1, low=0)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        self.opened_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self._read_at = time.monotonic()
        super().data_received(data)

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.fin and event.opcode in DATA_OPCODES:
            self._arrivals.append(self._read_at)  # a message is complete: queued for recv
        super().process_event(event)

    @overload
    async def recv(self, decode: Literal[True]) -> str: ...

    @overload
    async def recv(self, decode: Literal[False]) -> bytes: ...

    @overload
    async def recv(self, decode: bool | None = None) -> Data: ...

    async def recv(self, decode: bool | None = None) -> Data:
        message = await super().recv(decode)
        if self._arrivals:
            self.received_at = self._arrivals.popleft()
        return message


def received_at(session: AsyncSession) -> float | None:
    """When the message the session's socket returned last reached it (None: not a
    :class:`TimedSocket`, or nothing received yet)."""
    socket = getattr(session, "_ws", None) if paths().socket else None
    at = getattr(socket, "received_at", None)
    return at if isinstance(at, float) else None


def setup_round_trip(session: AsyncSession, began: float, now: float) -> float:
    """How long the setup took to be answered, ``connect()`` having begun at ``began`` and
    returned at ``now``: from the handshake's end on a :class:`TimedSocket`, else the whole
    ``connect()`` (its TCP, TLS and WebSocket handshakes too: a looser bound)."""
    socket = getattr(session, "_ws", None) if paths().socket else None
    opened = getattr(socket, "opened_at", None)
    return now - (opened if isinstance(opened, float) and opened >= began else began)


def passes_socket_args(args: dict[str, Any]) -> bool:
    """Whether the SDK hands these ``HttpOptions.async_client_args`` on to websockets'
    ``connect`` as they are (google-genai 1.23 on keeps those that ``connect`` takes)."""
    try:
        options = types.HttpOptions(async_client_args=args)
        passed = _api_client.BaseApiClient._ensure_websocket_ssl_ctx(options)
    except Exception:
        return False
    return all(key in passed and passed[key] == value for key, value in args.items())


async def receive(session: AsyncSession) -> AsyncIterator[types.LiveServerMessage | list[bytes]]:
    """A connection's messages until it ends, as ``session.receive()`` parses them, except that
    a message carrying nothing but model audio comes as its decoded PCM chunks."""
    vertex = bool(getattr(getattr(session, "_api_client", None), "vertexai", False))
    if not paths().fast_on(vertex):
        while True:
            async for message in session.receive():
                yield message
    ws = session._ws
    converter = (
        _live_converters._LiveServerMessage_from_vertex
        if vertex
        else _live_converters._LiveServerMessage_from_mldev
    )
    while True:
        try:
            raw = await ws.recv(decode=False)
        except ConnectionClosed as exc:  # as the SDK reports it
            code = exc.rcvd.code if exc.rcvd else 1006
            reason = exc.rcvd.reason if exc.rcvd else "Abnormal closure."
            errors.APIError.raise_error(code, reason, None)
        try:  # orjson: a model audio message parses in 7 µs instead of json's 18
            response: dict[str, Any] = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise ValueError("Failed to parse response") from None  # as the SDK raises it
        audio = _audio_only(response)
        if audio is not None:
            yield audio
            continue
        converted = converter(response)
        if not converted and response:
            errors.APIError.raise_error(response.get("code", 500), response, None)
        yield types.LiveServerMessage._from_response(response=converted, kwargs={})


def _audio_only(message: dict[str, Any]) -> list[bytes] | None:
    """The PCM chunks of ``{"serverContent": {"modelTurn": {"parts": [{"inlineData": ...}]}}}``
    (audio parts only, nothing else in the message); None for any other message."""
    if type(message) is not dict or len(message) != 1:
        return None
    content = message.get("serverContent")
    if type(content) is not dict or len(content) != 1:
        return None
    turn = content.get("modelTurn")
    if type(turn) is not dict or not turn.keys() <= {"parts", "role"}:
        return None
    parts = turn.get("parts")
    if type(parts) is not list or not parts:
        return None
    audio = []
    for part in parts:
        blob = part.get("inlineData") if type(part) is dict and len(part) == 1 else None
        if type(blob) is not dict or not str(blob.get("mimeType", "")).startswith("audio/"):
            return None
        data = blob.get("data")
        if type(data) is not str:
            return None
        if "-" in data or "_" in data:  # URL-safe alphabet
            audio.append(base64.urlsafe_b64decode(data))
        else:
            audio.append(binascii.a2b_base64(data))
    return [pcm for pcm in audio if pcm]
