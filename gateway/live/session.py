"""One Live conversation carried over as many connections as it takes: the asyncio driver.

`gateway.live.machine.SessionMachine` decides everything (which connection to open from
which handle, what to replay, when to switch, when to give up) and does no I/O; this
module is the thin driver that does: it opens connections with the google-genai SDK,
writes what the machine says in order, feeds every message, failure and timer back to
it, and turns its actions into the call's events.

Caller input is written inline by the coroutine that hands it over (no task hop per
frame) when nothing is queued for the connection; input that arrives while a write is
in progress joins that connection's outbox, which the writing coroutine drains in order.

This module knows nothing of Twilio; its owner feeds 16 kHz PCM and reads typed events.
"""

from __future__ import annotations

import asyncio
import audioop
import contextlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import errors, types
from google.genai.live import AsyncSession
from websockets.exceptions import InvalidHandshake, InvalidStatus

from gateway.live import sdk
from gateway.live.essentials import Essentials
from gateway.live.events import (
    LiveEvent,
    RepeatSkipped,
    ResetCause,
    Resumed,
    TurnState,
    Usage,
)
from gateway.live.liveness import PROMPT_PONG_S, Liveness
from gateway.live.looplag import LoopLag, loop_lag
from gateway.live.machine import (
    BYTES_PER_SECOND,
    Action,
    Brief,
    Close,
    Emit,
    Fail,
    FailureReason,
    Input,
    LossKind,
    Open,
    OpenError,
    Respond,
    SessionMachine,
    Write,
)
from gateway.live.profiles import ModelSettings, Profile, declare_tools, profile_for, setup_fields
from gateway.live.sdk import INPUT_MIME, audio_message, receive
from gateway.live.settings import LiveSettings

__all__ = [
    "INPUT_MIME",
    "LiveOptions",
    "LiveSession",
    "LiveSessionFailed",
    "audio_message",
    "parse_duration",
    "receive",
]

log = logging.getLogger(__name__)

REPLAY_CHUNK_BYTES = BYTES_PER_SECOND // 2  # replay in half-second messages
RESUMES_KEPT = 1000
# Close codes with which the service refuses a resumption handle (bad or expired).
REFUSAL_CODES = frozenset({1007, 1008})
# Caller speech, for choosing when to switch connections: RMS above about -40 dBFS,
# held for a short hangover (LiveSettings.caller_pause_s) so pauses between words do not
# count as silence.
SPEECH_RMS = 330


class LiveSessionFailed(Exception):
    """The conversation cannot go on: the service stayed unreachable or refused us."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class LiveOptions:
    """One call's Live session: its model and persona, and the operator's knobs."""

    model: str
    system_instruction: str
    voice: str | None = None
    language: str | None = None  # BCP-47 speech language; None: the model's choice
    tools: tuple[types.Tool, ...] = ()
    settings: LiveSettings = field(default_factory=LiveSettings)
    # What the model takes and how it behaves (None: the table's row for `model` on the
    # client's backend), and the persona's settings for it (checked against it at start).
    profile: Profile | None = None
    model_settings: ModelSettings = field(default_factory=ModelSettings)


class _StreamEnd:
    """In an outbox: the caller's audio pauses here (``audioStreamEnd``)."""


STREAM_END = _StreamEnd()


