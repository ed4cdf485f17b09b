"""A phone call: one Twilio media stream joined to one Live conversation.

Caller audio: Twilio `media` (8 kHz mu-law, 20 ms) -> PCM 16 kHz -> LiveSession.
Model audio: LiveSession (24 kHz PCM) -> 8 kHz mu-law -> Twilio `media`, with a
`mark` at the end of each reply so the call knows what the caller has heard.
Barge-in: on `interrupted` the call sends Twilio `clear` at once and drops
whatever of the old reply is still in the resampler.
Tools (`end_call`, `transfer_call`): the model gets its answer at once; the REST
request waits until the caller has heard what the model said (the marks tell).

The call owns every task it starts; when it returns, none is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.audio import MODEL_OUTPUT_RATE, CallerToModel, ModelToCaller
from gateway.live.events import (
    AudioDropped,
    GenerationComplete,
    GoAwayReceived,
    Interrupted,
    ModelAudio,
    ReplyAbandoned,
    Resumed,
    ToolCall,
    Transcript,
    TurnComplete,
    TurnState,
)
from gateway.live.session import LiveSession, LiveSessionFailed
from gateway.metrics import Metrics
from gateway.tools import CallTools, RestError, ToolOutcome
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

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]


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
        self._tool_tasks: set[asyncio.Task[None]] = set()
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
        if self._greeting:
            self.transcript.event("greeting", text=self._greeting)
            self.live.send_text(self._greeting)
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
                    reason = error.reason
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
            self.transcript.close(
                outcome=outcome.value,
                replies_heard=self.stats.replies_heard,
                barge_ins=self.stats.barge_ins,
                resets=self.stats.resets,
            )
            self._metrics.calls.labels(outcome=outcome.value).inc()
            self._metrics.call_duration.observe(time.monotonic() - self.started_at)
            log.info(
                "call ended (%s): %d replies sent, %d heard, %d barge-ins, %d resets",
                outcome.value,
                self.stats.replies_sent,
                self.stats.replies_heard,
                self.stats.barge_ins,
                self.stats.resets,
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

        def send_held() -> None:
            pcm = convert(b"".join(held))
            held.clear()
            if pcm:
                send_audio(pcm, held_since)

        async for message in inbound:
            if type(message) is Media:
                received = time.monotonic()
                self.stats.caller_frames += 1
                frames.inc()
                if batch > 1:
                    if not held:
                        held_since = received
                    held.append(message.payload)
                    if len(held) >= batch:
                        send_held()
                    continue
                pcm = convert(message.payload)
                if pcm:
                    send_audio(pcm, received)
            elif isinstance(message, Mark):
                self._on_mark(message.name)
            elif isinstance(message, Dtmf):
                if held:
                    send_held()  # the key press follows the audio before it
                self.transcript.event("dtmf", digit=message.digit)
                self.live.send_text(f"The caller pressed the key {message.digit}.")
            elif isinstance(message, Stop):
                return CallOutcome.COMPLETED
        return CallOutcome.HANGUP

    def _on_mark(self, name: str) -> None:
        if name in self.stats.marks_pending:
            self.stats.marks_pending.discard(name)
            if name.startswith("reply-"):
                self.stats.replies_heard += 1

    # ------------------------------------------------------------- model side

    async def _model_to_caller(self) -> None:
        model_audio_s = self._metrics.model_audio
        latency = self._metrics.added_latency.labels(direction="model_to_caller")
        async for event in self.live.events():
            if type(event) is ModelAudio:
                ulaw = self._model_audio.convert(event.pcm)
                self._reply_open = True
                self._model_audio_at = event.received_at
                if ulaw:
                    await self._send(media_message(self._stream_sid, ulaw))
                    latency.observe(time.monotonic() - event.received_at)
                model_audio_s.inc(len(event.pcm) / (2 * MODEL_OUTPUT_RATE))
            elif isinstance(event, Interrupted):
                await self._clear_playback()
                self.stats.barge_ins += 1
                self._metrics.barge_ins.inc()
                self.transcript.event("interrupted")
            elif isinstance(event, ReplyAbandoned):
                await self._clear_playback()
                self.transcript.event("reply_lost", cause=event.cause.value)
            elif isinstance(event, GenerationComplete | TurnComplete):
                await self._end_reply()
                if isinstance(event, TurnComplete):
                    self._turns_completed += 1
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

    # ------------------------------------------------------------------ tools

    async def _on_tool_call(self, event: ToolCall) -> None:
        """Answer the model now; run the REST action once the caller heard the reply."""
        self.transcript.event("tool_call", name=event.name, args=event.args)
        if self._tools is None:
            outcome = ToolOutcome({"error": f"unknown function {event.name}"})
        else:
            outcome = self._tools.prepare(event)
        await self.live.send_tool_response(event.call_id, event.name, outcome.response)
        action = outcome.action
        if action is None:
            log.info("tool %s declined: %s", event.name, outcome.response.get("error"))
            self.transcript.event("tool_result", name=event.name, ok=False, **outcome.response)
            return

        async def run_when_heard() -> None:
            heard = await self.wait_heard()
            log.info("tool %s: %s (reply heard: %s)", event.name, outcome.description, heard)
            try:
                await action()
            except RestError as exc:
                log.warning("tool %s failed: %s", event.name, exc)
                self.transcript.event("tool_result", name=event.name, ok=False, error=str(exc))
                if outcome.ends_call:
                    self._end_stream.set()  # no verb follows <Connect>: Twilio hangs up
                return
            self.transcript.event(
                "tool_result", name=event.name, ok=True, detail=outcome.description
            )

        task = asyncio.create_task(run_when_heard(), name=f"tool-{event.name}")
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    async def wait_heard(self, settle_s: float = 1.0, poll_s: float = 0.05) -> bool:
        """Wait until the caller has heard everything the model said, and it says no more.

        Done when no reply is playing or unconfirmed (every mark echoed) and the model's
        turn is over: a turn completed since the wait began, or `settle_s` passed without
        model audio (the model may speak after a tool response). False on the time limit.
        """
        began = time.monotonic()
        turns = self._turns_completed
        deadline = began + self._hangup_wait_s
        while True:
            now = time.monotonic()
            playing = (
                self._reply_open
                or bool(self.stats.marks_pending)
                or self.live.turn_state is TurnState.MODEL_SPEAKING
            )
            quiet = now - max(began, self._model_audio_at) >= settle_s
            if not playing and (self._turns_completed > turns or quiet):
                return True
            if now >= deadline:
                return False
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


def _reason_label(error: BaseException | None) -> str:
    if isinstance(error, LiveSessionFailed):
        return "unreachable" if "unreachable" in error.reason else "failed"
    return "error" if error is not None else "ended"
