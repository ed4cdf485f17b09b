"""One Live conversation carried over as many connections as it takes.

A Live connection lives about ten minutes and can also die without warning.
`LiveSession` keeps the newest resumable handle, remembers which caller input
the model had when that handle was issued, and keeps everything sent since in
a bounded replay buffer. When the service announces the end (`goAway`) it opens
the next connection *before* the old one ends (make before break), preferably
at a turn boundary; when a connection dies abruptly it resumes at once, then
with backoff. Either way the buffered input is sent again first, so the
session holds the caller's audio exactly once. A refused handle starts a fresh
session primed with the conversation so far.

Timeline of an announced reset::

    handle H (input #n) ... goAway(timeLeft) ... turn boundary
        -> open conn2 with H (conn1 still carries audio)
        -> replay input #n+1.. into conn2 -> conn2 active -> close conn1

This module knows nothing of Twilio; its owner feeds 16 kHz PCM and reads
typed events.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import binascii
import contextlib
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import _live_converters, errors, types
from google.genai.live import AsyncSession
from websockets.exceptions import ConnectionClosed

from gateway.live.events import (
    AudioDropped,
    GenerationComplete,
    GoAwayReceived,
    Interrupted,
    LiveEvent,
    ModelAudio,
    ReplyAbandoned,
    ResetCause,
    Resumed,
    ToolCall,
    Transcript,
    TurnComplete,
    TurnState,
    Usage,
)

log = logging.getLogger(__name__)

INPUT_RATE = 16000
INPUT_MIME = f"audio/pcm;rate={INPUT_RATE}"
BYTES_PER_SECOND = INPUT_RATE * 2
REPLAY_CHUNK_BYTES = BYTES_PER_SECOND // 2  # replay in half-second messages
HISTORY_CHARS = 4000  # conversation text given to a fresh session
# Close codes with which the service refuses a setup (bad or expired handle).
REFUSAL_CODES = frozenset({1007, 1008})
# Caller speech, for choosing when to switch connections: RMS above about -40 dBFS,
# held for a short hangover (LiveOptions.caller_pause_s) so pauses between words do not
# count as silence.
SPEECH_RMS = 330


class LiveSessionFailed(Exception):
    """The conversation cannot go on: the service stayed unreachable or refused us."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _HandleRefused(Exception):
    """The service refused the resumption handle."""


@dataclass(frozen=True)
class LiveOptions:
    """How to talk to the Live service and how hard to try to stay connected."""

    model: str
    system_instruction: str
    voice: str | None = None
    language: str | None = None  # BCP-47 speech language; None: the model's choice
    compression_trigger_tokens: int = 25600
    compression_target_tokens: int = 12800
    replay_limit_s: float = 60.0
    reconnect_total_s: float = 30.0
    reconnect_max_attempts: int = 12
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    goaway_margin_s: float = 1.0
    connect_timeout_s: float = 10.0
    caller_pause_s: float = 0.4
    tools: tuple[types.Tool, ...] = ()


@dataclass(slots=True)
class _Input:
    """One message of caller input, numbered so handles can be placed exactly."""

    seq: int
    audio: bytes | None = None
    text: str | None = None
    turn_complete: bool = True
    received_at: float = 0.0


@dataclass(eq=False)
class _Connection:
    """One WebSocket to the service and what we know of it."""

    id: int
    session: AsyncSession
    stack: AsyncExitStack
    opened_at: float
    sent_seq: int = 0  # newest input number written to this connection
    generating: bool = False
    reader: asyncio.Task[None] | None = None
    closing: bool = False
    fresh: bool = False
    replayed_s: float = 0.0
    delivered: bool = False  # the service sent at least one valid message on it
    streak: _Streak | None = None  # the retry budget it was opened under, if any


@dataclass
class _Streak:
    """Reconnects since the last connection that delivered anything: one retry budget.

    A service that accepts the setup and then sends garbage would otherwise get a fresh
    budget (and an immediate retry) on every reset: a hot reconnect loop.
    """

    started: float
    attempts: int
    last_error: str


@dataclass
class _Signal:
    kind: str  # "failed" | "goaway" | "boundary"
    conn: _Connection | None = None
    detail: str = ""


