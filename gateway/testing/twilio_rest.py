"""A local stand-in for the Twilio REST API (the Calls resource), for tests and the demo.

It answers what the gateway asks of Twilio -- create a call, update a call (hang up,
redirect to new TwiML), start a call's recording -- records every request, and checks
Basic auth like Twilio does.
`http_client()` gives a twilio `AsyncHttpClient` that sends every request of the real
twilio `Client` here instead of to api.twilio.com: only the scheme and host change, so the
path, form and auth are exactly what the library would send to Twilio.

``on_request`` lets a test play Twilio's part after a request (e.g. end the simulated
call's media stream when the call is hung up or redirected), and ``callback()`` sends the
gateway a webhook signed as Twilio signs it (answering-machine detection, recording status,
the whisper TwiML of a warm transfer).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import aiohttp
from aiohttp import BasicAuth, web
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"


@dataclass(frozen=True)
class RestRequest:
    """One request the stand-in received."""

    at: float  # time.monotonic()
    method: str
    path: str
    account_sid: str
    call_sid: str | None  # None for creating a call
    form: dict[str, str]  # the first value of each field
    user: str  # the Basic auth user (the account SID)
    fields: tuple[tuple[str, str], ...] = ()  # every field, repeated ones included
    resource: str = "calls"  # "calls" (create, update) or "recordings" (of call_sid)


@dataclass
class RestRecord:
    requests: list[RestRequest] = field(default_factory=list)

    def updates(self, call_sid: str | None = None) -> list[RestRequest]:
        """Call updates (hang up, redirect), optionally for one call."""
        return [
            r
            for r in self.requests
            if r.call_sid is not None
            and r.resource == "calls"
            and (call_sid is None or r.call_sid == call_sid)
        ]

    def creates(self) -> list[RestRequest]:
        return [r for r in self.requests if r.call_sid is None]

    def recordings(self) -> list[RestRequest]:
        """Recordings started (POST .../Calls/{sid}/Recordings.json)."""
        return [r for r in self.requests if r.resource == "recordings"]


OnRequest = Callable[[RestRequest], Awaitable[None]]


class TwilioRestStandIn:
    """An aiohttp server speaking the Calls part of Twilio's REST API."""

    def __init__(self, auth_token: str | None = None) -> None:
        self.auth_token = auth_token  # None: any credentials are accepted
        self.record = RestRecord()
        self.base_url = ""
        self.on_request: OnRequest | None = None
        self.fail_status: int | None = None  # answer every request with this error
        self.recording_sids: list[str] = []  # of the recordings started, in order
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> TwilioRestStandIn:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(f"/{API_VERSION}/Accounts/{{account}}/Calls.json", self._create)
        app.router.add_post(
            f"/{API_VERSION}/Accounts/{{account}}/Calls/{{call}}.json", self._update
        )
        app.router.add_post(
            f"/{API_VERSION}/Accounts/{{account}}/Calls/{{call}}/Recordings.json", self._record
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def http_client(self) -> StandInHttpClient:
        """A twilio HTTP client that sends every request here."""
        return StandInHttpClient(self.base_url)

    async def wait_for(
        self,
        predicate: Callable[[RestRecord], bool],
        timeout: float,  # noqa: ASYNC109 - same shape as the simulator's waits
    ) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.record):
                self._changed.clear()
                await self._changed.wait()

    # ---------------------------------------------------------------- handlers

    async def callback(
        self,
        http: aiohttp.ClientSession,
        gateway_url: str,
        public_url: str,
        path: str,
        params: dict[str, str],
        *,
        forged: bool = False,
    ) -> tuple[int, str]:
        """POST a webhook to the gateway as Twilio does: form `params`, signed over
        `public_url + path` (path may carry a query) with the auth token, or with a wrong
        signature when `forged`. Returns the status and the body."""
        assert self.auth_token is not None, "signing needs the auth token"
        signature = RequestValidator(self.auth_token).compute_signature(public_url + path, params)
        if forged:
            signature = signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")
        async with http.post(
            gateway_url + path, data=params, headers={"X-Twilio-Signature": signature}
        ) as resp:
            return resp.status, await resp.text()

    async def _receive(
        self, request: web.Request, call_sid: str | None, resource: str = "calls"
    ) -> RestRequest | web.Response:
        """Record the request; an error response if Twilio would refuse it."""
        account = request.match_info["account"]
        user = password = ""
        header = request.headers.get("Authorization")
        if header:
            try:
                auth = BasicAuth.decode(header)
            except ValueError:
                return _twilio_error(401, 20003, "Authenticate")
            user, password = auth.login, auth.password
        form = await request.post()
        received = RestRequest(
            at=time.monotonic(),
            method=request.method,
            path=request.path,
            account_sid=account,
            call_sid=call_sid,
            form={k: v for k, v in reversed(list(form.items())) if isinstance(v, str)},
            user=user,
            fields=tuple((k, v) for k, v in form.items() if isinstance(v, str)),
            resource=resource,
        )
        self.record.requests.append(received)
        self._changed.set()
        if self.auth_token is not None and (user != account or password != self.auth_token):
            return _twilio_error(401, 20003, "Authenticate")
        if self.fail_status is not None:
            return _twilio_error(self.fail_status, 20500, "Internal Server Error")
        if self.on_request is not None:
            await self.on_request(received)
        return received

    async def _create(self, request: web.Request) -> web.Response:
        received = await self._receive(request, None)
        if isinstance(received, web.Response):
            return received
        form = received.form
        if not form.get("To") or not form.get("From"):
            return _twilio_error(400, 21201, "No 'To' number is specified")
        if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
            return _twilio_error(400, 21205, "Url parameter is required.")
        sid = "CA" + secrets.token_hex(16)
        return web.json_response(_call_json(received.account_sid, sid, "queued", form), status=201)

    async def _update(self, request: web.Request) -> web.Response:
        call_sid = request.match_info["call"]
        received = await self._receive(request, call_sid)
        if isinstance(received, web.Response):
            return received
        status = received.form.get("Status", "in-progress")
        return web.json_response(_call_json(received.account_sid, call_sid, status, received.form))

    async def _record(self, request: web.Request) -> web.Response:
        call_sid = request.match_info["call"]
        received = await self._receive(request, call_sid, "recordings")
        if isinstance(received, web.Response):
            return received
        account = received.account_sid
        sid = "RE" + secrets.token_hex(16)
        body = {
            "sid": sid,
            "account_sid": account,
            "call_sid": call_sid,
            "status": "in-progress",
            "channels": 2 if received.form.get("RecordingChannels") == "dual" else 1,
            "source": "StartCallRecordingAPI",
            "api_version": API_VERSION,
            "uri": f"/{API_VERSION}/Accounts/{account}/Calls/{call_sid}/Recordings/{sid}.json",
        }
        self.recording_sids.append(sid)
        return web.json_response(body, status=201)