@dataclass(eq=False)
class _Link:
    """The driver's side of one open connection."""

    id: int
    session: AsyncSession
    stack: AsyncExitStack
    liveness: Liveness
    outbox: deque[tuple[Input | Brief | _StreamEnd, bool]] = field(default_factory=deque)
    pumping: bool = False
    gone: bool = False  # closed by us or lost: nothing more is read or written


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
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._options = options
        self._on_audio_sent = on_audio_sent
        self._log_extra = log_context or {}
        # On Vertex AI handles name the last message they hold (`transparent`, _config).
        self.machine = SessionMachine(options.settings, rng, exact=client.vertexai)
        self.profile = options.profile or profile_for(
            options.model, "vertex" if client.vertexai else "gemini"
        )
        # What compression drops, carried in the system instruction where the model takes it.
        self.essentials = (
            Essentials(options.system_instruction) if self.profile.context_update else None
        )
        self._events: asyncio.Queue[LiveEvent] = asyncio.Queue()
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._armed: float | None = None  # the deadline the run loop sleeps until
        self._failure: LiveSessionFailed | None = None
        self._closed = asyncio.Event()
        self._started = asyncio.Event()
        self._audio_paused = False  # the caller's audio is paused (pause_audio)
        self._lag = LoopLag()  # the loop's, while `run` runs
        # The latest resets, with where each replay began and what it may hold twice (what
        # tests check the service's record against).
        self.resumes: deque[Resumed] = deque(maxlen=RESUMES_KEPT)

    # ----------------------------------------------------------------- public

    @property
    def turn_state(self) -> TurnState:
        return self.machine.turn_state

    @property
    def handle(self) -> str | None:
        """The newest trusted resumable handle (None before the first one)."""
        return self.machine.handle

    @property
    def caller_speaking(self) -> bool:
        """Whether the caller's audio had speech energy in the last moments."""
        return self.machine.caller_speaking(time.monotonic())

    @property
    def dropped_audio_s(self) -> float:
        return self.machine.dropped_audio_s

    @property
    def resets(self) -> dict[ResetCause, int]:
        return self.machine.resets

    async def send_audio(self, pcm16k: bytes, received_at: float | None = None) -> None:
        """Caller audio (16 kHz PCM16) for the model: written now, or kept for replay."""
        self._audio_paused = False
        speech = audioop.rms(pcm16k, 2) > SPEECH_RMS
        await self._execute(
            self.machine.caller_audio(pcm16k, speech, received_at or time.monotonic())
        )

    async def pause_audio(self) -> None:
        """The caller's audio pauses until they make a sound (gateway.dtx): the service is
        told (``audioStreamEnd``), after what was written, on the connection in use, and
        again after a replay into a new connection while it lasts (the replayed turn's end
        must not wait for audio that will not come). Only where the model's profile takes
        it (not on Vertex AI: the call pauses nothing there)."""
        self._audio_paused = True
        conn = self.machine.active
        link = self._links.get(conn.id) if conn is not None else None
        if link is None or link.gone or not self.profile.audio_stream_end:
            return
        link.outbox.append((STREAM_END, False))
        await self._pump(link)

    async def send_text(self, text: str, *, turn_complete: bool = True) -> None:
        """A text turn (a greeting instruction, a key press) for the model."""
        await self._execute(self.machine.caller_text(text, turn_complete, time.monotonic()))

    async def send_tool_response(self, call_id: str, name: str, result: dict[str, object]) -> None:
        """Answer a tool call on the connection that asked (dropped if it is gone)."""
        await self._execute(self.machine.tool_response(call_id, name, result))

    async def events(self) -> AsyncIterator[LiveEvent]:
        """Events in order, until the session is closed."""
        while True:
            yield await self._events.get()

    def close(self) -> None:
        """Ask `run` to end; connections are closed on the way out."""
        self._closed.set()
        self._wake.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run(self) -> None:
        """Connect, then keep the conversation connected until `close()`.

        Raises LiveSessionFailed when the service stays unreachable longer than the
        configured bounds.
        """
        async with loop_lag().hold() as lag:
            self._lag = lag
            await self._run()

    async def _run(self) -> None:
        sdk.paths()  # probe (and log) the SDK's fast paths once, before the first call
        loop = asyncio.get_running_loop()
        try:
            await self._execute(self.machine.start(time.monotonic()))
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._closed.is_set():
                    return
                self._wake.clear()
                deadline = self.machine.next_deadline()
                self._armed = deadline
                if deadline is None:
                    await self._wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                            await self._wake.wait()
                if self._failure is None and not self._closed.is_set():
                    await self._execute(self.machine.tick(time.monotonic()))
        finally:
            self.machine.close()
            links = list(self._links.values())
            self._links.clear()
            for link in links:
                link.gone = True
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in links:
                await _quiet_close(link.stack)

    # --------------------------------------------------------------- actions

    async def _execute(self, actions: list[Action]) -> None:
        """Carry out the machine's actions, in order."""
        for action in actions:
            kind = type(action)
            if kind is Write:
                assert isinstance(action, Write)
                link = self._links.get(action.conn)
                if link is not None and not link.gone:
                    replay = action.replay
                    link.outbox.extend((item, replay) for item in action.items)
                    if replay and self._audio_paused and self.profile.audio_stream_end:
                        link.outbox.append((STREAM_END, False))
                    await self._pump(link)
            elif kind is Emit:
                assert isinstance(action, Emit)
                self._events.put_nowait(action.event)
                if type(action.event) is Resumed:
                    self.resumes.append(action.event)
                    self._log_resumed(action.event)
                    if self.essentials is not None:
                        await self._carry_over(action.event.fresh, self.essentials)
                elif type(action.event) is Usage and self.essentials is not None:
                    await self._carry(action.event, self.essentials)
                elif type(action.event) is RepeatSkipped:
                    log.info(
                        "live: the resumed model began a reply the caller heard in full; "
                        "not played (held %.0f ms)",
                        action.event.held_s * 1000,
                        extra=self._log_extra,
                    )
            elif kind is Open:
                assert isinstance(action, Open)
                self._spawn(self._open(action.conn, action.handle), f"live-open-{action.conn}")
            elif kind is Close:
                assert isinstance(action, Close)
                closing = self._links.pop(action.conn, None)
                if closing is not None:
                    closing.gone = True
                    self._spawn(_quiet_close(closing.stack), f"live-close-{action.conn}")
            elif kind is Brief:
                assert isinstance(action, Brief)
                link = self._links.get(action.conn)
                if link is not None and not link.gone:
                    link.outbox.append((action, True))
                    await self._pump(link)
            elif kind is Respond:
                assert isinstance(action, Respond)
                await self._respond(action)
            elif kind is Fail:
                assert isinstance(action, Fail)
                log.warning("live: giving up: %s", action.detail, extra=self._log_extra)
                self._failure = LiveSessionFailed(action.reason, action.detail)
                self._wake.set()
        self._rearm()

    def _rearm(self) -> None:
        """Wake the run loop if the machine's next deadline moved."""
        if self.machine.next_deadline() != self._armed:
            self._wake.set()

    def _log_resumed(self, event: Resumed) -> None:
        """One line per reset."""
        if event.cause is ResetCause.GOAWAY and event.gap_s == 0.0:
            log.info(
                "live: switched connection on goAway (%s, replayed %.0f ms)",
                event.mode.replace("_", " ") or "resumed",
                event.replayed_s * 1000,
                extra=self._log_extra,
            )
            return
        log.info(
            "live: resumed after %s reset in %.0f ms, %d attempt(s), replayed %.0f ms%s%s",
            event.cause.value,
            event.gap_s * 1000,
            event.attempts,
            event.replayed_s * 1000,
            f" ({event.mode.replace('_', ' ')})" if event.mode else "",
            " (fresh session)" if event.fresh else "",
            extra=self._log_extra,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, link: _Link) -> None:
        """Write a connection's outbox in order; one writer at a time per connection."""
        if link.pumping:
            return  # the coroutine writing now will send it, in order
        link.pumping = True
        outbox = link.outbox
        try:
            while outbox and not link.gone:
                item, replay = outbox.popleft()
                if isinstance(item, _StreamEnd):
                    self.machine.sent(link.id, None)
                    await link.session.send_realtime_input(audio_stream_end=True)
                    continue
                if isinstance(item, Brief):
                    if self.profile.history == "client_content":  # else sent at its setup
                        self.machine.sent(link.id, None)
                        await link.session.send_client_content(
                            turns=_turns(item.turns), turn_complete=False
                        )
                    continue
                last = item
                if item.audio is not None:
                    pcm = item.audio
                    if outbox and outbox[0][0].__class__ is Input:
                        parts = [pcm]  # coalesce what queued up: fewer, larger messages
                        size = len(pcm)
                        while outbox and size < REPLAY_CHUNK_BYTES:
                            nxt = outbox[0][0]
                            if not isinstance(nxt, Input) or nxt.audio is None:
                                break
                            outbox.popleft()
                            parts.append(nxt.audio)
                            size += len(nxt.audio)
                            last = nxt
                        pcm = b"".join(parts)
                    self.machine.sent(link.id, last.seq)  # numbered as it goes out
                    await sdk.write_audio(link.session, pcm)
                elif self.profile.text == "realtime_text":  # always answered
                    self.machine.sent(link.id, item.seq)
                    await link.session.send_realtime_input(text=item.text)
                else:
                    self.machine.sent(link.id, item.seq)
                    await link.session.send_client_content(
                        turns=types.Content(role="user", parts=[types.Part(text=item.text)]),
                        turn_complete=item.turn_complete,
                    )
                now = time.monotonic()
                if not (replay and outbox and outbox[0][1]):
                    # A replay counts as written once all of it is: a handle the service
                    # issued before it had the burst may be read only after the burst's
                    # first pieces left (the machine sees a replay as one write).
                    self.machine.written(link.id, last.seq, now)
                if not replay and item.audio is not None and self._on_audio_sent is not None:
                    self._on_audio_sent(now - item.received_at)
        except Exception as exc:
            await self._lost(link, LossKind.NETWORK, f"send: {type(exc).__name__}")
        finally:
            link.pumping = False

    async def _respond(self, action: Respond) -> None:
        link = self._links.get(action.conn)
        if link is None or link.gone:
            return
        try:
            self.machine.sent(link.id, None)
            await link.session.send_tool_response(
                function_responses=[
                    types.FunctionResponse(
                        id=action.call_id,
                        name=action.name,
                        response=action.result,
                        scheduling=_scheduling(self.profile, action.result),
                    )
                ]
            )
        except Exception as exc:
            await self._lost(link, LossKind.NETWORK, f"send: {type(exc).__name__}")

    async def _carry(self, usage: Usage, essentials: Essentials) -> None:
        """A usage report: if compression dropped turns the model was not given back, send
        them in its system instruction on the connection in use (`gateway.live.essentials`)."""
        history = self.machine.history
        essentials.report(usage.prompt_tokens, usage.response_tokens, history.added)
        link = self._active_link()
        if link is None:
            return  # the next report tries again
        instruction = essentials.due(history)
        if instruction is not None:
            log.info(
                "live: context compressed; %d earlier turn(s) carried in the system instruction",
                essentials.carried,
                extra=self._log_extra,
            )
            await self._instruct(link, instruction)

    async def _carry_over(self, fresh: bool, essentials: Essentials) -> None:
        """A new connection: a fresh session starts over (its setup has the persona's own
        instruction, its brief the recent turns); a resumed state may be from a handle issued
        before the last update was read: it is sent again (a replacement, so harmless)."""
        if fresh:
            essentials.fresh()
        elif essentials.last is not None and (link := self._active_link()) is not None:
            await self._instruct(link, essentials.last)

    def _active_link(self) -> _Link | None:
        conn = self.machine.active
        link = self._links.get(conn.id) if conn is not None else None
        return None if link is None or link.gone else link

    async def _instruct(self, link: _Link, instruction: str) -> None:
        """Replace the session's system instruction (``contextUpdate``)."""
        try:
            self.machine.sent(link.id, None)
            await link.session.send_context_update(
                system_instruction=types.Content(
                    role="system", parts=[types.Part(text=instruction)]
                )
            )
        except Exception as exc:
            await self._lost(link, LossKind.NETWORK, f"send: {type(exc).__name__}")

    # ------------------------------------------------------------ connections

    def _config(self, handle: str | None) -> types.LiveConnectConfig:
        """The setup: what every call asks for, and what the model's profile takes."""
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
                trigger_tokens=opts.settings.compression_trigger_tokens,
                sliding_window=types.SlidingWindow(
                    target_tokens=opts.settings.compression_target_tokens
                ),
            ),
            # Vertex AI only (the SDK refuses it on the Gemini API): each handle then names
            # the last of the connection's messages it holds.
            session_resumption=types.SessionResumptionConfig(
                handle=handle, transparent=True if self._client.vertexai else None
            ),
            tools=declare_tools(self.profile, opts.tools),
            **setup_fields(self.profile, opts.model_settings, fresh=handle is None),
        )

    async def _open(self, conn_id: int, handle: str | None) -> None:
        """Open connection `conn_id` (resuming `handle`), then hand it to the machine."""
        stack = AsyncExitStack()
        error: OpenError | None = None
        detail = ""
        began = time.monotonic()
        try:
            async with asyncio.timeout(self._options.settings.connect_timeout_s):
                session = await stack.enter_async_context(
                    self._client.aio.live.connect(
                        model=self._options.model, config=self._config(handle)
                    )
                )
                if handle is None and self.profile.history == "initial_history":
                    # The setup announced initial history: it comes first, ends with
                    # turnComplete (no reply to it), and only then does the session listen.
                    turns = _turns(self.machine.history.recent())
                    self.machine.sent(conn_id, None)
                    await session.send_client_content(turns=turns, turn_complete=True)
        except asyncio.CancelledError:
            await _quiet_close(stack)
            raise
        except Exception as exc:
            await _quiet_close(stack)
            error, detail = _classify_open_error(exc, handle is not None)
        if error is OpenError.HANDLE_REFUSED:
            log.warning(
                "live: resumption handle refused (%s); continuing on a fresh session",
                detail,
                extra=self._log_extra,
            )
        elif error is not None:
            log.info(
                "live: connection %d could not open (%s: %s)",
                conn_id,
                error.value,
                detail,
                extra=self._log_extra,
            )
        if error is not None:
            await self._execute(self.machine.open_failed(conn_id, error, detail, time.monotonic()))
            return
        now = time.monotonic()
        # Its setup's round trip bounds the data path's (`gateway.live.handles`).
        setup_s = sdk.setup_round_trip(session, began, now)
        self.machine.setup_rtt(conn_id, setup_s)
        liveness = Liveness(now, self._options.settings.live_stall_s)
        link = _Link(conn_id, session, stack, liveness)
        self._links[conn_id] = link
        self._spawn(self._read(link), f"live-read-{conn_id}")
        self._spawn(self._watch(link), f"live-watch-{conn_id}")
        log.debug(
            "live connection %d open (setup answered in %.0f ms)",
            conn_id,
            setup_s * 1000,
            extra=self._log_extra,
        )
        await self._execute(self.machine.opened(conn_id, time.monotonic()))
        self._started.set()

    async def _watch(self, link: _Link) -> None:
        """Ping now and then; end the connection once nothing at all has come for the stall
        limit (`gateway.live.liveness`). A prompt pong's round trip places handles. Without
        the socket path there are no pings to answer, and no judging from silence alone."""
        if not sdk.paths().socket:
            return
        liveness = link.liveness

        def pong(done: asyncio.Future[float]) -> None:
            if done.cancelled() or done.exception() is not None or link.gone:
                return
            liveness.heard = time.monotonic()
            if done.result() <= PROMPT_PONG_S:
                self.machine.rtt(link.id, done.result())

        while not link.gone:
            if liveness.stalled(time.monotonic()):
                await self._lost(
                    link, LossKind.NETWORK, f"nothing received for {liveness.stall_s:g} s"
                )
                return
            waiter = await sdk.ping(link.session)
            if waiter is not None:
                waiter.add_done_callback(pong)
            await asyncio.sleep(liveness.interval)

    async def _lost(self, link: _Link, kind: LossKind, detail: str) -> None:
        if link.gone:
            return
        link.gone = True
        log.info("live: connection lost (%s) [conn %d]", detail, link.id, extra=self._log_extra)
        await self._execute(self.machine.lost(link.id, kind, detail, time.monotonic()))

    # ---------------------------------------------------------------- reading

    async def _read(self, link: _Link) -> None:
        """Feed one connection's messages to the machine; report its end."""
        kind = LossKind.NETWORK
        try:
            async for message in receive(link.session):
                if link.gone:
                    return
                link.liveness.heard = time.monotonic()
                if isinstance(message, list):  # nothing but model audio
                    await self._execute(
                        self.machine.model_audio(link.id, message, time.monotonic())
                    )
                else:
                    arrived = sdk.received_at(link.session)
                    if arrived is not None:  # the kernel may have had it a loop's lag before
                        arrived -= self._lag.around(arrived)
                    await self._execute(self._on_message(link.id, message, arrived))
            detail = "connection ended"
        except asyncio.CancelledError:
            raise
        except errors.APIError as exc:
            kind = LossKind.CLOSED if exc.code not in (1006,) else LossKind.NETWORK
            detail = f"closed with code {exc.code}"
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            kind = LossKind.GARBAGE
            detail = f"unreadable message ({type(exc).__name__})"
        except Exception as exc:  # a read error of any kind ends this connection
            detail = type(exc).__name__
        await self._lost(link, kind, detail)

    def _on_message(
        self, conn: int, message: types.LiveServerMessage, arrived: float | None = None
    ) -> list[Action]:
        """Feed one message to the machine; `arrived`: when it reached the socket."""
        m = self.machine
        now = time.monotonic()
        actions: list[Action] = []
        update = message.session_resumption_update
        if update is not None:
            consumed = update.last_consumed_client_message_index
            actions += m.handle_update(
                conn, update.new_handle, bool(update.resumable), now, consumed, arrived
            )
        if message.go_away is not None:
            actions += m.go_away(conn, parse_duration(message.go_away.time_left), now)
        content = message.server_content
        if content is not None:
            if content.model_turn is not None and content.model_turn.parts:
                parts = content.model_turn.parts
                audio = [p.inline_data.data for p in parts if p.inline_data and p.inline_data.data]
                actions += m.model_audio(conn, audio, now)
            if content.input_transcription is not None and content.input_transcription.text:
                actions += m.transcript(conn, "caller", content.input_transcription.text)
            if content.output_transcription is not None and content.output_transcription.text:
                actions += m.transcript(conn, "model", content.output_transcription.text)
            if content.interrupted:
                actions += m.interrupted(conn, now)
            if content.generation_complete:
                actions += m.generation_complete(conn)
            if content.turn_complete:
                actions += m.turn_complete(conn, now)
        if message.tool_call is not None:
            for call in message.tool_call.function_calls or []:
                actions += m.tool_call(conn, call.id or "", call.name or "", dict(call.args or {}))
        if message.usage_metadata is not None:  # billed whichever connection it came on
            actions.append(Emit(_usage(message.usage_metadata)))
        actions += m.other_message(conn)
        return actions


