"""Twilio caller simulator: plays Twilio's side of one call against a real gateway.

It is written independently of ``gateway.twilio`` on purpose, so that tests built on it check
the gateway's protocol code instead of agreeing with it by construction.

What it does, like Twilio does for an inbound call answered with ``<Connect><Stream>``:

* POSTs the signed voice webhook and reads the TwiML;
* opens the signed Media Streams WebSocket, sends ``connected`` and ``start``;
* sends the caller's audio as 20 ms ``media`` frames on an absolute real-time schedule;
* plays the gateway's outbound audio at real time (a virtual playout clock, no busy loop),
  echoes ``mark`` once the audio queued before it has played, and on ``clear`` drops the
  unplayed audio and echoes the pending marks at once;
* validates every message from the gateway and records bad ones as ``protocol_error``;
* when the gateway closes the stream while the call is up and the ``<Connect>`` has an
  ``action``, requests that URL (signed, with the call's standard parameters, ``CallStatus``
  ``in-progress``) and runs the TwiML it gets: a new ``<Connect><Stream>`` opens a new stream
  for the same CallSid (a new StreamSid; the caller's audio meanwhile reaches no one and is
  kept in ``unsent_ulaw``), anything else (``<Response/>``, ``<Hangup/>``) ends the call.
  Twilio documents that it resumes the TwiML only after the server closes the WebSocket; what
  it does after a connection lost without a close frame (a crashed server) is not documented:
  ``action_after_abnormal_close`` says whether the simulator goes on to the action then,
  or the call stays in progress with no stream until a REST redirect (``redirect``) or a
  hang-up;
* posts a ``<Stream statusCallback>`` (signed) on ``stream-started``, ``stream-stopped``
  and, for a stream lost without a close frame (1006), ``stream-error``: before it goes on
  to the action, or ``stream_status_delay_s`` after the stream's end, on its own (Twilio
  does not say which comes first);
* spreads its requests over several gateway base URLs, round robin, as a load balancer
  in front of replicas would.

``speed`` compresses time (2.0 sends and plays twice as fast) so tests stay short.
Many simulators can share one event loop: each call costs one reader task, one player task
that wakes once per outbound chunk, and one timer wake per 20 ms frame it sends.

Usage::

    sim = TwilioCallerSimulator(http, "http://127.0.0.1:8080", "https://gw.example.com", token)
    async with await sim.place_call() as call:
        await call.speak_tone(440, 1.0)
        await call.wait_heard(lambda r: len(r.heard_pcm()) >= 8000, timeout=10)

Each open call holds one connection of ``http``'s connector: for more than 100 concurrent
calls, give the session ``aiohttp.TCPConnector(limit=0)``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import socket
import time
import warnings
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import cycle
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import numpy as np
import numpy.typing as npt
from twilio.request_validator import RequestValidator
from yarl import URL

with warnings.catch_warnings():  # stdlib audioop warns on 3.11/3.12; audioop-lts on 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "CallRecord",
    "CallRejected",
    "ConnectTwiml",
    "HeardAudio",
    "SimulatedCall",
    "StreamRejected",
    "TwilioCallerSimulator",
    "dominant_frequency",
    "tone_ulaw",
]

SAMPLE_RATE = 8000
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law: what Twilio sends per media message
FRAME_SECONDS = FRAME_BYTES / SAMPLE_RATE
ULAW_SILENCE = 0xFF
DTMF_DIGITS = frozenset("0123456789*#")
OUTBOUND_EVENTS = frozenset({"media", "mark", "clear"})


class CallRejected(Exception):
    """The webhook did not answer with a ``<Connect><Stream>`` (non-200, ``<Reject>``, junk)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"call rejected: HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class StreamRejected(CallRejected):
    """The TwiML was fine but the WebSocket upgrade failed (e.g. 403 on a bad signature)."""


@dataclass(frozen=True)
class HeardAudio:
    """One outbound media chunk the caller played (cut short if a clear interrupted it)."""

    at: float  # time.monotonic() when it started playing
    ulaw: bytes


