"""From a started media stream to a `Call`: what a call is built from, in one place.

The persona the voice webhook chose (its name comes back in the stream's `start`), the Live
options (that persona and `Settings.live`), the persona's tools and the call's transcript.
The factory holds the app's long-lived clients; the server owns them (creates and closes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from google import genai

from gateway.audio import FRAME_MS
from gateway.budget import DayBudget
from gateway.call import Call, SendText
from gateway.config import Settings
from gateway.dtx import CallerDtx
from gateway.live.session import LiveOptions, LiveSession
from gateway.metrics import Metrics
from gateway.personas import Persona, PersonaTable
from gateway.store import CallState
from gateway.tools import CallTools, declarations
from gateway.transcript import CallTranscript
from gateway.twilio.protocol import Start
from gateway.twilio.rest import CallControl, TwilioRest
from gateway.usage import prices_for

#: The stream `<Parameter>` (and the voice webhook's `?persona=`) naming the persona.
PERSONA_PARAMETER = "persona"


def live_options(settings: Settings, persona: Persona) -> LiveOptions:
    """The Live session options of a call answered by `persona`."""
    return LiveOptions(
        model=persona.model,
        system_instruction=persona.system_instruction,
        voice=persona.voice,
        language=persona.language,
        tools=declarations(persona.tools, persona.transfer_to),
        settings=settings.live,
        model_settings=persona.model_settings,
    )


@dataclass(frozen=True)
class CallFactory:
    """Builds each call of the app from its started stream."""

    settings: Settings
    personas: PersonaTable
    client: genai.Client
    rest: TwilioRest  # Twilio's REST API, for the tools
    metrics: Metrics
    budget: DayBudget | None = None  # each persona's spend per day (max_day_usd)

    def build(
        self,
        start: Start,
        send: SendText,
        *,
        resume: CallState | None = None,
        turns: Sequence[tuple[str, str]] = (),
    ) -> Call:
        """The call for a stream whose `start` was accepted; `send` writes to the caller.

        `resume`: the state of a call another replica handed off; its Live session goes on
        from the stored handle (`turns` brief a fresh one if the handle is refused) and
        the greeting is not played again."""
        settings = self.settings
        persona = self.personas.get(start.custom_parameters.get(PERSONA_PARAMETER))
        latency = self.metrics.audio.added_latency.labels(direction="caller_to_model")
        live = LiveSession(
            self.client, live_options(settings, persona), on_audio_sent=latency.observe
        )
        if resume is not None and resume.handle is not None:
            live.machine.continue_from(resume.handle, resume.handle_replies, turns)
        control = CallControl(self.rest, start.account_sid, start.call_sid, settings.public_url)
        tools = None
        if persona.tools:
            tools = CallTools(
                control,
                tools=persona.tools,
                transfer_to=persona.transfer_to,
                whisper_base=f"{settings.public_url}/twilio/whisper",
                language=persona.language,
            )
        transcript = CallTranscript(settings.transcript_dir, start.call_sid)
        transcript.event("start", persona=persona.name, stream_sid=start.stream_sid)
        call = Call(
            start,
            live,
            send,
            self.metrics,
            tools=tools,
            transcript=transcript,
            hangup_wait_s=settings.hangup_wait_s,
            batch_frames=settings.caller_audio_batch_ms // FRAME_MS,
            # Only where a pause can be told to the service (audioStreamEnd; not Vertex AI):
            # else a turn replayed into a new connection while paused would wait for
            # silence that never comes.
            dtx=CallerDtx()
            if settings.silence_suppression and live.profile.audio_stream_end
            else None,
            persona=persona,
            control=control,
            token_prices=prices_for(persona.model, settings.token_prices),
            greeted=resume is not None and resume.greeted,
            age_s=resume.age_s + max(0.0, time.time() - resume.handed_off_at) if resume else 0.0,
            day_spend=self.budget.adder(persona.name)
            if self.budget is not None and persona.policy.max_day_usd
            else None,
        )
        if resume is not None:
            call.usage.carry_on(resume.usage)  # a token limit counts the whole call
            since_s = max(0.0, time.time() - resume.handed_off_at)
            call.watch.carry_on(resume.watch, time.monotonic(), since_s)  # its schedule
            call.stats.answered_by = resume.answered_by
        return call
