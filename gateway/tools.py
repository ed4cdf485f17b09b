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
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

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
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
MAX_SUMMARY_CHARS = 600  # what the person taking a transfer hears, at most (a URL carries it)


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


def dial_twiml(target: str, whisper_url: str = "") -> str:
    """TwiML handing the call to a number or SIP address.

    With `whisper_url` the person who answers first hears the TwiML served there (the
    gateway's `/twilio/whisper`: the model's summary), then the caller is connected.
    """
    response = VoiceResponse()
    dial = Dial()
    extra = {"url": whisper_url, "method": "POST"} if whisper_url else {}
    if target.lower().startswith("sip:"):
        dial.sip(target, **extra)
    else:
        dial.number(target, **extra)
    response.append(dial)
    return str(response)


def whisper_twiml(summary: str, language: str | None) -> str:
    """The whisper: the summary said to the person who answers (nothing if there is none)."""
    response = VoiceResponse()
    if summary.strip():
        if language and _LANGUAGE.match(language):
            response.say(summary, language=language)
        else:
            response.say(summary)
    return str(response)


def whisper_url(base: str, summary: str, language: str | None) -> str:
    """The whisper TwiML's URL: the summary rides in it (Twilio signs the whole URL), so
    whichever replica Twilio asks can answer."""
    query = {"summary": summary[:MAX_SUMMARY_CHARS]}
    if language:
        query["language"] = language
    return f"{base}?{urlencode(query)}"


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

    async def record(self, account_sid: str, call_sid: str, status_callback: str) -> str:
        """Start a dual-channel recording of the call; returns the recording's SID."""
        try:
            recording = await (
                self.client(account_sid)
                .calls(call_sid)
                .recordings.create_async(
                    recording_channels="dual",
                    recording_status_callback=status_callback,
                    recording_status_callback_method="POST",
                    recording_status_callback_event=["completed", "absent"],
                )
            )
        except (TwilioException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RestError(_rest_failure(exc)) from None
        return str(recording.sid)

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


@dataclass(frozen=True)
class CallControl:
    """The REST requests the gateway makes about one call on its own (not for a tool)."""

    rest: TwilioRest
    account_sid: str
    call_sid: str
    public_url: str

    async def hang_up(self) -> None:
        await self.rest.hang_up(self.account_sid, self.call_sid)

    async def record(self) -> str:
        """Record both sides (dual channel); Twilio reports to /twilio/recording."""
        callback = f"{self.public_url}/twilio/recording"
        return await self.rest.record(self.account_sid, self.call_sid, callback)


class CallTools:
    """The tools of one call: checks the model's request, builds the REST action.

    With `whisper_base` (PUBLIC_URL/twilio/whisper) a transfer with a summary is warm:
    the person who answers hears the summary before the caller is connected.
    """

    def __init__(
        self,
        rest: TwilioRest,
        *,
        account_sid: str,
        call_sid: str,
        tools: tuple[ToolName, ...],
        transfer_to: Mapping[str, str],
        whisper_base: str = "",
        language: str | None = None,
    ) -> None:
        self._rest = rest
        self._account_sid = account_sid
        self._call_sid = call_sid
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
        summary = " ".join(str(call.args.get("summary") or "").split())
        whisper = ""
        if summary and self._whisper_base:
            whisper = whisper_url(self._whisper_base, summary, self._language)
        twiml = dial_twiml(target, whisper)
        return ToolOutcome(
            {"result": f"Transferring to {destination} once the caller has heard you."},
            action=lambda: self._rest.redirect(self._account_sid, self._call_sid, twiml),
            description=f"transfer to {destination}" + (" with a summary" if whisper else ""),
            ends_call=True,
        )