@dataclass
class _History:
    """Transcribed turns, to brief a fresh session if a handle is refused."""

    turns: list[tuple[str, str]] = field(default_factory=list)

    def add(self, role: str, text: str) -> None:
        if self.turns and self.turns[-1][0] == role:
            self.turns[-1] = (role, self.turns[-1][1] + text)
        else:
            self.turns.append((role, text))

    def recent(self, limit: int = HISTORY_CHARS) -> list[tuple[str, str]]:
        kept: list[tuple[str, str]] = []
        total = 0
        for role, text in reversed(self.turns):
            total += len(text)
            if total > limit:
                break
            kept.append((role, text))
        return list(reversed(kept))


def parse_duration(value: str | None) -> float:
    """A protobuf Duration string such as "9.5s" in seconds (0 when unparseable)."""
    if not value:
        return 0.0
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)s?\s*", value)
    return float(match.group(1)) if match else 0.0


class LiveSession:
    """A conversation with the model that survives connection resets."""

    def __init__(
        self,
        client: genai.Client,
        options: LiveOptions,
        *,
        on_audio_sent: Callable[[float], None] | None = None,
        log_context: dict[str, str] | None = None,
    ) -> None:
        self._client = client
        self._options = options
        self._on_audio_sent = on_audio_sent
        self._log_extra = log_context or {}
        self._events: asyncio.Queue[LiveEvent] = asyncio.Queue()
        self._inbox: asyncio.Queue[_Input] = asyncio.Queue()
        self._signals: asyncio.Queue[_Signal] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._active: _Connection | None = None
        self._connections: set[_Connection] = set()
        self._next_conn_id = 0
        self._seq = 0
        self._buffer: deque[_Input] = deque()
        self._buffer_audio_bytes = 0
        self._replay_limit_bytes = int(options.replay_limit_s * BYTES_PER_SECOND)
        self._handle: str | None = None
        self._handle_seq = 0
        self._handle_fresh = True  # no model turn began since the handle was issued
        self._turn_state = TurnState.IDLE
        self._history = _History()
        self._goaway_deadline: float | None = None
        self._closed = asyncio.Event()
        self._started = asyncio.Event()
        self._refused_during_retry = False
        self._caller_spoke_at = -1e9
        self.dropped_audio_s = 0.0
        self.resets: dict[ResetCause, int] = dict.fromkeys(ResetCause, 0)

    # ----------------------------------------------------------------- public

    @property
    def turn_state(self) -> TurnState:
        return self._turn_state

    @property
    def handle(self) -> str | None:
        """The newest resumable handle (None before the first one)."""
        return self._handle

    def send_audio(self, pcm16k: bytes, received_at: float | None = None) -> None:
        """Queue caller audio (16 kHz PCM16) for the model; never blocks."""
        now = received_at or time.monotonic()
        if audioop.rms(pcm16k, 2) > SPEECH_RMS:
            self._caller_spoke_at = now
        self._inbox.put_nowait(_Input(seq=0, audio=pcm16k, received_at=now))

    @property
    def caller_speaking(self) -> bool:
        """Whether the caller's audio had speech energy in the last moments."""
        return time.monotonic() - self._caller_spoke_at < self._options.caller_pause_s

    def send_text(self, text: str, *, turn_complete: bool = True) -> None:
        """Queue a text turn (a greeting instruction, a key press) for the model."""
        self._inbox.put_nowait(_Input(seq=0, text=text, turn_complete=turn_complete))

    async def send_tool_response(self, call_id: str, name: str, result: dict[str, object]) -> None:
        """Answer a tool call on the active connection."""
        async with self._send_lock:
            conn = self._active
            if conn is None:
                return
            with contextlib.suppress(Exception):
                await conn.session.send_tool_response(
                    function_responses=[
                        types.FunctionResponse(id=call_id, name=name, response=result)
                    ]
                )

    async def events(self) -> AsyncIterator[LiveEvent]:
        """Events in order, until the session is closed."""
        while True:
            yield await self._events.get()

    def close(self) -> None:
        """Ask `run` to end; connections are closed on the way out."""
        self._closed.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run(self) -> None:
        """Connect, then keep the conversation connected until `close()`.

        Raises LiveSessionFailed when the service stays unreachable longer than
        the configured bounds, or refuses a fresh session.
        """
        tasks: list[asyncio.Task[object]] = []
        try:
            await self._connect_with_retries(time.monotonic())
            self._started.set()
            tasks = [
                asyncio.create_task(self._send_loop()),
                asyncio.create_task(self._supervise()),
                asyncio.create_task(self._closed.wait()),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_all()

    # ------------------------------------------------------------ connections

    def _config(self, handle: str | None) -> types.LiveConnectConfig:
        opts = self._options
        speech = None
        if opts.voice or opts.language:
            speech = types.SpeechConfig(
                voice_config=types.VoiceConfig(
                    prebuilt_voice_config=types.PrebuiltVoiceConfig(voice_name=opts.voice)
                )
                if opts.voice
                else None,
                language_code=opts.language,
            )
        return types.LiveConnectConfig(
            response_modalities=[types.Modality.AUDIO],
            system_instruction=types.Content(
                role="system", parts=[types.Part(text=opts.system_instruction)]
            ),
            speech_config=speech,
            context_window_compression=types.ContextWindowCompressionConfig(
                trigger_tokens=opts.compression_trigger_tokens,
                sliding_window=types.SlidingWindow(target_tokens=opts.compression_target_tokens),
            ),
            session_resumption=types.SessionResumptionConfig(handle=handle),
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig(),
            tools=list(opts.tools) or None,
        )

    async def _open(self, handle: str | None, kind: str) -> _Connection:
        """Open a connection (resuming `handle` if given) and start reading it."""
        stack = AsyncExitStack()
        try:
            async with asyncio.timeout(self._options.connect_timeout_s):
                session = await stack.enter_async_context(
                    self._client.aio.live.connect(
                        model=self._options.model, config=self._config(handle)
                    )
                )
        except errors.APIError as exc:
            await _quiet_close(stack)
            if handle is not None and (exc.code in REFUSAL_CODES or 400 <= exc.code < 500):
                raise _HandleRefused(f"code {exc.code}") from None
            raise
        except BaseException:
            await _quiet_close(stack)
            raise
        self._next_conn_id += 1
        conn = _Connection(
            id=self._next_conn_id, session=session, stack=stack, opened_at=time.monotonic()
        )
        self._connections.add(conn)
        conn.reader = asyncio.create_task(self._read(conn), name=f"live-read-{conn.id}")
        log.debug("live connection %d open (%s)", conn.id, kind, extra=self._log_extra)
        return conn

    async def _retire(self, conn: _Connection) -> None:
        """Close a connection we no longer use."""
        conn.closing = True
        self._connections.discard(conn)
        if conn.reader is not None and conn.reader is not asyncio.current_task():
            conn.reader.cancel()
            with contextlib.suppress(BaseException):
                await conn.reader
        await _quiet_close(conn.stack)

    async def _close_all(self) -> None:
        self._active = None
        for conn in list(self._connections):
            await self._retire(conn)

    def _activate(self, conn: _Connection) -> None:
        self._active = conn
        conn.sent_seq = self._seq

    # ---------------------------------------------------------------- reading

    async def _read(self, conn: _Connection) -> None:
        """Turn one connection's messages into events; report its end."""
        try:
            async for message in receive(conn.session):
                conn.delivered = True
                if isinstance(message, list):  # nothing but model audio, decoded without the SDK
                    self._on_model_turn(conn, conn is self._active, message)
                else:
                    self._on_message(conn, message)
        except asyncio.CancelledError:
            raise
        except errors.APIError as exc:
            detail = f"closed with code {exc.code}"
        except Exception as exc:  # a read error of any kind ends this connection
            detail = f"{type(exc).__name__}"
        if not conn.closing:
            self._signals.put_nowait(_Signal("failed", conn, detail))

    def _on_message(self, conn: _Connection, message: types.LiveServerMessage) -> None:
        active = conn is self._active
        update = message.session_resumption_update
        if update is not None and active:
            if update.resumable and update.new_handle:
                self._handle = update.new_handle
                self._handle_seq = conn.sent_seq
                self._handle_fresh = not conn.generating
                self._trim_buffer()
                self._signal_boundary(conn)
        if message.go_away is not None and active:
            time_left = parse_duration(message.go_away.time_left)
            self._goaway_deadline = time.monotonic() + max(
                0.0, time_left - self._options.goaway_margin_s
            )
            self._emit(GoAwayReceived(time_left))
            self._signals.put_nowait(_Signal("goaway", conn))
        content = message.server_content
        if content is not None:
            self._on_content(conn, content, active)
        if message.tool_call is not None and active:
            for call in message.tool_call.function_calls or []:
                self._emit(ToolCall(call.id or "", call.name or "", dict(call.args or {})))
        if message.usage_metadata is not None:  # billed whichever connection it came on
            self._emit(_usage(message.usage_metadata))

    def _on_content(
        self, conn: _Connection, content: types.LiveServerContent, active: bool
    ) -> None:
        if content.model_turn is not None and content.model_turn.parts:
            audio = [p.inline_data.data for p in content.model_turn.parts if p.inline_data]
            self._on_model_turn(conn, active, [pcm for pcm in audio if pcm])
        if not active:
            # A connection being replaced or being opened: its output is not the caller's.
            if content.turn_complete or content.interrupted:
                conn.generating = False
            return
        if content.input_transcription is not None and content.input_transcription.text:
            self._history.add("user", content.input_transcription.text)
            self._emit(Transcript("caller", content.input_transcription.text))
        if content.output_transcription is not None and content.output_transcription.text:
            self._history.add("model", content.output_transcription.text)
            self._emit(Transcript("model", content.output_transcription.text))
        if content.interrupted:
            conn.generating = False
            self._turn_state = TurnState.CALLER_SPEAKING
            self._emit(Interrupted())
        if content.generation_complete:
            self._emit(GenerationComplete())
        if content.turn_complete:
            conn.generating = False
            self._turn_state = TurnState.IDLE
            self._emit(TurnComplete())
            self._signal_boundary(conn)

    def _on_model_turn(self, conn: _Connection, active: bool, audio: list[bytes]) -> None:
        """A piece of the model's reply, with its audio (24 kHz PCM chunks, maybe none)."""
        if not conn.generating:
            conn.generating = True
            if active:
                self._handle_fresh = False
                self._turn_state = TurnState.MODEL_SPEAKING
        if active:
            now = time.monotonic()
            for pcm in audio:
                self._emit(ModelAudio(pcm, now))

    def _signal_boundary(self, conn: _Connection) -> None:
        if self._goaway_deadline is not None:
            self._signals.put_nowait(_Signal("boundary", conn))

    def _emit(self, event: LiveEvent) -> None:
        self._events.put_nowait(event)

    # ---------------------------------------------------------------- sending

    async def _send_loop(self) -> None:
        """Number caller input, keep it for replay, and write it to the active connection."""
        while True:
            item = await self._inbox.get()
            if item.audio is not None:
                # Coalesce audio that queued up while we were busy: fewer, larger messages.
                parts = [item.audio]
                while not self._inbox.empty():
                    nxt = self._inbox._queue[0]  # type: ignore[attr-defined]
                    if nxt.audio is None:
                        break
                    parts.append(self._inbox.get_nowait().audio)  # type: ignore[arg-type]
                item.audio = b"".join(parts) if len(parts) > 1 else parts[0]
            async with self._send_lock:
                self._seq += 1
                item.seq = self._seq
                self._keep(item)
                conn = self._active
                if conn is None:
                    continue  # no connection: the buffer holds it for replay
                try:
                    await self._write(conn, item)
                except Exception as exc:
                    self._connection_failed_on_send(conn, exc)
                    continue
                conn.sent_seq = item.seq
            if item.audio is not None and self._on_audio_sent is not None:
                self._on_audio_sent(time.monotonic() - item.received_at)

    async def _write(self, conn: _Connection, item: _Input) -> None:
        if item.audio is not None:
            await send_audio(conn.session, item.audio)
        elif item.text is not None:
            await conn.session.send_client_content(
                turns=types.Content(role="user", parts=[types.Part(text=item.text)]),
                turn_complete=item.turn_complete,
            )

    def _connection_failed_on_send(self, conn: _Connection, exc: Exception) -> None:
        if not conn.closing:
            self._signals.put_nowait(_Signal("failed", conn, f"send: {type(exc).__name__}"))

    def _keep(self, item: _Input) -> None:
        """Buffer input for replay, bounded; count audio pushed out undelivered."""
        self._buffer.append(item)
        if item.audio is not None:
            self._buffer_audio_bytes += len(item.audio)
        while self._buffer_audio_bytes > self._replay_limit_bytes and self._buffer:
            old = self._buffer.popleft()
            if old.audio is not None:
                self._buffer_audio_bytes -= len(old.audio)
                seconds = len(old.audio) / BYTES_PER_SECOND
                self.dropped_audio_s += seconds
                self._emit(AudioDropped(seconds))

    def _trim_buffer(self) -> None:
        """Forget input the newest handle already holds."""
        while self._buffer and self._buffer[0].seq <= self._handle_seq:
            old = self._buffer.popleft()
            if old.audio is not None:
                self._buffer_audio_bytes -= len(old.audio)

    async def _replay(self, conn: _Connection) -> float:
        """Send the input since the handle into `conn`; returns seconds of audio replayed."""
        replayed = 0
        pending = bytearray()

        async def flush() -> None:
            if pending:
                await send_audio(conn.session, bytes(pending))
                pending.clear()

        for item in list(self._buffer):
            if item.seq <= self._handle_seq:
                continue
            if item.audio is not None:
                pending += item.audio
                replayed += len(item.audio)
                if len(pending) >= REPLAY_CHUNK_BYTES:
                    await flush()
            else:
                await flush()
                await self._write(conn, item)
        await flush()
        return replayed / BYTES_PER_SECOND

    # ------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        """React to connection failures and goAway until cancelled."""
        while True:
            signal = await self._signals.get()
            if signal.conn is not self._active:
                if signal.kind == "failed" and signal.conn is not None:
                    await self._retire(signal.conn)
                continue
            if signal.kind == "failed":
                await self._recover_abrupt(signal.detail)
            elif signal.kind in ("goaway", "boundary") and self._goaway_deadline is not None:
                await self._switch_on_goaway()

    async def _switch_on_goaway(self) -> None:
        """Make before break: move to a new connection at a turn boundary or the deadline."""
        deadline = self._goaway_deadline
        old = self._active
        if deadline is None or old is None:
            return
        while True:
            clean = (
                not old.generating
                and self._handle_fresh
                and self._handle is not None
                and not self.caller_speaking
            )
            if clean or time.monotonic() >= deadline:
                break
            # Wait for a boundary, a failure, the caller's pause, or the deadline.
            wake = min(deadline, time.monotonic() + 0.1) if self.caller_speaking else deadline
            try:
                async with asyncio.timeout_at(_loop_time_at(wake)):
                    signal = await self._signals.get()
            except TimeoutError:
                continue
            if signal.kind == "failed" and signal.conn is old:
                self._goaway_deadline = None
                await self._recover_abrupt(signal.detail)
                return
            if signal.kind == "failed" and signal.conn is not None:
                await self._retire(signal.conn)
        forced = old.generating or not self._handle_fresh or self.caller_speaking
        started = time.monotonic()
        try:
            new = await self._open(self._handle, kind="resumed")
        except _HandleRefused:
            await self._recover_refused(ResetCause.GOAWAY, started)
            return
        except Exception as exc:
            # The service may refuse a second connection of a live session: break, then
            # make. Caller audio waits in the replay buffer meanwhile.
            log.info(
                "live: could not open ahead (%s); closing the old connection first",
                _describe(exc),
                extra=self._log_extra,
            )
            async with self._send_lock:
                self._active = None
            self._goaway_deadline = None
            if old.generating:
                self._emit(ReplyAbandoned(ResetCause.GOAWAY))
                self._turn_state = TurnState.IDLE
            await self._retire(old)
            await self._reconnect(ResetCause.GOAWAY, started)
            return
        async with self._send_lock:
            try:
                replayed = await self._replay(new)
            except Exception as exc:
                await self._retire(new)
                log.warning("live: replay failed (%s)", type(exc).__name__, extra=self._log_extra)
                self._goaway_deadline = None
                return
            was_generating = old.generating
            self._activate(new)
            self._goaway_deadline = None
        if was_generating:
            self._emit(ReplyAbandoned(ResetCause.GOAWAY))
            self._turn_state = TurnState.IDLE
        await self._retire(old)
        self.resets[ResetCause.GOAWAY] += 1
        gap = time.monotonic() - started if forced else 0.0
        self._emit(Resumed(ResetCause.GOAWAY, gap, replayed, 1, fresh=False))
        log.info(
            "live: switched connection on goAway (replayed %.0f ms%s)",
            replayed * 1000,
            ", forced mid-turn" if forced else "",
            extra=self._log_extra,
        )

    async def _recover_abrupt(self, detail: str) -> None:
        """Resume on a new connection after one died without notice."""
        started = time.monotonic()
        async with self._send_lock:
            old = self._active
            self._active = None
        self._goaway_deadline = None
        # A connection that never delivered a valid message does not renew the budget.
        streak = old.streak if old is not None and not old.delivered else None
        if streak is not None:
            streak.last_error = detail
        if old is not None:
            if old.generating:
                self._emit(ReplyAbandoned(ResetCause.ABRUPT))
                self._turn_state = TurnState.IDLE
            await self._retire(old)
        log.info("live: connection lost (%s), resuming", detail, extra=self._log_extra)
        await self._reconnect(ResetCause.ABRUPT, started, streak)

    async def _recover_refused(self, cause: ResetCause, started: float) -> None:
        async with self._send_lock:
            old = self._active
            self._active = None
        if old is not None:
            if old.generating:
                self._emit(ReplyAbandoned(ResetCause.REFUSED))
            await self._retire(old)
        self._goaway_deadline = None
        self._handle = None
        log.warning(
            "live: resumption handle refused; continuing on a fresh session",
            extra=self._log_extra,
        )
        await self._reconnect(ResetCause.REFUSED, started)

    async def _reconnect(
        self, cause: ResetCause, started: float, streak: _Streak | None = None
    ) -> None:
        """Resume (or, if the handle is refused, restart) and replay what the model lacks."""
        conn, attempts = await self._connect_with_retries(started, streak)
        fresh = conn.fresh
        if self._refused_during_retry:
            cause = ResetCause.REFUSED
        gap = time.monotonic() - started
        self.resets[cause] += 1
        self._emit(Resumed(cause, gap, conn.replayed_s, attempts, fresh=fresh))
        log.info(
            "live: resumed after %s reset in %.0f ms, %d attempt(s), replayed %.0f ms%s",
            cause.value,
            gap * 1000,
            attempts,
            conn.replayed_s * 1000,
            " (fresh session)" if fresh else "",
            extra=self._log_extra,
        )

    async def _connect_with_retries(
        self, started: float, streak: _Streak | None = None
    ) -> tuple[_Connection, int]:
        """Open, brief and replay a connection and make it active.

        Immediate first try, then exponential backoff with full jitter, bounded
        in attempts and in total time. A refused handle is dropped and a fresh
        session tried at once. A `streak` continues an earlier budget (and its
        backoff) instead of starting a new one.
        """
        opts = self._options
        attempt = streak.attempts if streak else 0
        delay = min(opts.backoff_initial_s * 2 ** max(0, attempt - 2), opts.backoff_max_s)
        last_error = streak.last_error if streak else ""
        if streak is not None:
            started = streak.started
            if attempt > 1:  # back off as if that connection had failed to open
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, opts.backoff_max_s)
        self._refused_during_retry = False
        while True:
            attempt += 1
            elapsed = time.monotonic() - started
            if attempt > opts.reconnect_max_attempts or elapsed > opts.reconnect_total_s:
                raise LiveSessionFailed(
                    f"live service unreachable: {attempt - 1} attempts in {elapsed:.1f} s "
                    f"(last error: {last_error or 'none'})"
                )
            fresh = self._handle is None
            try:
                remaining = max(0.1, opts.reconnect_total_s - elapsed)
                async with asyncio.timeout(min(opts.connect_timeout_s, remaining)):
                    conn = await self._open(self._handle, kind="fresh" if fresh else "resumed")
            except _HandleRefused:
                self._handle = None
                self._refused_during_retry = True
                log.warning(
                    "live: resumption handle refused; continuing on a fresh session",
                    extra=self._log_extra,
                )
                continue
            except Exception as exc:
                last_error = _describe(exc)
                if attempt > 1:
                    await asyncio.sleep(random.uniform(0, delay))
                    delay = min(delay * 2, opts.backoff_max_s)
                continue
            conn.fresh = fresh
            try:
                async with self._send_lock:
                    if fresh:
                        await self._brief(conn)
                    conn.replayed_s = await self._replay(conn)
                    self._activate(conn)
            except Exception as exc:
                last_error = f"replay {type(exc).__name__}"
                await self._retire(conn)
                continue
            conn.streak = _Streak(started, attempt, last_error)
            return conn, attempt

    async def _brief(self, conn: _Connection) -> None:
        """Give a fresh session the conversation so far, as prior turns."""
        turns: list[types.Content | types.ContentDict] = [
            types.Content(role=role, parts=[types.Part(text=text)])
            for role, text in self._history.recent()
        ]
        if turns:
            await conn.session.send_client_content(turns=turns, turn_complete=False)