@dataclass
class CallRecord:
    """Everything that happened on one simulated call, for assertions."""

    twiml: str = ""
    stream_url: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sent_ulaw: bytearray = field(default_factory=bytearray)
    heard: list[HeardAudio] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)
    call_sid: str = ""
    account_sid: str = ""
    params: dict[str, str] = field(default_factory=dict)  # the call's standard parameters
    stream_sid: str = ""  # the newest stream's
    streams: list[str] = field(default_factory=list)  # every StreamSid of the call, in order
    # Caller audio said while no stream was open (between a stream's end and the next one).
    unsent_ulaw: bytearray = field(default_factory=bytearray)
    # Requests the simulator made after answering: (kind, URL path, form, HTTP status).
    callbacks: list[tuple[str, str, dict[str, str], int]] = field(default_factory=list)
    speed: float = 1.0
    closed_by: str | None = None  # the newest stream's: "gateway" or "caller"

    def event(self, kind: str, detail: str = "") -> None:
        self.events.append((time.monotonic(), kind, detail))

    @property
    def protocol_errors(self) -> list[str]:
        return [detail for _, kind, detail in self.events if kind == "protocol_error"]

    @property
    def marks_received(self) -> list[str]:
        return [detail for _, kind, detail in self.events if kind == "mark_rx"]

    def heard_pcm(self) -> npt.NDArray[np.int16]:
        """All heard audio as 8 kHz int16, with silence where playback paused between chunks.

        Positions come from the play times (scaled by ``speed``), so the result is the caller's
        timeline from the first heard sample on.
        """
        if not self.heard:
            return np.zeros(0, dtype=np.int16)
        per_second = SAMPLE_RATE * self.speed
        t0 = self.heard[0].at
        parts: list[npt.NDArray[np.int16]] = []
        cursor = 0
        for chunk in self.heard:
            pos = round((chunk.at - t0) * per_second)
            if pos > cursor + 1:  # a real gap, not float jitter between back-to-back chunks
                parts.append(np.zeros(pos - cursor, dtype=np.int16))
                cursor = pos
            parts.append(np.frombuffer(audioop.ulaw2lin(chunk.ulaw, 2), dtype=np.int16))
            cursor += len(chunk.ulaw)
        return np.concatenate(parts)


def tone_ulaw(
    freq_hz: float, duration_s: float, amplitude: float = 0.3, rate: int = SAMPLE_RATE
) -> bytes:
    """A sine tone as mu-law bytes (``amplitude`` is a fraction of full scale)."""
    n = round(duration_s * rate)
    t = np.arange(n, dtype=np.float64) / rate
    pcm = np.round(amplitude * 32767.0 * np.sin(2.0 * np.pi * freq_hz * t)).astype("<i2")
    return audioop.lin2ulaw(pcm.tobytes(), 2)


def dominant_frequency(pcm: npt.NDArray[Any], rate: int) -> float:
    """Frequency (Hz) of the strongest spectral peak; 0.0 for empty or silent input."""
    x = np.asarray(pcm, dtype=np.float64)
    if x.size < 4:
        return 0.0
    x = x - x.mean()
    if not np.any(x):
        return 0.0
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spectrum[1:])) + 1
    delta = 0.0
    if 1 <= k < spectrum.size - 1:  # parabolic interpolation on log magnitude
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
        denom = a - 2.0 * b + c
        if denom != 0.0:
            delta = float(0.5 * (a - c) / denom)
    return float((k + delta) * rate / x.size)


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class _Queued:
    arrival: float
    ulaw: bytes | None = None  # audio chunk, or
    mark: str | None = None  # a mark waiting behind the audio


