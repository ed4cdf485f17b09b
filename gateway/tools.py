"""Functions the model may call on a phone call, and the Twilio REST requests behind them.

* `end_call`: the call ends once the caller has heard what the model said (its goodbye):
  `calls(sid).update(status="completed")`.
* `transfer_call`: once the caller has heard the model's last words, the call is redirected
  to TwiML `<Dial>` a configured number or SIP address: `calls(sid).update(twiml=...)`.
  Twilio then ends the media stream.

The model gets its `tool_response` at once (so it can finish speaking); the REST request
waits for playback, which the call knows from Twilio's marks. REST requests are made with
the call's own account SID and TWILIO_AUTH_TOKEN through the twilio library's aiohttp
client; tests hand `TwilioRest` an HTTP client aimed at a local stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from google.genai import types
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import Dial, VoiceResponse

from gateway.config import ToolName
from gateway.live.events import ToolCall

log = logging.getLogger(__name__)

END_CALL: ToolName = "end_call"
TRANSFER_CALL: ToolName = "transfer_call"
REST_TIMEOUT_S = 10.0


class RestError(Exception):
    """A Twilio REST request failed; the message is safe to log."""


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
                        )
                    },
                    required=["destination"] if len(names) > 1 else None,
                ),
            )
        )
    if not functions:
        return ()
    return (types.Tool(function_declarations=functions),)


def dial_twiml(target: str) -> str:
    """TwiML handing the call to a number or SIP address."""
    response = VoiceResponse()
    if target.lower().startswith("sip:"):
        dial = Dial()
        dial.sip(target)
        response.append(dial)
    else:
        response.dial(target)
    return str(response)


class TwilioRest:
    """The Twilio REST requests the gateway makes, one aiohttp client for all of them.

    `http_client` is a twilio `AsyncHttpClient`; the default talks to api.twilio.com.
    """

    def __init__(self, auth_token: str, *, http_client: Any = None) -> None:
        self._auth_token = auth_token
        self._http = http_client
        self._clients: dict[str, Any] = {}

    def client(self, account_sid: str) -> Any:
        """A twilio `Client` for the account (created in the running loop: aiohttp)."""
        if self._http is None:
            self._http = AsyncTwilioHttpClient(timeout=REST_TIMEOUT_S)
        found = self._clients.get(account_sid)
        if found is None:
            found = Client(account_sid, self._auth_token, http_client=self._http)
            self._clients[account_sid] = found
        return found

    async def hang_up(self, account_sid: str, call_sid: str) -> None:
        await self._call(account_sid, call_sid, status="completed")

    async def redirect(self, account_sid: str, call_sid: str, twiml: str) -> None:
        await self._call(account_sid, call_sid, twiml=twiml)

    async def create_call(self, account_sid: str, **params: Any) -> str:
        """Place a call; returns its SID."""
        try:
            call = await self.client(account_sid).calls.create_async(**params)
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RestError(_rest_failure(exc)) from None
        return str(call.sid)

    async def _call(self, account_sid: str, call_sid: str, **params: Any) -> None:
        try:
            await self.client(account_sid).calls(call_sid).update_async(**params)
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RestError(_rest_failure(exc)) from None

    async def close(self) -> None:
        if self._http is not None and hasattr(self._http, "close"):
            await self._http.close()


def _rest_failure(exc: BaseException) -> str:
    """What went wrong with a REST request, safe to log: the HTTP status and Twilio's error
    code, or the exception's type (never its text, which may quote the request)."""
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    if status is not None:
        return f"HTTP {status}" + (f" (Twilio error {code})" if code else "")
    return type(exc).__name__


Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ToolOutcome:
    """What to answer the model now, and what to do once the caller heard it (if anything)."""

    response: dict[str, object]
    action: Action | None = None
    description: str = ""  # for logs and the transcript
    ends_call: bool = False


class CallTools:
    """The tools of one call: checks the model's request, builds the REST action."""

    def __init__(
        self,
        rest: TwilioRest,
        *,
        account_sid: str,
        call_sid: str,
        tools: tuple[ToolName, ...],
        transfer_to: Mapping[str, str],
    ) -> None:
        self._rest = rest
        self._account_sid = account_sid
        self._call_sid = call_sid
        self._tools = tools
        self._transfer_to = dict(transfer_to)
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
                action=lambda: self._rest.hang_up(self._account_sid, self._call_sid),
                description="hang up",
                ends_call=True,
            )
        destination = str(call.args.get("destination") or "")
        if not destination and len(self._transfer_to) == 1:
            destination = next(iter(self._transfer_to))
        target = self._transfer_to.get(destination)
        if target is None:
            choices = ", ".join(sorted(self._transfer_to))
            return ToolOutcome({"error": f"unknown destination; choose one of: {choices}"})
        self._ending = True
        twiml = dial_twiml(target)
        return ToolOutcome(
            {"result": f"Transferring to {destination} once the caller has heard you."},
            action=lambda: self._rest.redirect(self._account_sid, self._call_sid, twiml),
            description=f"transfer to {destination}",
            ends_call=True,
        )