def _usage(meta: types.UsageMetadata) -> Usage:
    def by_modality(details: list[types.ModalityTokenCount] | None) -> tuple[tuple[str, int], ...]:
        return tuple(
            (str(d.modality.value if d.modality else "unspecified").lower(), d.token_count or 0)
            for d in details or []
        )

    prompt = meta.prompt_token_count or 0
    response = meta.response_token_count or 0
    return Usage(
        prompt_tokens=prompt,
        response_tokens=response,
        total_tokens=meta.total_token_count or prompt + response,
        prompt_by_modality=by_modality(meta.prompt_tokens_details),
        response_by_modality=by_modality(meta.response_tokens_details),
    )


def _describe(exc: BaseException) -> str:
    code = f" {exc.code}" if isinstance(exc, errors.APIError) else ""
    return type(exc).__name__ + code


async def receive(session: AsyncSession) -> AsyncIterator[types.LiveServerMessage | list[bytes]]:
    """A connection's messages until it ends, as ``session.receive()`` parses them, except that
    a message carrying nothing but model audio comes as its decoded PCM chunks.

    The SDK validates every message into pydantic models (~90 µs; a reply is 25 messages a
    second); decoding the audio alone is ~15 µs. Everything else goes through the SDK's own
    parser, and an SDK laid out otherwise (or Vertex) gets its public, slower path.
    """
    ws = getattr(session, "_ws", None)
    converter = getattr(_live_converters, "_LiveServerMessage_from_mldev", None)
    vertex = getattr(getattr(session, "_api_client", None), "vertexai", True)
    if ws is None or converter is None or vertex:
        while True:
            async for message in session.receive():
                yield message
    while True:
        try:
            raw = await ws.recv(decode=False)
        except ConnectionClosed as exc:  # as the SDK reports it
            code = exc.rcvd.code if exc.rcvd else 1006
            reason = exc.rcvd.reason if exc.rcvd else "Abnormal closure."
            errors.APIError.raise_error(code, reason, None)
        try:
            response: dict[str, Any] = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
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