def _scheduling(
    profile: Profile, result: dict[str, object]
) -> types.FunctionResponseScheduling | None:
    """SILENT for a tool that did its work (an ending: the model adds nothing after its
    goodbye) where the model takes scheduling; an error gets the default (WHEN_IDLE), so
    the model can say or try something else."""
    if not profile.tool_scheduling or "error" in result:
        return None
    return types.FunctionResponseScheduling.SILENT


def _turns(turns: tuple[tuple[str, str], ...]) -> list[types.Content | types.ContentDict]:
    return [types.Content(role=role, parts=[types.Part(text=text)]) for role, text in turns]


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
        thoughts_tokens=meta.thoughts_token_count or 0,
        tool_prompt_tokens=meta.tool_use_prompt_token_count or 0,
    )


def _classify_open_error(exc: BaseException, resuming: bool) -> tuple[OpenError, str]:
    """What a failed `connect()` means for the machine, and a detail safe to log."""
    if isinstance(exc, TimeoutError):
        return OpenError.TIMED_OUT, "no setupComplete in time"
    if isinstance(exc, errors.APIError):
        code = exc.code
        if resuming and (code in REFUSAL_CODES or 400 <= code < 500):
            return OpenError.HANDLE_REFUSED, f"code {code}"
        if code == 1006:
            return OpenError.UNREACHABLE, "abnormal closure during setup"
        return OpenError.REFUSED, f"code {code}"
    if isinstance(exc, InvalidStatus):
        return OpenError.REFUSED, f"HTTP {exc.response.status_code}"
    if isinstance(exc, InvalidHandshake | OSError):
        return OpenError.UNREACHABLE, type(exc).__name__
    if isinstance(exc, ValueError):
        return OpenError.GARBAGE, type(exc).__name__
    return OpenError.UNREACHABLE, type(exc).__name__


async def _quiet_close(stack: AsyncExitStack) -> None:
    with contextlib.suppress(BaseException):
        await stack.aclose()