def _call_json(account: str, sid: str, status: str, form: dict[str, str]) -> dict[str, Any]:
    return {
        "sid": sid,
        "account_sid": account,
        "to": form.get("To"),
        "from": form.get("From"),
        "status": status,
        "api_version": API_VERSION,
        "uri": f"/{API_VERSION}/Accounts/{account}/Calls/{sid}.json",
    }


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    body = {"code": code, "message": message, "more_info": "", "status": status}
    return web.json_response(body, status=status)


class StandInHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """The twilio library's aiohttp client, with every URL's scheme and host replaced.

    Its own `request` runs unchanged, auth and all, as it does in production; only the
    session it sends through is `_ToStandIn`.
    """

    def __init__(self, base_url: str) -> None:
        super().__init__(pool_connections=False, timeout=10.0)  # no session of its own
        self.session = _ToStandIn(aiohttp.ClientSession(), urlsplit(base_url))


class _ToStandIn:
    """The part of an aiohttp `ClientSession` the twilio client uses (`request`, `close`),
    sending each request to the stand-in.

    `request` is a plain function returning aiohttp's own awaitable, as the session's is:
    a coroutine here would sit between the library and aiohttp, and the warnings aiohttp
    attributes to the library's calls (`stacklevel`) would name this module instead.
    """

    def __init__(self, session: aiohttp.ClientSession, base: SplitResult) -> None:
        self._session = session
        self._base = base

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        local = urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, ""))
        return self._session.request(method, local, **kwargs)

    async def close(self) -> None:
        await self._session.close()