def audio_message(pcm16k: bytes) -> str:
    """The JSON `send_realtime_input(audio=Blob(pcm16k, INPUT_MIME))` writes, built directly.

    The SDK validates and converts every message through pydantic models (~80 µs, fifty times
    a second per call: the largest single cost in the gateway's profile); this is ~3 µs.
    tests/test_bench.py checks the two agree.
    """
    data = base64.urlsafe_b64encode(pcm16k).decode("ascii")
    return f'{{"realtime_input":{{"audio":{{"data":"{data}","mime_type":"{INPUT_MIME}"}}}}}}'


async def send_audio(session: AsyncSession, pcm16k: bytes) -> None:
    """Write caller audio to a Live connection, as send_realtime_input would, only cheaper."""
    ws = getattr(session, "_ws", None)
    if ws is None:  # an SDK that keeps its socket elsewhere: the public, slower way
        await session.send_realtime_input(audio=types.Blob(data=pcm16k, mime_type=INPUT_MIME))
        return
    await ws.send(audio_message(pcm16k))


async def _quiet_close(stack: AsyncExitStack) -> None:
    with contextlib.suppress(BaseException):
        await stack.aclose()


def _loop_time_at(monotonic_deadline: float) -> float:
    """Convert a time.monotonic() deadline to the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
