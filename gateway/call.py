"""A phone call: one Twilio media stream joined to one Live conversation.

Caller audio: Twilio `media` (8 kHz mu-law, 20 ms) -> PCM 16 kHz -> LiveSession.
Model audio: LiveSession (24 kHz PCM) -> 8 kHz mu-law -> Twilio `media`, with a
`mark` at the end of each reply so the call knows what the caller has heard.
Barge-in: on `interrupted` the call sends Twilio `clear` at once and drops
whatever of the old reply is still in the resampler.
Tools (`end_call`, `transfer_call`): the model gets its answer at once; the REST
request waits until the caller has heard what the model said (the marks tell).
The gateway's own moves (`gateway.watch`: a silent caller, the persona's limits; an
answering machine on an outbound call) end a call the same way: an instruction to the
model, its words heard, then the REST hang-up. Tokens the service reports are summed
per call (`gateway.usage`): the call-ended log line, the transcript, the metrics.

The call owns every task it starts; when it returns, none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.audio import MODEL_OUTPUT_RATE, CallerToModel, ModelToCaller, speech_level
from gateway.live.events import (
    AudioDropped,
    GenerationComplete,
    GoAwayReceived,
    Interrupted,
    ModelAudio,
    RepeatSkipped,
    ReplyAbandoned,
    Resumed,
    ToolCall,
    Transcript,
    TurnComplete,
    TurnState,
    Usage,
)
from gateway.live.session import SPEECH_RMS, LiveSession, LiveSessionFailed
from gateway.metrics import Metrics
from gateway.personas import Persona
from gateway.tools import CallTools, ToolOutcome
from gateway.transcript import CallTranscript
from gateway.twilio.protocol import (
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    Start,
    Stop,
    StreamProtocolError,
    clear_message,
    mark_message,
    media_message,
)
from gateway.twilio.rest import CallControl, RestError
from gateway.usage import CallUsage
from gateway.watch import CallWatch, Move

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]


def answered_by_kind(answered_by: str) -> str:
    """Twilio's AnsweredBy (`human`, `machine_end_beep`, `fax`, ...) as human, machine,
    fax or unknown (a metric label)."""
    value = answered_by.strip().lower()
    if value.startswith("machine"):
        return "machine"
    return value if value in ("human", "fax") else "unknown"


class CallOutcome(StrEnum):
    """How a call ended (a metric label)."""

    COMPLETED = "completed"  # Twilio said stop
    HANGUP = "hangup"  # the stream closed without stop
    LIVE_FAILED = "live_failed"
    PROTOCOL_ERROR = "protocol_error"
    SHUTDOWN = "shutdown"
    ENDED_BY_GATEWAY = "ended_by_gateway"  # end_call, when the REST hang-up failed


@dataclass
class CallStats:
    """What happened on the call, for logs and tests."""

    caller_frames: int = 0
    replies_sent: int = 0
    replies_heard: int = 0
    barge_ins: int = 0
    resets: int = 0
    outcome: CallOutcome | None = None
    failure: str | None = None
    marks_pending: set[str] = field(default_factory=set)


class Call:
    """Joins a started Twilio stream to a Live session until either side ends."""

    def __init__(
        self,
        start: Start,
        live: LiveSession,
        send: SendText,
        metrics: Metrics,
        *,
        greeting: str = "",
        tools: CallTools | None = None,
        transcript: CallTranscript | None = None,
        hangup_wait_s: float = 20.0,
        batch_frames: int = 1,
        persona: Persona | None = None,
        control: CallControl | None = None,
        token_prices: Mapping[str, float] | None = None,
    ) -> None:
        self.start = start
        self.live = live
        self._send = send
        self._metrics = metrics
        self._greeting = greeting
        self._tools = tools
        self.transcript = transcript or CallTranscript(None, start.call_sid)
        self._hangup_wait_s = hangup_wait_s
        self._batch_frames = max(1, batch_frames)  # Twilio frames per piece sent to the model
        self._tool_tasks: set[asyncio.Task[object]] = set()  # the call's own tasks
        self._end_stream = asyncio.Event()  # the gateway ends the call itself
        self.shutting_down = False  # set by the server when a drain runs out of time
        self._turns_completed = 0
        self._model_audio_at = 0.0
        self._caller_audio = CallerToModel()
        self._model_audio = ModelToCaller()
        self._stream_sid = start.stream_sid
        self._reply_open = False
        self.stats = CallStats()
        self.started_at = time.monotonic()
        self.persona = persona or Persona(name="default", system_instruction="")
        self._control = control
        self._prices = dict(token_prices or {})
        self.usage = CallUsage()
        self.watch = CallWatch(self.persona, self.started_at)
        self._watch_changed = asyncio.Event()
        self.ending: str | None = None  # why the gateway is ending the call, once it is
        self._in_turn = False  # model audio of the current turn has come
        self._turn_began_at = 0.0
        self._last_turn_began_at = -1.0  # when the newest completed turn's audio began
        self._running = False
        self._early_answer: str | None = None  # answered_by() before run()

    async def run(self, inbound: AsyncIterator[InboundMessage]) -> CallOutcome:
        """Run the call until the caller hangs up, the stream breaks or Live fails."""
        live_task = asyncio.create_task(self.live.run(), name="live")
        caller_task = asyncio.create_task(self._caller_to_model(inbound), name="caller")
        model_task = asyncio.create_task(self._model_to_caller(), name="model")
        end_task = asyncio.create_task(self._end_stream.wait(), name="end")
        tasks = (live_task, caller_task, model_task, end_task)
        # The call counts its Live connections: later ones from `Resumed`, the first here.
        first_task = asyncio.create_task(self._count_first_connection(), name="first-conn")
        self._metrics.calls_active.inc()
        log.info("call started")
        if self.watch.timed:
            self._spawn(self._watch_loop(), "watch")
        if self.persona.record:
            self._spawn(self._record(), "record")
        if self._greeting:
            self.transcript.event("greeting", text=self._greeting)
            await self.live.send_text(self._greeting)
        self._running = True
        if self._early_answer is not None:
            self.answered_by(self._early_answer)
        outcome = CallOutcome.HANGUP
        protocol_error: StreamProtocolError | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if caller_task in done:
                error = caller_task.exception()
                if isinstance(error, StreamProtocolError):
                    outcome = CallOutcome.PROTOCOL_ERROR
                    self.stats.failure = error.reason
                    protocol_error = error
                elif error is not None:
                    raise error
                else:
                    outcome = caller_task.result()
                    if outcome is CallOutcome.HANGUP and self.shutting_down:
                        outcome = CallOutcome.SHUTDOWN
            elif live_task in done:
                error = live_task.exception()
                outcome = CallOutcome.LIVE_FAILED
                if isinstance(error, LiveSessionFailed):
                    reason = error.detail
                elif error is not None:
                    reason = type(error).__name__
                else:
                    reason = "live session ended"
                self.stats.failure = reason
                self._metrics.live_errors.labels(reason=_reason_label(error)).inc()
                log.warning("call ended: live session failed: %s", reason)
            elif model_task in done:
                error = model_task.exception()
                if error is not None:
                    raise error
            elif end_task in done:
                outcome = CallOutcome.ENDED_BY_GATEWAY
        except asyncio.CancelledError:
            outcome = CallOutcome.SHUTDOWN
            raise
        finally:
            self.live.close()
            for task in (*tasks, first_task, *self._tool_tasks):
                task.cancel()
            await asyncio.gather(*tasks, first_task, *self._tool_tasks, return_exceptions=True)
            self._metrics.calls_active.dec()
            self.stats.outcome = outcome
            usage = self.usage.summary(self._prices)
            self.transcript.close(
                outcome=outcome.value,
                replies_heard=self.stats.replies_heard,
                barge_ins=self.stats.barge_ins,
                resets=self.stats.resets,
                **({"ended_by": self.ending} if self.ending else {}),
                usage=usage,
            )
            self._metrics.calls.labels(outcome=outcome.value).inc()
            self._metrics.call_duration.observe(time.monotonic() - self.started_at)
            cost = usage.get("cost_usd")
            log.info(
                "call ended (%s): %d replies sent, %d heard, %d barge-ins, %d resets, "
                "%d tokens (%d prompt, %d response)%s",
                outcome.value,
                self.stats.replies_sent,
                self.stats.replies_heard,
                self.stats.barge_ins,
                self.stats.resets,
                self.usage.total_tokens,
                self.usage.prompt_tokens,
                self.usage.response_tokens,
                f", ${cost:.4f}" if cost is not None else "",
                extra={"persona": self.persona.name, **usage, "ended_by": self.ending},
            )
        if protocol_error is not None:
            raise protocol_error
        return outcome

    async def _count_first_connection(self) -> None:
        await self.live.wait_started()
        self._metrics.live_connections.labels(kind="fresh").inc()

    # ------------------------------------------------------------ caller side

    async def _caller_to_model(self, inbound: AsyncIterator[InboundMessage]) -> CallOutcome:
        frames = self._metrics.caller_frames
        convert = self._caller_audio.convert
        send_audio = self.live.send_audio
        batch = self._batch_frames
        held: list[bytes] = []  # frames waiting to fill a piece (only when batching)
        held_since = 0.0

        async def send_held() -> None:
            pcm = convert(b"".join(held))
            held.clear()
            if pcm:
                await send_audio(pcm, held_since)

        listen = self.watch.listens  # caller speech restarts the silence watch
        watch = self.watch

        async for message in inbound:
            if type(message) is Media:
                received = time.monotonic()
                self.stats.caller_frames += 1
                frames.inc()
                payload = message.payload
                if listen and speech_level(payload) > SPEECH_RMS:  # every frame, held or not
                    watch.caller_spoke(received)
                if batch > 1:
                    if not held:
                        held_since = received
                    held.append(payload)
                    if len(held) >= batch:
                        await send_held()
                    continue
                pcm = convert(payload)
                if pcm:
                    await send_audio(pcm, received)
            elif isinstance(message, Mark):
                self._on_mark(message.name)
            elif isinstance(message, Dtmf):
                if held:
                    await send_held()  # the key press follows the audio before it
                self.transcript.event("dtmf", digit=message.digit)
                await self.live.send_text(f"The caller pressed the key {message.digit}.")
            elif isinstance(message, Stop):
                if held:
                    await send_held()  # the caller's last words, not dropped with the piece
                return CallOutcome.COMPLETED
        if held:
            await send_held()
        return CallOutcome.HANGUP

    def _on_mark(self, name: str) -> None:
        if name in self.stats.marks_pending:
            self.stats.marks_pending.discard(name)
            if name.startswith("reply-"):
                self.stats.replies_heard += 1
            if not self.stats.marks_pending and not self._reply_open:
                self._bot_quiet()

    def _bot_quiet(self) -> None:
        """The caller has heard all the bot said: the silence watch may start counting."""
        self.watch.bot_quiet(time.monotonic())
        self._watch_changed.set()

    # ------------------------------------------------------------- model side

    async def _model_to_caller(self) -> None:
        model_audio_s = self._metrics.model_audio
        latency = self._metrics.added_latency.labels(direction="model_to_caller")
        async for event in self.live.events():
            if type(event) is ModelAudio:
                ulaw = self._model_audio.convert(event.pcm)
                if not self._in_turn:
                    self._in_turn = True
                    self._turn_began_at = event.received_at
                    self.watch.bot_speaking()
                self._reply_open = True
                self._model_audio_at = event.received_at
                if ulaw:
                    await self._send(media_message(self._stream_sid, ulaw))
                    latency.observe(time.monotonic() - event.received_at)
                model_audio_s.inc(len(event.pcm) / (2 * MODEL_OUTPUT_RATE))
            elif isinstance(event, Interrupted):
                self._in_turn = False
                await self._clear_playback()
                self.stats.barge_ins += 1
                self._metrics.barge_ins.inc()
                self.transcript.event("interrupted")
            elif isinstance(event, ReplyAbandoned):
                self._in_turn = False
                await self._clear_playback()
                self.transcript.event("reply_lost", cause=event.cause.value)
            elif isinstance(event, RepeatSkipped):
                self._metrics.repeats_skipped.inc()
                self.transcript.event("repeat_skipped", held_s=round(event.held_s, 3))
            elif isinstance(event, GenerationComplete | TurnComplete):
                await self._end_reply()
                if isinstance(event, TurnComplete):
                    self._turns_completed += 1
                    if self._in_turn:
                        self._last_turn_began_at = self._turn_began_at
                    self._in_turn = False
                    self.transcript.flush_turn(speaker="model")
            elif isinstance(event, Resumed):
                self.transcript.event(
                    "reset",
                    cause=event.cause.value,
                    gap_s=round(event.gap_s, 3),
                    replayed_s=round(event.replayed_s, 3),
                    fresh=event.fresh,
                )
                self.stats.resets += 1
                cause = event.cause.value
                self._metrics.live_resumptions.labels(cause=cause).inc()
                self._metrics.live_connections.labels(
                    kind="fallback" if event.fresh else "resumed"
                ).inc()
                self._metrics.reset_gap.labels(cause=cause).observe(event.gap_s)
                self._metrics.replayed_audio.labels(cause=cause).observe(event.replayed_s)
                if event.mode:
                    self._metrics.switches.labels(mode=event.mode).inc()
            elif isinstance(event, GoAwayReceived):
                self._metrics.goaway.inc()
            elif isinstance(event, AudioDropped):
                self._metrics.caller_audio_dropped.labels(reason="replay_overflow").inc(
                    event.seconds
                )
            elif isinstance(event, Transcript):
                self.transcript.piece(event.role, event.text)
            elif isinstance(event, ToolCall):
                await self._on_tool_call(event)
            elif isinstance(event, Usage):
                self._on_usage(event)

    # ------------------------------------------------------------ usage, limits

    def _on_usage(self, event: Usage) -> None:
        persona = self.persona.name
        before = self.usage.cost_usd(self._prices)
        for kind, tokens in self.usage.add(event).items():
            side, modality = kind.split("_", 1)
            self._metrics.tokens.labels(persona=persona, kind=side, modality=modality).inc(tokens)
        after = self.usage.cost_usd(self._prices)
        if before is not None and after is not None:
            self._metrics.cost.labels(persona=persona).inc(after - before)
        move = self.watch.tokens(self.usage.total_tokens)
        if move is not None:
            self._move(move)

    async def _watch_loop(self) -> None:
        """Make the silence and duration moves when they fall due."""
        while True:
            move, wake = self.watch.due(time.monotonic())
            if move is not None:
                self._move(move)
                continue
            self._watch_changed.clear()
            delay = None if wake is None else max(0.0, wake - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._watch_changed.wait()

    def _move(self, move: Move) -> None:
        persona = self.persona
        if move is Move.CHECK_IN:
            log.info("caller silent for %.0f s: checking in", persona.silence_timeout_s)
            self._spawn(self._instruct(move.value, persona.silence_prompt), "check-in")
        elif move is Move.SILENCE:
            self._end(move.value, persona.silence_goodbye)
        elif move in (Move.WRAP_UP_DURATION, Move.WRAP_UP_TOKENS):
            self._end(move.value, persona.wrap_up)
        elif move is Move.LIMIT:  # whatever is happening, even another ending
            self.ending = self.ending or move.value
            self.watch.ending = True
            self._spawn(self._hang_up(move.value), "limit")

    async def _instruct(self, reason: str, text: str) -> float:
        """Tell the model something as a text turn; returns when it was sent."""
        self.transcript.event("instruction", reason=reason, text=text)
        sent = time.monotonic()
        await self.live.send_text(text)
        return sent

    def _end(self, reason: str, instruction: str = "", *, interrupt: bool = False) -> bool:
        """End the call: say `instruction` (if any), once heard hang up. False if the call
        is already ending."""
        if self.ending is not None:
            return False
        self.ending = reason
        self.watch.ending = True
        self._spawn(self._end_after_heard(reason, instruction, interrupt), f"end-{reason}")
        return True

    async def _end_after_heard(self, reason: str, instruction: str, interrupt: bool) -> None:
        log.info("ending the call (%s)", reason)
        if instruction:
            if interrupt:  # what plays is moot (an answering machine does not listen)
                await self._clear_playback()
            else:  # let the model finish what it is saying first
                await self._wait_quiet()
            sent = await self._instruct(reason, instruction)
            await self.wait_heard(turn_after=sent)
        await self._hang_up(reason)

    async def _hang_up(self, reason: str) -> None:
        """Hang up through the REST API; if that fails, close the stream (Twilio then
        hangs up: nothing follows <Connect>)."""
        self._metrics.hangups.labels(persona=self.persona.name, reason=reason).inc()
        self.transcript.event("hangup", reason=reason)
        if self._control is None:
            self._end_stream.set()
            return
        try:
            await self._control.hang_up()
        except RestError as exc:
            log.warning("hang-up (%s) failed: %s; closing the stream", reason, exc)
            self._metrics.rest_errors.labels(action="hang_up").inc()
            self._end_stream.set()

    async def _record(self) -> None:
        """Ask Twilio to record the call (dual channel); its callback brings the URL."""
        assert self._control is not None
        try:
            sid = await self._control.record()
        except RestError as exc:
            log.warning("recording not started: %s", exc)
            self._metrics.rest_errors.labels(action="record").inc()
            self.transcript.event("recording", status="failed", error=str(exc))
            return
        log.info("recording %s started", sid)
        self.transcript.event("recording", status="started", recording_sid=sid)

    def answered_by(self, answered_by: str) -> None:
        """Twilio's answering-machine detection result for this (outbound) call.

        A machine gets the persona's voicemail message (the model says it after the
        machine's greeting, then the call ends once it was heard), or a hang-up when the
        persona has none; a fax a hang-up; a person (or unknown) the call as usual.
        """
        if not self._running:
            self._early_answer = answered_by
            return
        kind = answered_by_kind(answered_by)
        log.info("answered by %s", answered_by or "unknown")
        self.transcript.event("answered_by", answered_by=answered_by, result=kind)
        self._metrics.answered_by.labels(persona=self.persona.name, answered_by=kind).inc()
        if kind == "machine" and self.persona.voicemail:
            self._end("voicemail", self.persona.voicemail, interrupt=True)
        elif kind in ("machine", "fax"):
            if self.ending is None:
                self.ending = kind
                self.watch.ending = True
                self._spawn(self._hang_up(kind), "hang-up")

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """A task of the call's own; cancelled (if still running) when the call ends."""
        task = asyncio.create_task(work, name=name)
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    # ------------------------------------------------------------------ tools

    async def _on_tool_call(self, event: ToolCall) -> None:
        """Answer the model now; run the REST action once the caller heard the reply."""
        self.transcript.event("tool_call", name=event.name, args=event.args)
        if self._tools is None:
            outcome = ToolOutcome({"error": f"unknown function {event.name}"})
        elif self.ending is not None:
            outcome = ToolOutcome({"error": "the call is already ending"})
        else:
            outcome = self._tools.prepare(event)
            if outcome.ends_call:
                self.ending = event.name
                self.watch.ending = True
        await self.live.send_tool_response(event.call_id, event.name, outcome.response)
        action = outcome.action
        if action is None:
            log.info("tool %s declined: %s", event.name, outcome.response.get("error"))
            self.transcript.event("tool_result", name=event.name, ok=False, **outcome.response)
            return

        async def run_when_heard() -> None:
            heard = await self.wait_heard()
            log.info("tool %s: %s (reply heard: %s)", event.name, outcome.description, heard)
            if outcome.ends_call:
                self._metrics.hangups.labels(persona=self.persona.name, reason=event.name).inc()
            try:
                await action()
            except RestError as exc:
                log.warning("tool %s failed: %s", event.name, exc)
                self._metrics.rest_errors.labels(action=event.name).inc()
                self.transcript.event("tool_result", name=event.name, ok=False, error=str(exc))
                if outcome.ends_call:
                    self._end_stream.set()  # no verb follows <Connect>: Twilio hangs up
                return
            self.transcript.event(
                "tool_result", name=event.name, ok=True, detail=outcome.description
            )

        self._spawn(run_when_heard(), f"tool-{event.name}")

    async def wait_heard(
        self, settle_s: float = 1.0, poll_s: float = 0.05, *, turn_after: float | None = None
    ) -> bool:
        """Wait until the caller has heard everything the model said, and it says no more.

        Done when no reply is playing or unconfirmed (every mark echoed) and the model's
        turn is over: a turn completed since the wait began, or `settle_s` passed without
        model audio (the model may speak after a tool response). With `turn_after`, only
        a whole turn whose audio began after that time will do (the answer to an
        instruction sent then). False on the time limit.
        """
        began = time.monotonic()
        turns = self._turns_completed
        deadline = began + self._hangup_wait_s
        while True:
            now = time.monotonic()
            playing = self._playing()
            quiet = now - max(began, self._model_audio_at) >= settle_s
            if turn_after is not None:
                done = self._last_turn_began_at >= turn_after
            else:
                done = self._turns_completed > turns or quiet
            if not playing and done:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(poll_s)

    def _playing(self) -> bool:
        """A reply is playing or not yet confirmed heard, or the model is speaking."""
        return (
            self._reply_open
            or bool(self.stats.marks_pending)
            or self.live.turn_state is TurnState.MODEL_SPEAKING
        )

    async def _wait_quiet(self, poll_s: float = 0.05) -> None:
        """Until nothing plays (at most `hangup_wait_s`)."""
        deadline = time.monotonic() + self._hangup_wait_s
        while True:
            if not self._playing() or time.monotonic() >= deadline:
                return
            await asyncio.sleep(poll_s)

    async def _end_reply(self) -> None:
        """Flush the resampler and mark the end of the reply, once per reply."""
        if not self._reply_open:
            return
        self._reply_open = False
        tail = self._model_audio.flush()
        if tail:
            await self._send(media_message(self._stream_sid, tail))
        self.stats.replies_sent += 1
        name = f"reply-{self.stats.replies_sent}"
        self.stats.marks_pending.add(name)
        await self._send(mark_message(self._stream_sid, name))

    async def _clear_playback(self) -> None:
        """Barge-in: Twilio drops its queue at once; our resampler forgets the old reply."""
        self._model_audio.reset()
        self._reply_open = False
        await self._send(clear_message(self._stream_sid))
        self.stats.marks_pending.clear()
        self._bot_quiet()


def _reason_label(error: BaseException | None) -> str:
    if isinstance(error, LiveSessionFailed):
        return error.reason.value
    return "error" if error is not None else "ended"
