"""A phone call: one Twilio media stream joined to one Live conversation.

Caller audio: Twilio `media` (8 kHz mu-law, 20 ms) -> PCM 16 kHz -> LiveSession.
Model audio: LiveSession (24 kHz PCM) -> 8 kHz mu-law -> Twilio `media`, with a
`mark` at the end of each reply so the call knows what the caller has heard
(`gateway.playback`). Barge-in: on `interrupted` the call sends Twilio `clear` at once
and drops whatever of the old reply is still in the resampler.

Every ending begins in `Call.end` with its reason (`gateway.ending`): the model's tools
(`end_call`, `transfer_call`: the model gets its answer at once, the REST request waits
until the caller has heard what the model said), the gateway's own moves
(`gateway.watch`: a silent caller, the persona's limits), an answering machine on an
outbound call (an instruction to the model, its words heard, then the REST hang-up), and
the line going away. Tokens the service reports are summed per call (`gateway.usage`):
the call-ended log line, the transcript, the metrics.

Its parts carry out what it decides: `CallerAudio` (the caller's audio on its way to the
model), `gateway.playback` (the model's to the caller), `LineControl` (what it does to the
phone call through Twilio's REST API), `CallCost` (what its tokens cost) and `CallTasks`:
the call owns every task it starts; when it returns, none is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.audio import FRAME_MS, MODEL_OUTPUT_RATE, CallerToModel, speech_level
from gateway.dtx import CallerDtx
from gateway.ending import (
    CallOutcome,
    Ending,
    EndReason,
    Finish,
    Plan,
    Prelude,
    answer_ending,
    answered_by_kind,
)
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
from gateway.metrics import AudioMetrics, CallMetrics, CostMetrics, Metrics
from gateway.personas import Persona
from gateway.playback import Speaker
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
)
from gateway.twilio.rest import CallControl, RestError
from gateway.usage import CallUsage
from gateway.watch import CallWatch, Move

__all__ = ["Call", "CallOutcome", "CallStats", "EndReason", "SendText"]

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]


@dataclass
class CallStats:
    """What happened on the call, for logs and tests (what was heard: `Call.playback`)."""

    started_at: float = field(default_factory=time.monotonic)
    caller_frames: int = 0
    barge_ins: int = 0
    resets: int = 0
    outcome: CallOutcome | None = None
    failure: str | None = None
    greeted: bool = False  # the greeting was played (on this stream or one before)
    answered_by: str | None = None  # the answering-machine result delivered (here or before)


class CallTasks:
    """The tasks a call starts besides its main four, so that none outlives it: most are
    cancelled when the call ends (`spawn`); a spend of the persona's money is awaited
    instead (`keep`), so the day's total counts every call that cost it."""

    def __init__(self) -> None:
        self._cancelled: set[asyncio.Task[object]] = set()
        self._awaited: set[asyncio.Task[object]] = set()

    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """A task cancelled (if still running) when the call ends."""
        self._add(self._cancelled, work, name)

    def keep(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """A task the call's end waits for."""
        self._add(self._awaited, work, name)

    @staticmethod
    def _add(
        tasks: set[asyncio.Task[object]], work: Coroutine[Any, Any, object], name: str
    ) -> None:
        task = asyncio.create_task(work, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def close(self, *others: asyncio.Task[Any]) -> None:
        """Cancel `others` and the spawned tasks, then wait for them and the kept ones."""
        for task in (*others, *self._cancelled):
            task.cancel()
        await asyncio.gather(*others, *self._cancelled, return_exceptions=True)
        await asyncio.gather(*self._awaited, return_exceptions=True)


class CallerAudio:
    """The caller's audio on its way to the model: converted to the model's rate
    (`gateway.audio`), sent in pieces of `batch_frames` Twilio frames, and with `dtx` its
    long silences withheld (`gateway.dtx`; the withheld seconds counted). Twilio's other
    messages stay the call's: `flush` sends what a piece holds before them."""

    def __init__(
        self, live: LiveSession, metrics: AudioMetrics, batch_frames: int, dtx: CallerDtx | None
    ) -> None:
        self._live = live
        self._convert = CallerToModel().convert
        self._batch = max(1, batch_frames)
        self._held: list[bytes] = []  # frames waiting to fill a piece (only when batching)
        self._held_since = 0.0
        self.dtx = dtx
        self._withheld = metrics.caller_withheld
        self._counted = 0  # frames withheld for good, in the metric

    async def frame(self, payload: bytes, received: float, level: float) -> None:
        """One 20 ms frame (mu-law) received at `received`, `level` its speech level
        (needed with dtx only)."""
        dtx = self.dtx
        if dtx is not None:
            out = dtx.feed(payload, level)
            if dtx.withheld_frames > self._counted:
                self._withheld.inc((dtx.withheld_frames - self._counted) * FRAME_MS / 1000)
                self._counted = dtx.withheld_frames
            if out.pause:
                await self.flush()
                await self._live.pause_audio()
            if not out.frames:
                return
            if len(out.frames) > 1:  # the pre-roll, then this frame
                payload = b"".join(out.frames)
        if self._batch > 1:
            held = self._held
            if not held:
                self._held_since = received
            held.append(payload)
            if len(held) >= self._batch:
                await self.flush()
            return
        pcm = self._convert(payload)
        if pcm:
            await self._live.send_audio(pcm, received)

    async def flush(self) -> None:
        """Send the piece held so far, if any."""
        if not self._held:
            return
        pcm = self._convert(b"".join(self._held))
        self._held.clear()
        if pcm:
            await self._live.send_audio(pcm, self._held_since)

    def close(self) -> None:
        """Count the silence dtx still held for a pre-roll the call's end never needed."""
        if self.dtx is not None:
            self._withheld.inc(self.dtx.held_frames * FRAME_MS / 1000)


class CallCost:
    """What the call's tokens cost: summed per call (`gateway.usage`), counted per persona
    in the metrics and, under a daily limit, added to the persona's spend today
    (`gateway.budget`), whose total the call's watch weighs."""

    def __init__(
        self,
        persona: str,
        prices: Mapping[str, float],
        metrics: CostMetrics,
        day_spend: Callable[[float], Awaitable[float | None]] | None,
    ) -> None:
        self.usage = CallUsage(prices=dict(prices))
        self._persona = persona
        self._metrics = metrics
        self._day_spend = day_spend

    def add(self, event: Usage) -> float:
        """Count one usage report; returns the USD it adds to the persona's spend today
        (0: nothing to add)."""
        persona = self._persona
        before = self.usage.cost_usd()
        for kind, tokens in self.usage.add(event).items():
            side, modality = kind.split("_", 1)
            self._metrics.tokens.labels(persona=persona, kind=side, modality=modality).inc(tokens)
        after = self.usage.cost_usd()
        if before is None or after is None:
            return 0.0
        self._metrics.usd.labels(persona=persona).inc(after - before)
        return after - before if self._day_spend is not None and after > before else 0.0

    async def spend(self, usd: float) -> float | None:
        """Add `usd` to the persona's spend today; the day's total, None if unknown."""
        return None if self._day_spend is None else await self._day_spend(usd)


class LineControl:
    """What the gateway does to the phone call through Twilio's REST API (hang up, a
    tool's request, recording) and, where that fails or there is no REST client, closing
    the stream itself (`closing`): nothing follows <Connect>, so Twilio then hangs up."""

    def __init__(
        self,
        control: CallControl | None,
        metrics: CallMetrics,
        transcript: CallTranscript,
        persona: str,
    ) -> None:
        self._control = control
        self._metrics = metrics
        self._transcript = transcript
        self._persona = persona
        self.closing = asyncio.Event()  # the gateway closes the stream itself

    async def hang_up(self, reason: str) -> None:
        """Hang up through the REST API; if that fails, close the stream."""
        self._metrics.hangups.labels(persona=self._persona, reason=reason).inc()
        self._transcript.event("hangup", reason=reason)
        if self._control is None:
            self.closing.set()
            return
        try:
            await self._control.hang_up()
        except RestError as exc:
            log.warning("hang-up (%s) failed: %s; closing the stream", reason, exc)
            self._metrics.rest_errors.labels(action="hang_up").inc()
            self.closing.set()

    async def run_tool(self, name: str, outcome: ToolOutcome, heard: bool) -> None:
        """The tool's REST request, once the caller heard the model; if it fails, close
        the stream."""
        assert outcome.action is not None
        log.info("tool %s: %s (reply heard: %s)", name, outcome.description, heard)
        self._metrics.hangups.labels(persona=self._persona, reason=name).inc()
        try:
            await outcome.action()
        except RestError as exc:
            log.warning("tool %s failed: %s", name, exc)
            self._metrics.rest_errors.labels(action=name).inc()
            self._transcript.event("tool_result", name=name, ok=False, error=str(exc))
            self.closing.set()
            return
        self._transcript.event("tool_result", name=name, ok=True, detail=outcome.description)

    async def record(self) -> None:
        """Ask Twilio to record the call (dual channel); its callback brings the URL."""
        assert self._control is not None
        try:
            sid = await self._control.record()
        except RestError as exc:
            log.warning("recording not started: %s", exc)
            self._metrics.rest_errors.labels(action="record").inc()
            self._transcript.event("recording", status="failed", error=str(exc))
            return
        log.info("recording %s started", sid)
        self._transcript.event("recording", status="started", recording_sid=sid)


class Call:
    """Joins a started Twilio stream to a Live session until either side ends: routes
    what each side sends, and makes the call's moves (the greeting, the watch's, the
    model's tools, who answered) and its ending; its parts carry them out."""

    def __init__(
        self,
        start: Start,
        live: LiveSession,
        send: SendText,
        metrics: Metrics,
        *,
        tools: CallTools | None = None,
        transcript: CallTranscript | None = None,
        hangup_wait_s: float = 20.0,
        batch_frames: int = 1,
        dtx: CallerDtx | None = None,
        persona: Persona | None = None,
        control: CallControl | None = None,
        token_prices: Mapping[str, float] | None = None,
        greeted: bool = False,
        age_s: float = 0.0,
        day_spend: Callable[[float], Awaitable[float | None]] | None = None,
    ) -> None:
        self.start = start
        self.live = live
        self.transcript = transcript or CallTranscript(None, start.call_sid)
        self.persona = persona or Persona(name="default", system_instruction="")
        self._metrics = metrics
        # A call handed off by another replica is `age_s` old: its duration limit goes on.
        self.stats = CallStats(started_at=time.monotonic() - age_s, greeted=greeted)
        self.cost = CallCost(self.persona.name, token_prices or {}, metrics.cost, day_spend)
        self.watch = CallWatch(self.persona.policy, self.stats.started_at)
        self.playback = Speaker(
            send,
            start.stream_sid,
            lambda: live.turn_state is TurnState.MODEL_SPEAKING,
            wait_limit_s=hangup_wait_s,
            on_sent=metrics.audio.added_latency.labels(direction="model_to_caller").observe,
        )
        self._audio = CallerAudio(live, metrics.audio, batch_frames, dtx)
        self._line = LineControl(control, metrics.calls, self.transcript, self.persona.name)
        self._ending = Ending()
        self._tools = tools
        self._tasks = CallTasks()
        self._early_answers: list[str] | None = []  # answered_by() before run(); None after

    @property
    def usage(self) -> CallUsage:
        """The call's tokens so far (`gateway.usage`)."""
        return self.cost.usage

    @property
    def greeted(self) -> bool:
        """The greeting was played (on this stream or one before)."""
        return self.stats.greeted

    @property
    def shutting_down(self) -> bool:
        """Set by the server when a drain runs out of time: the stream's close is a shutdown."""
        return self._ending.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self._ending.shutting_down = value

    async def run(self, inbound: AsyncIterator[InboundMessage]) -> CallOutcome:
        """Run the call until the caller hangs up, the stream breaks or Live fails."""
        live_task = asyncio.create_task(self.live.run(), name="live")
        caller_task = asyncio.create_task(self._caller_to_model(inbound), name="caller")
        model_task = asyncio.create_task(self._model_to_caller(), name="model")
        end_task = asyncio.create_task(self._line.closing.wait(), name="end")
        tasks = (live_task, caller_task, model_task, end_task)
        # The call counts its Live connections: later ones from `Resumed`, the first here.
        first_task = asyncio.create_task(self._count_first_connection(), name="first-conn")
        self._metrics.calls.active.inc()
        log.info("call started")
        if self.watch.timed:
            self._spawn(self._watch_loop(), "watch")
        if self.persona.policy.record:
            self._spawn(self._line.record(), "record")
        if self.persona.greeting and not self.stats.greeted:
            self.transcript.event("greeting", text=self.persona.greeting)
            await self.live.send_text(self.persona.greeting)
            self.stats.greeted = True
        early, self._early_answers = self._early_answers or [], None
        for answered_by in early:
            self.answered_by(answered_by)
        protocol_error: StreamProtocolError | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if caller_task in done:
                error = caller_task.exception()
                if isinstance(error, StreamProtocolError):
                    self.stats.failure = error.reason
                    protocol_error = error
                    self.end(EndReason.PROTOCOL_ERROR)
                elif error is not None:
                    raise error
                else:
                    self.end(caller_task.result())
            elif live_task in done:
                self._live_failed(live_task.exception())
            elif model_task in done:
                error = model_task.exception()
                if error is not None:
                    raise error
            elif end_task in done:
                self._ending.closed()
        except asyncio.CancelledError:
            self.end(EndReason.SHUTDOWN)
            raise
        finally:
            self.live.close()
            await self._tasks.close(*tasks, first_task)
            self._audio.close()
            self._metrics.calls.active.dec()
            self.stats.outcome = outcome = self._ending.outcome or CallOutcome.HANGUP
            self._log_end(outcome)
        if protocol_error is not None:
            raise protocol_error
        return outcome

    def _live_failed(self, error: BaseException | None) -> None:
        if isinstance(error, LiveSessionFailed):
            reason = error.detail
        elif error is not None:
            reason = type(error).__name__
        else:
            reason = "live session ended"
        self.stats.failure = reason
        self._metrics.live.errors.labels(reason=_reason_label(error)).inc()
        log.warning("call ended: live session failed: %s", reason)
        self.end(EndReason.LIVE_FAILED)

    def _log_end(self, outcome: CallOutcome) -> None:
        """The transcript's end line, the call metrics and the call-ended log line."""
        heard = self.playback.state
        ended_by = self._ending.ended_by
        usage = self.usage.summary()
        self.transcript.close(
            outcome=outcome.value,
            replies_heard=heard.replies_heard,
            barge_ins=self.stats.barge_ins,
            resets=self.stats.resets,
            **({"ended_by": ended_by.value} if ended_by else {}),
            usage=usage,
        )
        self._metrics.calls.ended.labels(outcome=outcome.value).inc()
        if outcome is not CallOutcome.HANDED_OFF:  # once per call: where it really ends
            self._metrics.calls.duration.observe(time.monotonic() - self.stats.started_at)
        cost = usage.get("cost_usd")
        log.info(
            "call ended (%s): %d replies sent, %d heard, %d barge-ins, %d resets, "
            "%d tokens (%d prompt, %d response)%s",
            outcome.value,
            heard.replies_sent,
            heard.replies_heard,
            self.stats.barge_ins,
            self.stats.resets,
            self.usage.total_tokens,
            self.usage.prompt_tokens,
            self.usage.response_tokens,
            f", ${cost:.4f}" if cost is not None else "",
            extra={
                "persona": self.persona.name,
                **usage,
                "ended_by": ended_by.value if ended_by else None,
            },
        )

    async def _count_first_connection(self) -> None:
        await self.live.wait_started()
        self._metrics.live.connections.labels(kind="fresh").inc()

    # ------------------------------------------------------------ caller side

    async def _caller_to_model(self, inbound: AsyncIterator[InboundMessage]) -> EndReason:
        frames = self._metrics.audio.caller_frames
        audio = self._audio
        listen = self.watch.listens  # caller speech restarts the silence watch
        watch = self.watch
        level_needed = listen or audio.dtx is not None
        async for message in inbound:
            if type(message) is Media:
                received = time.monotonic()
                self.stats.caller_frames += 1
                frames.inc()
                payload = message.payload
                level = speech_level(payload) if level_needed else 0
                if listen and level > SPEECH_RMS:  # every frame, held or not
                    watch.caller_spoke(received)
                await audio.frame(payload, received, level)
            elif isinstance(message, Mark):
                if self.playback.mark(message.name):
                    self._bot_quiet()
            elif isinstance(message, Dtmf):
                await audio.flush()  # the key press follows the audio before it
                self.transcript.event("dtmf", digit=message.digit)
                await self.live.send_text(f"The caller pressed the key {message.digit}.")
            elif isinstance(message, Stop):
                await audio.flush()  # the caller's last words, not dropped with the piece
                return EndReason.COMPLETED
        await audio.flush()
        return EndReason.HANGUP

    def _bot_quiet(self) -> None:
        """The caller has heard all the bot said: the silence watch may start counting."""
        self.watch.bot_quiet(time.monotonic())

    # ------------------------------------------------------------- model side

    async def _model_to_caller(self) -> None:
        model_audio_s = self._metrics.audio.model_audio
        playback = self.playback
        async for event in self.live.events():
            if type(event) is ModelAudio:
                if not playback.state.in_turn:
                    self.watch.bot_speaking()
                await playback.play(event.pcm, event.received_at)
                model_audio_s.inc(len(event.pcm) / (2 * MODEL_OUTPUT_RATE))
            elif isinstance(event, Interrupted):
                playback.turn_cut()
                await self._clear_playback()
                self.stats.barge_ins += 1
                self._metrics.calls.barge_ins.inc()
                self.transcript.event("interrupted")
            elif isinstance(event, ReplyAbandoned):
                playback.turn_cut()
                await self._clear_playback()
                self.transcript.event("reply_lost", cause=event.cause.value)
            elif isinstance(event, RepeatSkipped):
                self._metrics.live.repeats_skipped.inc()
                self.transcript.event("repeat_skipped", held_s=round(event.held_s, 3))
            elif isinstance(event, GenerationComplete | TurnComplete):
                await playback.end_reply()
                if isinstance(event, TurnComplete):
                    playback.turn_complete()
                    self.transcript.flush_turn(speaker="model")
            elif isinstance(event, Resumed):
                self._on_resumed(event)
            elif isinstance(event, GoAwayReceived):
                self._metrics.live.goaway.inc()
            elif isinstance(event, AudioDropped):
                self._metrics.audio.caller_dropped.labels(reason="replay_overflow").inc(
                    event.seconds
                )
            elif isinstance(event, Transcript):
                self.transcript.piece(event.role, event.text)
            elif isinstance(event, ToolCall):
                await self._on_tool_call(event)
            elif isinstance(event, Usage):
                self._on_usage(event)

    async def _clear_playback(self) -> None:
        """Barge-in: Twilio drops its queue at once; our resampler forgets the old reply."""
        await self.playback.clear()
        self._bot_quiet()

    def _on_resumed(self, event: Resumed) -> None:
        self.transcript.event(
            "reset",
            cause=event.cause.value,
            gap_s=round(event.gap_s, 3),
            replayed_s=round(event.replayed_s, 3),
            fresh=event.fresh,
        )
        self.stats.resets += 1
        cause = event.cause.value
        self._metrics.live.resumptions.labels(cause=cause).inc()
        self._metrics.live.connections.labels(kind="fallback" if event.fresh else "resumed").inc()
        self._metrics.live.reset_gap.labels(cause=cause).observe(event.gap_s)
        self._metrics.live.replayed_audio.labels(cause=cause).observe(event.replayed_s)
        if event.mode:
            self._metrics.live.switches.labels(mode=event.mode).inc()

    # ------------------------------------------------------------ usage, limits

    def _on_usage(self, event: Usage) -> None:
        usd = self.cost.add(event)
        if usd:
            self._tasks.keep(self._spend(usd), "spend")
        move = self.watch.tokens(self.usage.total_tokens, self.usage.cost_usd())
        if move is not None:
            self._move(move)

    async def _spend(self, usd: float) -> None:
        """Add to the persona's spend today; wrap up once the day is over its limit."""
        total = await self.cost.spend(usd)
        move = None if total is None else self.watch.day_cost(total)
        if move is not None:
            log.info("persona %s over its day's limit: $%.4f", self.persona.name, total)
            self._move(move)

    async def _watch_loop(self) -> None:
        """Make the silence and duration moves when they fall due."""
        while True:
            move, wake = self.watch.due(time.monotonic())
            if move is not None:
                self._move(move)
                continue
            await self.playback.changes.wait(wake)  # the bot quiet moves the silence watch

    def _move(self, move: Move) -> None:
        policy = self.persona.policy
        if move is Move.CHECK_IN:
            log.info("caller silent for %.0f s: checking in", policy.silence_timeout_s)
            self._spawn(self._instruct(move.value, policy.silence_prompt), "check-in")
        elif move is Move.SILENCE:
            self.end(EndReason.SILENCE, policy.silence_goodbye)
        elif move is Move.WRAP_UP_DURATION:
            self.end(EndReason.MAX_DURATION, policy.wrap_up)
        elif move is Move.WRAP_UP_TOKENS:
            self.end(EndReason.MAX_TOKENS, policy.wrap_up)
        elif move is Move.WRAP_UP_COST:
            self.end(EndReason.MAX_COST, policy.wrap_up)
        elif move is Move.WRAP_UP_DAY_COST:
            self.end(EndReason.MAX_DAY_COST, policy.wrap_up)
        elif move is Move.LIMIT:  # whatever is happening, even another ending
            self.end(EndReason.DURATION_LIMIT)

    async def _instruct(self, reason: str, text: str) -> float:
        """Tell the model something as a text turn; returns when it was sent."""
        self.transcript.event("instruction", reason=reason, text=text)
        sent = time.monotonic()
        await self.live.send_text(text)
        return sent

    # ----------------------------------------------------------------- ending

    def end(self, reason: EndReason, say: str = "", *, tool: ToolOutcome | None = None) -> bool:
        """Begin ending the call for `reason`: every ending starts here.

        `say` is the instruction for the model when the reason's prelude says something;
        `tool` the tool whose REST request ends the call. What follows is `_carry_out`'s.
        False when the call is already ending (the reason is dropped).
        """
        plan = self._ending.begin(reason, say)
        if plan is None:
            return False
        self.watch.ending = True
        if plan.finish is not Finish.NONE:
            self._spawn(self._carry_out(plan, tool), f"end-{reason.value}")
        return True

    def at_pause(self) -> bool:
        """Both sides quiet, nothing the caller has yet to hear, no ending under way, and
        the newest handle holds the whole conversation: a moment to hand the call off."""
        live = self.live
        return (
            self._ending.reason is None
            and live.turn_state is TurnState.IDLE
            and not live.caller_speaking
            and not self.playback.state.playing(model_speaking=False)
            and live.machine.handle_current
        )

    def hand_off(self) -> bool:
        """Close the stream so that the call goes on on another replica (the server saved
        what it needs first); False when the call is ending already."""
        return self.end(EndReason.HANDED_OFF)

    async def _carry_out(self, plan: Plan, tool: ToolOutcome | None) -> None:
        """The plan's prelude (what the caller hears first), then its finish."""
        reason = plan.reason.value
        heard = True
        if plan.prelude is Prelude.LAST_WORDS:
            heard = await self.playback.wait_heard()
        elif plan.prelude in (Prelude.SAY, Prelude.SAY_NOW):
            log.info("ending the call (%s)", reason)
            if plan.say:
                if plan.prelude is Prelude.SAY_NOW:  # what plays is moot (a machine)
                    await self._clear_playback()
                else:  # let the model finish what it is saying first
                    await self.playback.wait_quiet()
                sent = await self._instruct(reason, plan.say)
                await self.playback.wait_heard(turn_after=sent)
        if plan.finish is Finish.CLOSE:
            log.info("handing the call off")
            self._line.closing.set()
        elif plan.finish is Finish.HANG_UP:
            await self._line.hang_up(reason)
        elif plan.finish is Finish.TOOL and tool is not None:
            await self._line.run_tool(reason, tool, heard)

    def answered_by(self, answered_by: str) -> None:
        """Twilio's answering-machine detection result for this (outbound) call.

        A machine gets the persona's voicemail message (the model says it after the
        machine's greeting, then the call ends once it was heard), or a hang-up when the
        persona has none; a fax a hang-up; a person (or unknown) the call as usual. A
        result before `run` waits for the greeting to be sent.
        """
        if self._early_answers is not None:
            self._early_answers[:] = [answered_by]
            return
        kind = answered_by_kind(answered_by)
        self.stats.answered_by = answered_by
        log.info("answered by %s", answered_by or "unknown")
        self.transcript.event("answered_by", answered_by=answered_by, result=kind)
        self._metrics.calls.answered_by.labels(persona=self.persona.name, answered_by=kind).inc()
        voicemail = self.persona.policy.voicemail
        reason = answer_ending(kind, voicemail)
        if reason is not None:
            self.end(reason, voicemail)

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """A task of the call's own; cancelled (if still running) when the call ends."""
        self._tasks.spawn(work, name)

    # ------------------------------------------------------------------ tools

    async def _on_tool_call(self, event: ToolCall) -> None:
        """Answer the model now; a tool that ends the call begins its ending first."""
        self.transcript.event("tool_call", name=event.name, args=event.args)
        if self._tools is None:
            outcome = ToolOutcome({"error": f"unknown function {event.name}"})
        elif self._ending.reason is not None:
            outcome = ToolOutcome({"error": "the call is already ending"})
        else:
            outcome = self._tools.prepare(event)
        if outcome.ends is not None:
            self.end(outcome.ends, tool=outcome)
        await self.live.send_tool_response(event.call_id, event.name, outcome.response)
        if outcome.action is None:
            log.info("tool %s declined: %s", event.name, outcome.response.get("error"))
            self.transcript.event("tool_result", name=event.name, ok=False, **outcome.response)


def _reason_label(error: BaseException | None) -> str:
    if isinstance(error, LiveSessionFailed):
        return error.reason.value
    return "error" if error is not None else "ended"