class SimulatedCall:
    """One live call: caller audio out, gateway audio played back, marks echoed; its
    streams one after the other when a ``<Connect action>`` continues it."""

    def __init__(
        self,
        sim: TwilioCallerSimulator,
        record: CallRecord,
        params: Mapping[str, str],
        speed: float,
    ) -> None:
        self.record = record
        self._sim = sim
        self._params = dict(params)  # the call's standard parameters, as the webhook had them
        self._twiml = ConnectTwiml("")
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._speed = speed
        self._seq = 0
        self._chunk = 0
        self._send_lock = asyncio.Lock()
        self._audio_lock = asyncio.Lock()
        self._stream_t0 = time.monotonic()
        self._next_frame_at = 0.0
        self._last_ts = -FRAME_SECONDS * 1000
        # Playback state (virtual clock): what is queued, what plays now, when it ends.
        self._queue: deque[_Queued] = deque()
        self._pending_echo: deque[str] = deque()
        self._play_end = 0.0
        self._cur_start = 0.0
        self._playing = False  # heard[-1] is the chunk playing until _play_end
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._hung_up = False
        self._reader: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._late: set[asyncio.Task[None]] = set()  # status callbacks posted later

    @property
    def stream_sid(self) -> str:
        return self.record.stream_sid

    @property
    def closed(self) -> bool:
        """The call is over (not just a stream of it)."""
        return self._closed.is_set()

    @property
    def streaming(self) -> bool:
        """A stream of the call is open now."""
        return self._ws is not None and not self._ws.closed

    # ---- lifecycle -------------------------------------------------------------------------

    async def _start_stream(self, twiml: ConnectTwiml) -> None:
        """Open the stream ``twiml`` asks for and start it (raises StreamRejected)."""
        rec = self.record
        rec.stream_url = twiml.stream_url
        rec.custom_parameters = dict(twiml.parameters)
        if urlsplit(twiml.stream_url).scheme != "wss":
            rec.event("twiml_warning", "Twilio requires a wss:// stream url")
        if urlsplit(twiml.stream_url).query:
            rec.event("twiml_warning", "Twilio does not pass query strings on stream urls")
        ws = await self._sim._ws_connect(twiml.stream_url, rec)
        self._twiml = twiml
        self._ws = ws
        self._seq = 0
        self._chunk = 0
        self._last_ts = -FRAME_SECONDS * 1000
        rec.stream_sid = _sid("MZ")
        rec.streams.append(rec.stream_sid)
        rec.closed_by = rec.close_code = rec.close_reason = None
        await self._open()
        await self._stream_status("stream-started")

    async def _open(self) -> None:
        rec = self.record
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, seq=False)
        rec.event("connected_tx")
        await self._send(
            {
                "event": "start",
                "start": {
                    "accountSid": rec.account_sid,
                    "streamSid": rec.stream_sid,
                    "callSid": rec.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": dict(rec.custom_parameters),
                    "mediaFormat": {
                        "encoding": "audio/x-mulaw",
                        "sampleRate": SAMPLE_RATE,
                        "channels": 1,
                    },
                },
                "streamSid": rec.stream_sid,
            }
        )
        rec.event("start_tx", rec.stream_sid)
        self._stream_t0 = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name=f"twilio-sim-rx-{rec.call_sid}")
        if self._player is None:
            self._player = asyncio.create_task(
                self._play_loop(), name=f"twilio-sim-play-{rec.call_sid}"
            )

    async def hangup(self) -> None:
        """Caller hangs up: send ``stop``, close the socket, stop tasks. Idempotent."""
        if self._hung_up:
            return
        self._hung_up = True
        if self._ws is not None and not self._ws.closed:
            rec = self.record
            await self._send(
                {
                    "event": "stop",
                    "streamSid": rec.stream_sid,
                    "stop": {"accountSid": rec.account_sid, "callSid": rec.call_sid},
                }
            )
            rec.event("stop_tx")
            if self.record.closed_by is None:
                self.record.closed_by = "caller"
            try:
                await self._ws.close()
            except (aiohttp.ClientError, OSError) as exc:
                rec.event("close_error", repr(exc))
            rec.close_code = self._ws.close_code
        # asyncio.wait neither raises the tasks' errors nor swallows our own cancellation.
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=5.0)
            self._reader.cancel()
        if self._follower is not None:  # its status callback, or an action under way
            await asyncio.wait({self._follower}, timeout=5.0)
            self._follower.cancel()
        for late in self._late:  # not sent yet: the call is over
            late.cancel()
        if self._late:
            await asyncio.wait(self._late)
        self._mark_closed()
        if self._player is not None:
            self._player.cancel()
            await asyncio.wait({self._player})

    async def lose_stream(self) -> None:
        """The line between Twilio and the gateway breaks (a load balancer restarts, the
        network): the stream's connection ends with no close frame, seen so by both ends
        (a FIN, no WebSocket close); the call is still up, so the simulator goes on as for
        any stream lost (``stream-error``, then the action)."""
        if self._ws is None or self._ws.closed:
            return
        self.record.event("stream_lost_tx")
        sock = self._ws.get_extra_info("socket")
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)

    async def redirect(self, twiml: str) -> None:
        """Twilio's part of a REST redirect (a call update with ``Twiml``) of a call in
        progress with no stream: run the new TwiML (a ``<Connect><Stream>`` opens a new stream
        for the same CallSid; anything else ends the call). Redirecting a call while a stream
        runs is not played here (tests end that stream themselves)."""
        if self.streaming:
            raise RuntimeError("redirect while a stream runs: not simulated")
        if self.closed:
            return
        rec = self.record
        rec.event("redirected", twiml[:200])
        parsed = _parse_twiml(twiml, self._twiml.action)
        if parsed is None or not parsed.stream_url:
            self._mark_closed()
            return
        rec.twiml = twiml
        try:
            await self._start_stream(parsed)
        except (aiohttp.ClientError, OSError, CallRejected) as exc:
            rec.event("redirect_failed", repr(exc))
            self._mark_closed()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - shared interface
        """Wait until the stream is closed (by the gateway, or by ``hangup``)."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    async def wait_heard(
        self,
        predicate: Callable[[CallRecord], bool],
        timeout: float,  # noqa: ASYNC109 - part of the shared interface
    ) -> None:
        """Wait until ``predicate(record)`` holds; re-checked whenever the record changes.

        Raises ``TimeoutError`` on timeout, or as soon as the call closes without it holding.
        """
        async with asyncio.timeout(timeout):
            while not predicate(self.record):
                if self.closed:
                    raise TimeoutError("call closed before the predicate held")
                await self._changed.wait()

    async def __aenter__(self) -> SimulatedCall:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.hangup()

    # ---- caller -> gateway -----------------------------------------------------------------

    async def send_audio(self, ulaw: bytes) -> None:
        """Send mu-law as 20 ms ``media`` frames on an absolute schedule (no drift).

        A trailing partial frame is padded with silence, as Twilio only sends whole frames.
        Back-to-back calls continue one schedule; after an idle gap it restarts at now.
        Once the caller has hung up nothing is sent, but the audio's time still passes: a
        loop that talks until the call is closed must yield to the tasks that close it.
        """
        if not ulaw:
            return
        async with self._audio_lock:
            step = FRAME_SECONDS / self._speed
            now = time.monotonic()
            due = self._next_frame_at if self._next_frame_at > now - step else now
            end = due + step * -(-len(ulaw) // FRAME_BYTES)
            self.record.event("audio_tx", str(len(ulaw)))
            for off in range(0, len(ulaw), FRAME_BYTES):
                if self.closed or self._hung_up:
                    await asyncio.sleep(max(0.0, end - time.monotonic()))
                    return
                frame = ulaw[off : off + FRAME_BYTES]
                if len(frame) < FRAME_BYTES:
                    frame += bytes([ULAW_SILENCE]) * (FRAME_BYTES - len(frame))
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await self._send_media(frame, due):
                    if self.closed or self._hung_up:
                        await asyncio.sleep(max(0.0, end - time.monotonic()))
                        return
                    self.record.unsent_ulaw += frame  # between two streams: no one hears it
                due += step
                self._next_frame_at = due

    async def _send_media(self, frame: bytes, due: float) -> bool:
        # Twilio's timestamp is media time since the stream started; keep it monotonic.
        ts = max(round((due - self._stream_t0) * 1000 * self._speed), self._last_ts + 20)
        self._last_ts = ts
        self._chunk += 1
        ok = await self._send(
            {
                "event": "media",
                "streamSid": self.record.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(self._chunk),
                    "timestamp": str(int(ts)),
                    "payload": base64.b64encode(frame).decode("ascii"),
                },
            }
        )
        if ok:
            self.record.sent_ulaw += frame
        return ok

    async def speak_tone(self, freq_hz: float, duration_s: float, amplitude: float = 0.3) -> None:
        await self.send_audio(tone_ulaw(freq_hz, duration_s, amplitude))

    async def silence(self, duration_s: float) -> None:
        """Twilio keeps sending frames while the caller is quiet; so do we."""
        await self.send_audio(bytes([ULAW_SILENCE]) * round(duration_s * SAMPLE_RATE))

    async def send_dtmf(self, digit: str) -> None:
        if digit not in DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        await self._send(
            {
                "event": "dtmf",
                "streamSid": self.record.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )
        self.record.event("dtmf_tx", digit)

    async def _send(self, msg: dict[str, Any], *, seq: bool = True) -> bool:
        async with self._send_lock:
            return await self._send_locked(msg, seq=seq)

    async def _send_locked(self, msg: dict[str, Any], *, seq: bool = True) -> bool:
        # sequenceNumber is taken under the lock so wire order matches numbering.
        if self._ws is None or self._ws.closed:
            return False
        if seq:
            self._seq += 1
            msg = {"event": msg["event"], "sequenceNumber": str(self._seq), **msg}
        try:
            await self._ws.send_str(json.dumps(msg, separators=(",", ":")))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self.record.event("send_error", repr(exc))
            return False
        return True

    # ---- gateway -> caller -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        rec = self.record
        ws = self._ws
        assert ws is not None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self._protocol_error("binary frame")
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    if rec.closed_by is None:
                        rec.closed_by = "gateway"
                    rec.close_reason = msg.extra if isinstance(msg.extra, str) else None
                    break
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    rec.event("ws_error", repr(msg.data))
                    break
                else:  # CLOSING (our own close) or CLOSED (connection gone)
                    break
        except (aiohttp.ClientError, ConnectionError) as exc:
            rec.event("ws_error", repr(exc))
        finally:
            if rec.closed_by is None:
                rec.closed_by = "gateway"
            rec.close_code = ws.close_code
            self._stream_closed()

    def _stream_closed(self) -> None:
        """The stream is gone: what it had queued will not play; the call goes on to the
        ``<Connect action>`` if there is one (and the caller did not hang up)."""
        rec = self.record
        self._truncate_playing(time.monotonic())
        self._queue.clear()
        self._pending_echo.clear()
        rec.event("stream_closed", f"{rec.close_code} {rec.closed_by}")
        self._notify()
        if self.closed:
            return
        self._follower = asyncio.create_task(
            self._follow(), name=f"twilio-sim-follow-{rec.call_sid}"
        )

    async def _follow(self) -> None:
        """After a stream: its status callback, then the action's TwiML, or the call's end."""
        rec = self.record
        continued = False
        try:
            lost = rec.close_code in (None, 1006) and rec.closed_by == "gateway"
            event = "stream-error" if lost else "stream-stopped"
            delay = self._sim.stream_status_delay_s / self._speed
            if delay > 0:
                late = asyncio.create_task(self._stream_status(event, after_s=delay))
                self._late.add(late)
                late.add_done_callback(self._late.discard)
            else:
                await self._stream_status(event)
            action = self._twiml.action
            if lost and action and not self._sim.action_after_abnormal_close:
                rec.event("awaiting_redirect")  # in progress, no stream: REST may redirect it
                continued = True
                return
            if self._hung_up or not action:
                return
            form = {**self._params, "CallStatus": "in-progress"}
            status, body = await self._sim._post("action", self, action, form)
            if self._hung_up:
                return
            if status != 200:
                rec.event("action_failed", f"HTTP {status}")
                return
            twiml = _parse_twiml(body, self._twiml.action)
            if twiml is None or not twiml.stream_url:
                rec.event("action_ended_call", body[:200])
                return
            rec.twiml = body
            await self._start_stream(twiml)
            continued = True
        except (aiohttp.ClientError, OSError, CallRejected, RuntimeError) as exc:
            rec.event("action_failed", repr(exc))  # RuntimeError: the HTTP session closed
        finally:
            if not continued:
                self._mark_closed()

    async def _stream_status(self, event: str, after_s: float = 0.0) -> None:
        """The stream's ``statusCallback``, if its TwiML asked for one (``after_s`` later:
        about the stream as it is now, though another may have started meanwhile)."""
        twiml, rec, stream_sid = self._twiml, self.record, self.record.stream_sid
        if not twiml.status_callback:
            return
        if after_s:
            await asyncio.sleep(after_s)
        form = {
            "AccountSid": rec.account_sid,
            "CallSid": rec.call_sid,
            "StreamSid": stream_sid,
            "StreamName": twiml.stream_name or stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        if event == "stream-error":
            form["StreamError"] = f"connection lost ({rec.close_code})"
        try:
            await self._sim._post("status", self, twiml.status_callback, form)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            rec.event("status_callback_failed", repr(exc))

    def _mark_closed(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        self._truncate_playing(now)
        self._queue.clear()
        self.record.event("closed", f"{self.record.close_code} {self.record.closed_by}")
        self._closed.set()
        self._wake.set()
        self._notify()

    def _protocol_error(self, detail: str) -> None:
        self.record.event("protocol_error", detail)
        self._notify()

    async def _on_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self._protocol_error(f"invalid JSON: {data[:80]!r}")
            return
        if not isinstance(msg, dict):
            self._protocol_error(f"not a JSON object: {data[:80]!r}")
            return
        event = msg.get("event")
        if event not in OUTBOUND_EVENTS:
            self._protocol_error(f"unknown event {event!r}")
            return
        if msg.get("streamSid") != self.record.stream_sid:
            self._protocol_error(f"{event}: streamSid {msg.get('streamSid')!r} does not match")
            return
        now = time.monotonic()
        if event == "media":
            media = msg.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str):
                self._protocol_error("media: missing media.payload")
                return
            try:
                ulaw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                self._protocol_error("media: payload is not base64")
                return
            if not ulaw:
                self._protocol_error("media: empty payload")
                return
            self._queue.append(_Queued(now, ulaw=ulaw))
            self._wake.set()
        elif event == "mark":
            mark = msg.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str) or not name:
                self._protocol_error("mark: missing mark.name")
                return
            self.record.event("mark_rx", name)
            self._queue.append(_Queued(now, mark=name))
            self._wake.set()
        else:
            await self._on_clear(now)

    async def _on_clear(self, now: float) -> None:
        rec = self.record
        self._truncate_playing(now)
        dropped = 0
        for item in self._queue:
            if item.mark is not None:
                self._pending_echo.append(item.mark)
            elif item.ulaw is not None:
                dropped += len(item.ulaw)
        self._queue.clear()
        rec.clears.append(now)
        rec.event("clear", f"dropped {dropped} queued bytes")
        self._wake.set()
        self._notify()
        await self._flush_echoes()

    def _truncate_playing(self, now: float) -> None:
        """Cut the chunk now playing at ``now``: only what was played counts as heard."""
        if not self._playing:
            return
        self._playing = False
        if now >= self._play_end:
            return
        heard = self.record.heard
        last = heard[-1]
        played = max(0, int((now - self._cur_start) * SAMPLE_RATE * self._speed))
        if played:
            heard[-1] = HeardAudio(last.at, last.ulaw[:played])
        else:
            heard.pop()
        self._play_end = now

    async def _play_loop(self) -> None:
        """Advance the virtual playout clock; sleeps until the current chunk ends or a wake."""
        while not self.closed:
            self._wake.clear()
            self._advance(time.monotonic())
            if self._pending_echo:
                await self._flush_echoes()
                continue
            timeout = (self._play_end - time.monotonic()) if self._queue else None
            if timeout is not None and timeout <= 0:
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _advance(self, now: float) -> None:
        """Start every queued item whose turn has come by ``now`` (back-to-back, no drift)."""
        rec = self.record
        changed = False
        while self._queue:
            item = self._queue[0]
            start = max(self._play_end, item.arrival)
            if start > now:
                break
            self._queue.popleft()
            if item.ulaw is not None:
                if start > self._play_end:
                    rec.event("play_start")
                rec.heard.append(HeardAudio(start, item.ulaw))
                self._cur_start = start
                self._play_end = start + len(item.ulaw) / (SAMPLE_RATE * self._speed)
                self._playing = True
                changed = True
            elif item.mark is not None:
                self._pending_echo.append(item.mark)
        if changed:
            self._notify()

    async def _flush_echoes(self) -> None:
        """Echo pending marks in the order they became due (one sender keeps wire order)."""
        async with self._send_lock:
            while self._pending_echo:
                name = self._pending_echo.popleft()
                ok = await self._send_locked(
                    {
                        "event": "mark",
                        "streamSid": self.record.stream_sid,
                        "mark": {"name": name},
                    }
                )
                if ok:
                    self.record.marks_echoed.append((time.monotonic(), name))
                    self.record.event("mark_echo", name)
        self._notify()

    def _notify(self) -> None:
        """Wake ``wait_heard`` waiters: each holds the event that was current when it slept."""
        self._changed.set()
        self._changed = asyncio.Event()


class TwilioCallerSimulator:
    """Places simulated inbound calls the way Twilio does, against a gateway at ``base_url``
    (or several: each request goes to the next, round robin, as through a load balancer).

    ``action_after_abnormal_close``: whether a ``<Connect action>`` is requested after a
    stream was lost without a close frame (a crashed server). Twilio documents the action
    after "your server closes the WebSocket connection"; after a lost connection it does not
    say, so both are playable. ``stream_status_delay_s``: a stream's status callback comes
    that long after its end, on its own, instead of before the action (the order is not
    documented either).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str | Sequence[str],
        public_url: str,
        auth_token: str,
        *,
        speed: float = 1.0,
        account_sid: str | None = None,
        action_after_abnormal_close: bool = True,
        stream_status_delay_s: float = 0.0,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self._http = http
        self.set_bases(base_url)
        self._public_url = public_url.rstrip("/")
        self._validator = RequestValidator(auth_token)
        self._speed = speed
        self._account_sid = account_sid or _sid("AC")
        self.action_after_abnormal_close = action_after_abnormal_close
        self.stream_status_delay_s = stream_status_delay_s
        #: Every call placed, by CallSid, from before its stream opens: what Twilio's REST
        #: API acts on (a hang-up may come before ``place_call`` has returned).
        self.calls: dict[str, SimulatedCall] = {}

    def set_bases(self, base_url: str | Sequence[str]) -> None:
        """Where requests go from now on (a load balancer's endpoints changed: a replica
        draining is taken out of them)."""
        bases = [base_url] if isinstance(base_url, str) else list(base_url)
        if not bases:
            raise ValueError("base_url: at least one")
        self._bases = cycle([urlsplit(base) for base in bases])

    async def place_call(
        self,
        *,
        call_sid: str | None = None,
        from_: str = "+15005550006",
        to: str = "+15005550001",
        extra_params: Mapping[str, str] | None = None,
    ) -> SimulatedCall:
        """Run the voice webhook, then open and start the media stream."""
        answered = await self.answer(
            call_sid=call_sid, from_=from_, to=to, extra_params=extra_params
        )
        return await self.open_stream(answered)

    async def answer(
        self,
        *,
        call_sid: str | None = None,
        from_: str = "+15005550006",
        to: str = "+15005550001",
        extra_params: Mapping[str, str] | None = None,
    ) -> CallRecord:
        """Run the voice webhook only: the record holds the TwiML's stream URL and
        parameters, for :meth:`open_stream` (a burst answers every call first, then opens
        all their streams at once, as Twilio does for calls answered together)."""
        call_sid = call_sid or _sid("CA")
        rec = CallRecord(call_sid=call_sid, account_sid=self._account_sid, speed=self._speed)
        params = {
            "AccountSid": self._account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call_sid,
            "CallStatus": "ringing",
            "Called": to,
            "Caller": from_,
            "Direction": "inbound",
            "From": from_,
            "To": to,
            **(extra_params or {}),
        }
        rec.params = params
        webhook_url = self._public_url + "/twilio/voice"
        signature = self._validator.compute_signature(webhook_url, params)
        rec.event("webhook_tx", webhook_url)
        async with self._http.post(
            self._rewrite(webhook_url),
            data=params,
            headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
        ) as resp:
            body = await resp.text()
            status = resp.status
        rec.twiml = body
        rec.event("webhook_rx", str(status))
        if status != 200:
            raise CallRejected(status, body)
        twiml = _parse_twiml(body, webhook_url)
        if twiml is None or not twiml.stream_url:
            raise CallRejected(status, body)
        rec.stream_url = twiml.stream_url
        rec.custom_parameters = dict(twiml.parameters)
        return rec

    async def open_stream(self, rec: CallRecord) -> SimulatedCall:
        """Open and start the media stream of a call :meth:`answer` answered."""
        twiml = _parse_twiml(rec.twiml, self._public_url + "/twilio/voice")
        if twiml is None or not twiml.stream_url:
            raise CallRejected(200, rec.twiml)
        call = SimulatedCall(self, rec, rec.params, self._speed)
        self.calls[rec.call_sid] = call
        await call._start_stream(twiml)
        return call

    async def _ws_connect(
        self, stream_url: str, rec: CallRecord
    ) -> aiohttp.ClientWebSocketResponse:
        """The signed WebSocket upgrade for ``stream_url`` (StreamRejected if refused); the
        record's ``stream_tx`` event says which gateway base it went to."""
        signature = self._validator.compute_signature(stream_url, {})
        target = self._rewrite(stream_url, websocket=True)
        rec.event("stream_tx", target)
        try:
            return await self._http.ws_connect(
                URL(target, encoded=True),
                headers={"X-Twilio-Signature": signature},
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise StreamRejected(exc.status, exc.message) from exc

    async def _post(
        self, kind: str, call: SimulatedCall, url: str, form: dict[str, str]
    ) -> tuple[int, str]:
        """A signed callback of the call (its action, a status callback); recorded."""
        signature = self._validator.compute_signature(url, form)
        call.record.event(f"{kind}_tx", url)
        async with self._http.post(
            self._rewrite(url),
            data=form,
            # A callback after the stream is the call's last word to this gateway: its
            # connection is not kept alive (a test sees nothing of the call left behind).
            headers={
                "X-Twilio-Signature": signature,
                "User-Agent": "TwilioProxy/1.1",
                "Connection": "close",
            },
        ) as resp:
            body = await resp.text()
        call.record.callbacks.append((kind, urlsplit(url).path, form, resp.status))
        call.record.event(f"{kind}_rx", str(resp.status))
        return resp.status, body

    def _rewrite(self, public: str, *, websocket: bool = False) -> str:
        """Same path and query, but aimed at where a gateway actually listens (the next)."""
        parts = urlsplit(public)
        base = next(self._bases)
        scheme = base.scheme
        if websocket:
            scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
        return urlunsplit((scheme, base.netloc, parts.path, parts.query, ""))


@dataclass(frozen=True)
class ConnectTwiml:
    """What a ``<Response><Connect><Stream>`` asks of Twilio (URLs made absolute)."""

    stream_url: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    action: str = ""  # <Connect action>: requested when the stream ends
    status_callback: str = ""  # <Stream statusCallback>
    stream_name: str = ""


def _parse_twiml(twiml: str, document_url: str = "") -> ConnectTwiml | None:
    """The ``<Connect><Stream>`` of a TwiML document; ``ConnectTwiml("")`` for a valid
    document without one (``<Response/>``, ``<Hangup/>``: the call ends), None for junk."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return None
    if root.tag != "Response":
        return None
    connect = root.find("./Connect")
    stream = connect.find("./Stream") if connect is not None else None
    if connect is None or stream is None or not stream.get("url"):
        return ConnectTwiml("")
    params = {
        p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")
    }
    action = connect.get("action", "")
    callback = stream.get("statusCallback", "")
    return ConnectTwiml(
        stream_url=stream.get("url", ""),
        parameters=params,
        action=urljoin(document_url, action) if action else "",
        status_callback=urljoin(document_url, callback) if callback else "",
        stream_name=stream.get("name", ""),
    )
