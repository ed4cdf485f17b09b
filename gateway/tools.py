"""Functions the model may call on a phone call: their declarations and their outcomes.

* `end_call`: the call ends once the caller has heard what the model said (its goodbye):
  `calls(sid).update(status="completed")`.
* `transfer_call`: once the caller has heard the model's last words, the call is redirected
  to TwiML `<Dial>` a configured number or SIP address: `calls(sid).update(twiml=...)`.
  Twilio then ends the media stream.

The model gets its `tool_response` at once (so it can finish speaking); the REST request
waits for playback, which the call knows from Twilio's marks. The requests themselves and
the TwiML they carry are Twilio's side (`gateway.twilio.rest`, `gateway.twilio.twiml`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.genai import types

from gateway.config import ToolName
from gateway.ending import EndReason
from gateway.live.events import ToolCall
from gateway.twilio.rest import CallControl
from gateway.twilio.twiml import dial_twiml, whisper_url

log = logging.getLogger(__name__)

END_CALL: ToolName = "end_call"
TRANSFER_CALL: ToolName = "transfer_call"


def declarations(
    tools: tuple[ToolName, ...], transfer_to: Mapping[str, str]
) -> tuple[types.Tool, ...]:
    """The Live API tool declarations for a persona's tools (empty: no function calling)."""
    functions: list[types.FunctionDeclaration] = []
    if END_CALL in tools:
        functions.append(
            types.FunctionDeclaration(
                name=END_CALL,
                description=(
                    "Hang up the phone call. Say goodbye first; the line is cut once the "
                    "caller has heard everything you said. Use it when the caller is done or "
                    "asks to end the call."
                ),
                parameters=types.Schema(
                    type=types.Type.OBJECT,
                    properties={
                        "reason": types.Schema(
                            type=types.Type.STRING, description="Why the call ends, briefly."
                        )
                    },
                ),
            )
        )
    if TRANSFER_CALL in tools:
        names = sorted(transfer_to)
        functions.append(
            types.FunctionDeclaration(
                name=TRANSFER_CALL,
                description=(
                    "Transfer the caller to a person or department. Tell the caller first; "
                    "the transfer happens once they have heard you. Destinations: "
                    + ", ".join(names)
                    + "."
                ),
                parameters=types.Schema(
                    type=types.Type.OBJECT,
                    properties={
                        "destination": types.Schema(
                            type=types.Type.STRING,
                            enum=names,
                            description="Where to transfer the caller.",
                        ),
                        "summary": types.Schema(
                            type=types.Type.STRING,
                            description=(
                                "One or two sentences for the person who answers, heard "
                                "before the caller is connected: who is calling and what "
                                "they need, so the caller does not have to repeat it."
                            ),
                        ),
                    },
                    required=["destination"] if len(names) > 1 else None,
                ),
            )
        )
    if not functions:
        return ()
    return (types.Tool(function_declarations=functions),)


Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ToolOutcome:
    """What to answer the model now, and the REST request that ends the call once the
    caller heard it (declined: none)."""

    response: dict[str, object]
    action: Action | None = None
    description: str = ""  # for logs and the transcript
    ends: EndReason | None = None  # the call's ending, with `action`


class CallTools:
    """The tools of one call: checks the model's request, builds the REST action.

    With `whisper_base` (PUBLIC_URL/twilio/whisper) a transfer with a summary is warm:
    the person who answers hears the summary before the caller is connected.
    """

    def __init__(
        self,
        control: CallControl,
        *,
        tools: tuple[ToolName, ...],
        transfer_to: Mapping[str, str],
        whisper_base: str = "",
        language: str | None = None,
    ) -> None:
        self._control = control
        self._tools = tools
        self._transfer_to = dict(transfer_to)
        self._whisper_base = whisper_base
        self._language = language
        self._ending = False

    def prepare(self, call: ToolCall) -> ToolOutcome:
        """Answer a tool call. Once the call is ending, further requests are declined."""
        if call.name not in self._tools:
            return ToolOutcome({"error": f"unknown function {call.name}"})
        if self._ending:
            return ToolOutcome({"error": "the call is already ending"})
        if call.name == END_CALL:
            self._ending = True
            return ToolOutcome(
                {"result": "The call ends once the caller has heard you."},
                action=self._control.hang_up,
                description="hang up",
                ends=EndReason.END_CALL,
            )
        destination = str(call.args.get("destination") or "")
        if not destination and len(self._transfer_to) == 1:
            destination = next(iter(self._transfer_to))
        target = self._transfer_to.get(destination)
        if target is None:
            choices = ", ".join(sorted(self._transfer_to))
            return ToolOutcome({"error": f"unknown destination; choose one of: {choices}"})
        self._ending = True
        summary = " ".join(str(call.args.get("summary") or "").split())
        whisper = ""
        if summary and self._whisper_base:
            whisper = whisper_url(self._whisper_base, summary, self._language)
        twiml = dial_twiml(target, whisper)
        return ToolOutcome(
            {"result": f"Transferring to {destination} once the caller has heard you."},
            action=lambda: self._control.redirect(twiml),
            description=f"transfer to {destination}" + (" with a summary" if whisper else ""),
            ends=EndReason.TRANSFER,
        )
