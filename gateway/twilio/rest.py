"""The Twilio REST requests the gateway makes: hang up, redirect, record, place a call.

Made with the call's own account SID and TWILIO_AUTH_TOKEN through the twilio library's
aiohttp client (one for all requests); tests hand `TwilioRest` an HTTP client aimed at a
local stand-in (`gateway.testing.twilio_rest`). A failure is a `RestError` whose message
is safe to log: the HTTP status and Twilio's error code, never the request's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

REST_TIMEOUT_S = 10.0


class RestError(Exception):
    """A Twilio REST request failed; the message is safe to log."""


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


@dataclass(frozen=True)
class CallControl:
    """The REST requests about one call in progress (its SIDs bound once), for the
    call's tools and for the gateway's own moves."""

    rest: TwilioRest
    account_sid: str
    call_sid: str
    public_url: str

    async def hang_up(self) -> None:
        await self.rest.hang_up(self.account_sid, self.call_sid)

    async def redirect(self, twiml: str) -> None:
        """Replace the call's TwiML (Twilio then ends the media stream)."""
        await self.rest.redirect(self.account_sid, self.call_sid, twiml)

    async def record(self) -> str:
        """Record both sides (dual channel); Twilio reports to /twilio/recording."""
        callback = f"{self.public_url}/twilio/recording"
        return await self.rest.record(self.account_sid, self.call_sid, callback)
