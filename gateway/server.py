"""The aiohttp application: routes, ops endpoints and the drain.

Every request from Twilio is signature-checked against `PUBLIC_URL` + path
(the URL Twilio used, never the request's Host, since the gateway runs behind
proxies). The voice webhook issues a single-use stream token; the stream's
`start` must carry it, or the stream is closed before any Live session opens.
What a stream carries is read by `gateway.twilio.stream`; the call it becomes is
built by `gateway.call_factory`.

Anyone can reach these routes, so what a peer may hold is bounded before any signature
holds (`gateway.listener`): request deadlines, and whatever a peer can trigger at will logged
through a throttle, never a line per event. Which calls and streams are taken on (one count of
capacity for the webhook and the stream; streams waiting for `start`) is `gateway.admission`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from google import genai
from google.genai import types

from gateway.admission import START_GRACE_S, Admission
from gateway.backend import Backend, resolve
from gateway.budget import DayBudget
from gateway.call import Call
from gateway.call_factory import PERSONA_PARAMETER, CallFactory
from gateway.config import Settings
from gateway.ending import CallOutcome
from gateway.listener import ConnectionDeadlines, PeerErrorLog, Throttle, watch_accept_errors
from gateway.live import profiles
from gateway.live import sdk as live_sdk
from gateway.live.models import BackendWatch, probe
from gateway.logs import bind_call, register_secret
from gateway.metrics import Metrics, watch_gc
from gateway.personas import Persona, PersonaTable
from gateway.store import CallState, CallStore, StoreError, open_store
from gateway.transcript import append_record
from gateway.twilio.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    MAX_MESSAGE_BYTES,
    StreamProtocolError,
)
from gateway.twilio.rest import CallControl, RestError, TwilioRest
from gateway.twilio.stream import WRITER_LIMIT, MediaStream
from gateway.twilio.twiml import (
    MAX_SUMMARY_CHARS,
    busy_twiml,
    connect_stream_twiml,
    end_twiml,
    whisper_twiml,
)
from gateway.twilio.webhooks import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    FormError,
    SignatureChecker,
    SignatureResult,
    StreamTokens,
    TokenResult,
    parse_form,
    stream_url,
)

log = logging.getLogger(__name__)

TOKEN_PARAMETER = "token"
#: How often a replica tells the store it is alive and whether it takes calls (other
#: replicas hand calls off to it), and how long each word holds: a replica killed is seen
#: gone at most ALIVE_FOR_S after, which is what a call whose stream was lost with it
#: waits when Twilio asks the `<Connect action>` before reporting the stream lost. Four
#: words per hold, so that only an event loop stalled for 3/4 s makes a live replica seem
#: gone; and a replica taken for dead loses nothing: its calls' streams had already ended
#: (Twilio asks the action only then), and the store refuses what it still writes for them
#: once another replica took them over (`gateway.store`). Four small Redis writes a second.
READY_EVERY_S = 0.25
ALIVE_FOR_S = 4 * READY_EVERY_S
#: How long the app's own tasks get to stop at cleanup.
STOP_LIMIT_S = 5.0
#: How often a call's state is stored while it runs (with a shared store), if its handle
#: changed: a replica that dies loses what the caller said since.
CHECKPOINT_EVERY_S = 1.0
#: How long a `<Connect action>` for a call whose replica seems gone waits for it to be
#: seen gone (ALIVE_FOR_S at most) or its stream reported lost.
RECOVERY_WAIT_S = 5.0
RECOVERY_POLL_S = 0.05
#: How long a stream's `stream-error` leaves the `<Connect action>` to recover the call
#: first, once its replica is seen gone: only when Twilio does not ask the action does the
#: call go on by a REST redirect (and the action never answers a call a redirect took).
ACTION_FIRST_S = 2.0
#: How often a call waiting to be handed off is looked at for a pause.
PAUSE_POLL_S = 0.05
#: The voice webhook's `<Connect action>`: Twilio asks it what next when a stream ends.
CONNECT_ACTION_PATH = "/twilio/connect-action"
#: The `<Stream statusCallback>`: a stream lost with its replica is recovered from here
#: when Twilio does not go on to the `<Connect action>`.
STREAM_STATUS_PATH = "/twilio/stream-status"
#: Twilio's CallStatus values for a call that is over.
FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
#: Lines a throttle logs as they come in an interval before it only counts: enough that a
#: test or an operator sees each of a handful of bad peers, few enough that a flood is a
#: couple of lines a second.
REQUEST_LOG_BURST = 50
STREAM_LOG_BURST = 50
CONNECTION_LOG_BURST = 5
#: How long a refused request's unread body is still read before the connection closes.
LINGER_S = 1.0


@dataclass
class PeerLogs:
    """The throttles through which everything a peer can trigger is logged."""

    requests: Throttle  # webhooks and upgrades refused
    streams: Throttle  # media streams closed for bad input
    connections: Throttle  # malformed HTTP, connections holding a socket with no request
    accepts: Throttle  # the listening socket out of descriptors

    @classmethod
    def every(cls, interval_s: float) -> PeerLogs:
        return cls(
            requests=Throttle(log, "requests refused", interval_s, REQUEST_LOG_BURST),
            streams=Throttle(log, "streams closed", interval_s, STREAM_LOG_BURST),
            connections=Throttle(log, "bad connections", interval_s, CONNECTION_LOG_BURST),
            accepts=Throttle(log, "accept errors", interval_s, 1),
        )

    def close(self) -> None:
        for throttle in (self.requests, self.streams, self.connections, self.accepts):
            throttle.close()


@dataclass
class PeerGuard:
    """What bounds any peer before a signature is checked: the throttled logs of what
    peers did and every connection's deadlines, made with the app; and, from the server's
    start to the app's cleanup, the watchers that run beside it (the deadlines' sweep,
    the accept errors, the GC pauses that stall every peer's audio)."""

    logs: PeerLogs
    deadlines: ConnectionDeadlines
    watchers: list[Callable[[], None]] = field(default_factory=list)  # each stops one

    def start(self, server: web.Server, metrics: Metrics) -> None:
        """Watch `server` (a started runner's) until `stop`."""
        self.deadlines.watch(server)
        loop = asyncio.get_running_loop()
        self.watchers += [
            self.deadlines.stop,
            watch_accept_errors(loop, self.logs.accepts, metrics.admission.accept_errors),
            watch_gc(metrics.replica.gc_pause),
        ]

    def stop(self) -> None:
        for stop in self.watchers:
            stop()
        self.watchers.clear()
        self.logs.close()


@dataclass
class OpenStreams:
    """The media streams open here (calls, and streams still waiting for `start`), and
    an event set while there is none: what a drain waits for and a shutdown closes."""

    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    none_open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.none_open.set()

    def add(self, ws: web.WebSocketResponse) -> None:
        self.sockets.add(ws)
        self.none_open.clear()

    def discard(self, ws: web.WebSocketResponse) -> None:
        self.sockets.discard(ws)
        if not self.sockets:
            self.none_open.set()

    async def closed(self, limit_s: float) -> bool:
        """Wait until none is open or `limit_s` passes; True if none is."""
        try:
            async with asyncio.timeout(limit_s):
                await self.none_open.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class GatewayState:
    """Per-app state shared by the handlers."""

    settings: Settings
    metrics: Metrics
    signatures: SignatureChecker
    tokens: StreamTokens
    stream_url: str
    personas: PersonaTable
    peers: PeerGuard
    admission: Admission[MediaStream]
    store: CallStore  # what replicas share: stream memory, answering-machine results
    replica: str = field(default_factory=lambda: secrets.token_hex(8))  # its name there
    calls: set[Call] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # hand-offs under way
    streams: OpenStreams = field(default_factory=OpenStreams)
    draining: bool = False
    backend: BackendWatch | None = None  # the key and models checked with the backend

    def at_capacity(self) -> bool:
        """MAX_CALLS calls in progress or answered and reserved for their streams (streams
        still waiting for `start` do not count)."""
        return self.admission.full(len(self.calls))

    def in_progress(self) -> str:
        """What a drain waits for, as its log lines say it: `2 call(s)`, then `and 1
        stream(s) waiting for start` if any. A stream is a call once its `start` came; one
        still waiting may yet become one (Twilio sends `start` at once), or it is closed
        within START_TIMEOUT_S."""
        text = f"{len(self.calls)} call(s)"
        if waiting := len(self.admission.waiting):
            text += f" and {waiting} stream(s) waiting for start"
        return text

    def unready(self) -> str:
        """Why /readyz fails now, or "" when it does not."""
        if self.draining:
            return "draining"
        if self.at_capacity():
            return "at call limit"
        refusal = self.backend.refusal if self.backend is not None else None
        return f"live backend refuses: {refusal}" if refusal else ""


STATE = web.AppKey("state", GatewayState)
#: Builds calls with the app's clients; there from startup (cleanup_ctx) to cleanup.
CALLS = web.AppKey("calls", CallFactory)


def create_app(
    settings: Settings,
    personas: PersonaTable,
    *,
    client: genai.Client | None = None,
    rest: TwilioRest | None = None,
    metrics: Metrics | None = None,
    backend: Backend | None = None,
) -> web.Application:
    """Build the gateway application.

    The Live client is made at the app's startup for `backend` (else the one the settings
    name, `gateway.backend.resolve`); it honours GOOGLE_GEMINI_BASE_URL (or, on Vertex AI,
    GOOGLE_VERTEX_BASE_URL) and SSL_CERT_FILE as the SDK reads them then; tests and the
    demo point it at the emulator that way. A `client` or `rest` passed in stays the
    caller's to close; those the app creates, it closes at cleanup.
    """
    auth_token = settings.twilio_auth_token.get_secret_value()
    register_secret(auth_token)
    if settings.gemini_api_key is not None:
        register_secret(settings.gemini_api_key.get_secret_value())
    # Shared by every replica that has the same auth token, so a stream may land on
    # another replica than its webhook did.
    token_secret = hmac.new(auth_token.encode(), b"gateway-stream-token", hashlib.sha256).digest()
    metrics = metrics or Metrics()
    metrics.replica.sdk_path.labels(path="fast" if live_sdk.paths().fast else "public").set(1)
    logs = PeerLogs.every(settings.peer_log_interval_s)

    def deadline_closed(reason: str) -> None:
        metrics.admission.connections_closed.labels(reason=reason).inc()
        if reason == "no_request":  # an idle kept-alive connection is routine; this is not
            logs.connections.note(
                reason,
                "closed a connection: no request within %g s",
                settings.http_header_timeout_s,
            )

    deadlines = ConnectionDeadlines(
        settings.http_header_timeout_s, settings.http_keepalive_s, deadline_closed
    )
    app = web.Application(
        client_max_size=64 * 1024,
        middlewares=[deadlines.middleware],
        handler_args={
            "keepalive_timeout": settings.http_keepalive_s,
            "lingering_time": LINGER_S,
            "logger": PeerErrorLog(logs.connections, metrics.admission.peer_errors),
        },
    )
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else ""
    register_secret(redis_url)
    register_secret(urlsplit(redis_url).password or "")
    store = open_store(redis_url, settings.call_state_ttl_s)
    app[STATE] = GatewayState(
        settings=settings,
        metrics=metrics,
        signatures=SignatureChecker(auth_token),
        tokens=StreamTokens(
            token_secret,
            ttl_s=settings.stream_token_ttl_s,
            memory_s=settings.call_memory_s,
            store=store,
            live_s=settings.call_state_ttl_s,
        ),
        stream_url=stream_url(settings.public_url),
        personas=personas,
        peers=PeerGuard(logs, deadlines),
        admission=Admission(
            settings.max_calls,
            reservation_s=settings.stream_token_ttl_s,
            grace_s=min(START_GRACE_S, settings.start_timeout_s),
        ),
        store=store,
    )
    state = app[STATE]
    metrics.replica.ready.set_function(lambda: float(not state.unready()))
    metrics.replica.draining.set_function(lambda: float(state.draining))
    app.add_routes(
        [
            web.post("/twilio/voice", voice_webhook),
            web.get("/twilio/media", media_stream),
            web.post("/twilio/status", status_webhook),
            web.post("/twilio/amd", amd_webhook),
            web.post("/twilio/recording", recording_webhook),
            web.post("/twilio/whisper", whisper_webhook),
            web.post(CONNECT_ACTION_PATH, connect_action),
            web.post(STREAM_STATUS_PATH, stream_status),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_endpoint),
        ]
    )
    app.on_response_prepare.append(_no_server_header)
    app.cleanup_ctx.append(_clients(client, rest, backend))
    app.cleanup_ctx.append(_answers)
    app.on_shutdown.append(_close_streams)
    app.on_cleanup.append(_stop_listening)
    return app


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Send no `Server` header: aiohttp's default names the Python and aiohttp versions,
    an attacker's first free hint. Runs for every response the app prepares: webhooks,
    errors (403, 404, 503, ...) and WebSocket upgrades.

    Not for a request aiohttp cannot parse at all: it answers that 400 itself, before any
    app sees it, with its default header (aio-libs/aiohttp#6463).
    """
    response.headers.popall(hdrs.SERVER, None)


async def start_server(
    app: web.Application, host: str, port: int, **runner_args: object
) -> web.AppRunner:
    """Serve `app` on host:port (0: any free port) with every connection bounded.

    The deadlines watch the runner's connections, the event loop's accept errors go
    through a throttle, and `/metrics` counts open connections; `runner.cleanup()`
    undoes it all. `runner_args` go to `web.AppRunner` (the access log stays off).
    """
    runner = web.AppRunner(app, access_log=None, **runner_args)  # type: ignore[arg-type]
    await runner.setup()
    state = app[STATE]
    site = web.TCPSite(runner, host, port, backlog=listen_backlog(state.settings.max_calls))
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # what setup() started: the app's clients and tasks
        raise
    server = runner.server
    assert server is not None
    state.metrics.admission.connections_open.set_function(lambda: len(server.connections))
    state.metrics.admission.streams_waiting.set_function(lambda: len(state.admission.waiting))
    state.metrics.admission.calls_reserved.set_function(lambda: state.admission.reserved)
    state.peers.start(server, state.metrics)
    return runner


def listen_backlog(max_calls: int) -> int:
    """Connections the kernel completes before the gateway accepts them: a whole burst's
    streams and webhooks (twice ``MAX_CALLS``), at least the usual 128.

    Past the backlog the kernel drops a new connection's SYN, and the peer sends it again
    only a second later (then 3 s, 7 s): a burst larger than the backlog that arrives while
    the event loop is busy would wait that long for its upgrades. The kernel caps it at
    ``net.core.somaxconn`` (4096 since Linux 5.4).
    """
    return max(128, 2 * max_calls)


async def _stop_listening(app: web.Application) -> None:
    app[STATE].peers.stop()


def _clients(
    client: genai.Client | None, rest: TwilioRest | None, backend: Backend | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's long-lived clients (Gemini, Twilio REST), from startup to cleanup."""

    async def clients(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        settings = state.settings
        key_setting = "GEMINI_API_KEY"
        if client is not None:
            live = client
        else:
            found = backend
            if found is None:
                models = tuple(state.personas.models())
                found = await asyncio.to_thread(resolve, settings, models)
            live = found.client(live_http(settings))
            if found.vertex and found.project is not None:
                key_setting = "GOOGLE_APPLICATION_CREDENTIALS"
        twilio = rest or TwilioRest(settings.twilio_auth_token.get_secret_value())
        app[CALLS] = CallFactory(
            settings, state.personas, live, twilio, state.metrics, DayBudget(state.store)
        )
        metrics = state.metrics
        state.backend = BackendWatch(
            functools.partial(probe, live),
            state.personas.models(),
            key_setting=key_setting,
            interval_s=settings.model_check_interval_s,
            on_result=lambda result: metrics.replica.backend_checks.labels(result=result).inc(),
        )
        watch = state.backend
        metrics.replica.backend_refusing.set_function(lambda: float(watch.refusal is not None))
        for model, setting in state.personas.models().items():
            if not profiles.known(model, "vertex" if live.vertexai else "gemini"):
                log.warning(
                    "%s %s: not in the model table (docs/models.md): its setup carries nothing "
                    "optional and text goes by the channels every model takes",
                    setting,
                    model,
                )
        try:
            await watch.start()  # BackendRefused: the start stops
            yield
        finally:
            await watch.stop()
            if rest is None:
                await twilio.close()
            if client is None:
                await live.aio.aclose()

    return clients


async def _answers(app: web.Application) -> AsyncIterator[None]:
    """The store from startup to cleanup: subscribed to answering-machine results before
    the first call (a replica that cannot reach Redis does not start), each delivered to
    the call it is for if this replica holds it."""
    state = app[STATE]
    try:
        async with state.store.answer_feed() as feed:
            tasks = {
                asyncio.create_task(_deliver_answers(state, feed), name="answer-feed"),
                asyncio.create_task(_announce(state), name="replica-ready"),
            }
            if state.settings.redis_url is not None:
                tasks.add(asyncio.create_task(_checkpoints(state), name="checkpoints"))
            try:
                yield
            finally:
                for task in (*tasks, *state.tasks):
                    task.cancel()
                _, stuck = await asyncio.wait({*tasks, *state.tasks}, timeout=STOP_LIMIT_S)
                if stuck:
                    log.warning("tasks not stopped: %s", sorted(t.get_name() for t in stuck))
                with contextlib.suppress(StoreError):
                    await state.store.replica_ready(state.replica, False, 0.0)
    finally:
        await state.store.aclose()


async def _announce(state: GatewayState) -> None:
    """Tell the other replicas whether this one takes calls (they hand theirs off to it
    on a drain): said every READY_EVERY_S, holding for ALIVE_FOR_S."""
    while True:
        try:
            await state.store.replica_ready(state.replica, not state.unready(), ALIVE_FOR_S)
        except StoreError as error:
            log.warning("readiness not shared: %s", error)
        await asyncio.sleep(READY_EVERY_S)


async def _deliver_answers(state: GatewayState, feed: AsyncIterator[str | None]) -> None:
    """Answering-machine results posted on any replica, to the calls held here (None: some
    may have been missed, so every call held looks)."""
    async for call_sid in feed:
        for call in [c for c in state.calls if call_sid in (None, c.start.call_sid)]:
            await _take_answer(state, call)


async def _take_answer(state: GatewayState, call: Call) -> None:
    """The call's stored answering-machine result, if there is one (one taker wins)."""
    try:
        answer = await state.store.take_answer(call.start.call_sid)
    except StoreError as error:
        log.warning("answering-machine result not read: %s", error)
        return
    if answer is not None:
        call.answered_by(answer)


def live_http(settings: Settings) -> types.HttpOptions:
    """The Live client's transport: permessage-deflate offered only with LIVE_DEFLATE, and
    websockets' keepalive off.

    websockets' connect offers deflate unless told ``compression=None``, and closes a
    connection whose pong is 20 s late however much else arrives (the Live service's pongs
    take up to 30 s): the gateway decides liveness itself (`gateway.live.liveness`). The SDK
    (google-genai 1.23 on) passes ``async_client_args`` that websockets' connect takes on to
    it, and its HTTP clients drop them; checked here, since nothing else would tell.
    """
    args: dict[str, Any] = {"ping_interval": None}
    if not settings.live_deflate:
        args["compression"] = None
    if not live_sdk.passes_socket_args(args):
        log.warning(
            "google-genai does not pass websocket options on: the Live socket keeps "
            "websockets' keepalive (a pong 20 s late closes it) and offers deflate"
        )
    timed = {**args, "create_connection": live_sdk.TimedSocket}  # times the setup's trip
    return types.HttpOptions(
        async_client_args=timed if live_sdk.passes_socket_args(timed) else args
    )


# ------------------------------------------------------------------ webhooks


def _refuse(state: GatewayState, request: web.Request, reason: str, detail: str) -> None:
    """Count and log (throttled) a request turned away."""
    state.metrics.admission.rejected.labels(reason=reason).inc()
    state.peers.logs.requests.note(reason, "rejected %s: %s", request.path, detail)


async def _body(state: GatewayState, request: web.Request) -> bytes:
    """The request's body, read within HTTP_BODY_TIMEOUT_S; a 4xx for whatever goes wrong."""
    limit = state.settings.http_body_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        _refuse(state, request, "body_timeout", f"body not received within {limit:g} s")
        timed_out = web.HTTPRequestTimeout()
        timed_out.force_close()  # the rest of the body would only hold the socket longer
        raise timed_out from None
    except web.HTTPRequestEntityTooLarge:
        _refuse(state, request, "body_too_large", "body too large")
        raise
    except (ConnectionError, web.RequestPayloadError):
        _refuse(state, request, "body_cut_off", "body cut off")
        raise web.HTTPBadRequest(text="body cut off\n") from None


async def _checked_form(request: web.Request) -> dict[str, str]:
    """The form parameters if Twilio's signature over them holds; else 403 (or 400 for a
    body that is not a form)."""
    state = request.app[STATE]
    try:
        params = parse_form(await _body(state, request), request.content_type, request.charset)
    except FormError as error:
        _refuse(state, request, "bad_form", error.reason)
        raise web.HTTPBadRequest(text=f"{error.reason}\n") from None
    # As Twilio signed it: the URL it was given, query still encoded (path_qs decodes it).
    url = state.settings.public_url + request.raw_path
    result = state.signatures.check(
        url,
        params,
        request.headers.get(SIGNATURE_HEADER),
        request.headers.get(SIGNATURE_SETTINGS_HEADER),
    )
    if result is not SignatureResult.OK:
        detail = f"{result.value} signature"
        if result is SignatureResult.INVALID and _signed_for_host(state, request, params):
            detail += (
                f", signed for https://{request.host}{request.raw_path}: set PUBLIC_URL to "
                "the URL the number's webhook calls"
            )
        _refuse(state, request, f"signature_{result.value}", detail)
        raise web.HTTPForbidden()
    return params


def _signed_for_host(state: GatewayState, request: web.Request, params: dict[str, str]) -> bool:
    """Whether an invalid signature holds for the https URL of the request's Host: Twilio
    signed the URL the number calls, and PUBLIC_URL names another (a tunnel's new address,
    a renamed host), a first deploy's commonest mistake. Only whoever has the auth token
    can sign that URL, so the log may name it; it never admits a request."""
    url = f"https://{request.host}{request.raw_path}"
    if url == state.settings.public_url + request.raw_path:
        return False
    signature = request.headers.get(SIGNATURE_HEADER)
    settings = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    return state.signatures.check(url, params, signature, settings) is SignatureResult.OK


async def voice_webhook(request: web.Request) -> web.Response:
    """Answer an incoming call with <Connect><Stream>, or busy when we cannot take it."""
    state = request.app[STATE]
    params = await _checked_form(request)
    call_sid = params.get("CallSid", "")
    if not call_sid:
        state.metrics.admission.rejected.labels(reason="no_call_sid").inc()
        raise web.HTTPBadRequest(text="CallSid missing")
    account_sid = params.get("AccountSid", "")
    expected = state.settings.twilio_account_sid
    if expected and account_sid != expected:
        _refuse(state, request, "wrong_account", "AccountSid is not TWILIO_ACCOUNT_SID")
        raise web.HTTPForbidden()
    try:
        streamed = await state.tokens.streamed(call_sid)
    except StoreError as error:
        _refuse(state, request, "store_unavailable", str(error))
        raise web.HTTPServiceUnavailable(text="call store unavailable\n") from None
    if streamed:
        # A replayed webhook (signatures carry no timestamp): the call had its stream.
        _refuse(state, request, "replayed", "the call already has had its stream")
        return web.Response(text=busy_twiml(), content_type="text/xml")
    if state.draining or not state.admission.reserve(call_sid, len(state.calls)):
        reason = "draining" if state.draining else "busy"
        state.metrics.admission.rejected.labels(reason=reason).inc()
        log.info("turned a call away (%s)", reason)
        return web.Response(text=busy_twiml(), content_type="text/xml")
    persona = state.personas.answering(params, request.query.get(PERSONA_PARAMETER))
    if await _over_budget(state, request, persona):
        state.admission.release(call_sid)
        return web.Response(text=busy_twiml(), content_type="text/xml")
    token = state.tokens.issue(call_sid, account_sid=account_sid, persona=persona.name)
    twiml = _stream_twiml(state, token, persona.name)
    return web.Response(text=twiml, content_type="text/xml")


async def _over_budget(state: GatewayState, request: web.Request, persona: Persona) -> bool:
    """Whether the persona's spend today has reached its `max_day_usd` (from every
    replica): then its new calls are turned away, said in a log line and a metric."""
    limit = persona.policy.max_day_usd
    try:
        over = await DayBudget(state.store).over(persona.name, limit)
    except StoreError as error:
        _refuse(state, request, "store_unavailable", str(error))
        raise web.HTTPServiceUnavailable(text="call store unavailable\n") from None
    if over:
        state.metrics.admission.rejected.labels(reason="max_day_cost").inc()
        log.info("turned a call away (persona %s over its day's limit of $%g)", persona.name, limit)
    return over


def _stream_twiml(state: GatewayState, token: str, persona: str) -> str:
    """The call's `<Connect><Stream>`: what next when the stream ends (the action), and
    how it ended (the status callback)."""
    return connect_stream_twiml(
        state.stream_url,
        {TOKEN_PARAMETER: token, PERSONA_PARAMETER: persona},
        action=state.settings.public_url + CONNECT_ACTION_PATH,
        status_callback=state.settings.public_url + STREAM_STATUS_PATH,
    )


async def connect_action(request: web.Request) -> web.Response:
    """Twilio's request once a call's stream closed (the `<Connect action>`). A call a
    draining replica handed off goes on: a new `<Connect><Stream>` with a fresh token for
    the same call (any replica answers; the stored state says how the call continues).
    A call whose stream was lost with its replica goes on from its last checkpoint
    (`_recoverable`). Any other call has nothing more to do: an empty `<Response/>` ends it."""
    state = request.app[STATE]
    params = await _checked_form(request)
    call_sid = params.get("CallSid", "")
    account_sid = params.get("AccountSid", "")
    extra = {"call_sid": call_sid, "call_status": params.get("CallStatus")}
    saved: CallState | None = None
    try:
        up = bool(call_sid) and params.get("CallStatus") not in FINAL_STATUSES
        found = None
        if up and await state.tokens.handed_off(call_sid):
            found = await _next_stream(state, call_sid, account_sid)
        elif up and state.settings.redis_url is not None:
            found = await _recoverable(state, call_sid, account_sid)
        if found is not None:
            saved, token = found
    except StoreError as error:
        _refuse(state, request, "store_unavailable", str(error))
        raise web.HTTPServiceUnavailable(text="call store unavailable\n") from None
    if saved is None:
        log.info("stream over: the call ends", extra=extra)
        return web.Response(text=end_twiml(), content_type="text/xml")
    log.info("stream over: the call goes on after its hand-off", extra=extra)
    return web.Response(text=_stream_twiml(state, token, saved.persona), content_type="text/xml")


async def stream_status(request: web.Request) -> web.Response:
    """The `<Stream statusCallback>`. A `stream-error` (the stream lost, e.g. with its
    replica) of a call whose replica is gone: whether Twilio goes on to the `<Connect action>`
    then is not documented, so a replica also recovers the call from here, redirecting it
    through the REST API to a new stream (the recovery claim in the store lets one path
    and one replica do it). Answered at once; the recovery runs on."""
    state = request.app[STATE]
    params = await _checked_form(request)
    call_sid = params.get("CallSid", "")
    event = params.get("StreamEvent", "")
    ids = {"call_sid": call_sid, "stream_sid": params.get("StreamSid", "")}
    log.info("stream %s", event or "status", extra=ids)
    if event == "stream-error" and call_sid and state.settings.redis_url is not None:
        try:  # the `<Connect action>` need not wait to see the stream's replica gone
            await state.store.stream_lost(call_sid)
        except StoreError as error:
            log.warning("stream loss not stored: %s", error, extra=ids)
        account_sid = params.get("AccountSid", "")
        task = asyncio.get_running_loop().create_task(
            _recover_by_redirect(state, request.app[CALLS].rest, account_sid, call_sid),
            name=f"recover-{call_sid}",
        )
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
    return web.Response(status=204)


async def _recover_by_redirect(
    state: GatewayState, rest: TwilioRest, account_sid: str, call_sid: str
) -> None:
    """Once the call's replica is seen gone, redirect the call to a new stream of its own."""
    try:
        found = await _recoverable(state, call_sid, account_sid, defer_s=ACTION_FIRST_S)
        if found is None:
            return
        saved, token = found
    except StoreError as error:
        log.warning("stream lost: not recovered (%s)", error, extra={"call_sid": call_sid})
        return
    control = CallControl(rest, account_sid, call_sid, state.settings.public_url)
    try:
        await control.redirect(_stream_twiml(state, token, saved.persona))
    except RestError as error:
        log.warning("stream lost: redirect failed (%s)", error, extra={"call_sid": call_sid})
        return
    log.info("stream lost: the call redirected to a new stream", extra={"call_sid": call_sid})


async def status_webhook(request: web.Request) -> web.Response:
    """Twilio's call status callback: logged, so an operator sees how calls ended."""
    params = await _checked_form(request)
    if params.get("CallStatus") in FINAL_STATUSES:  # a reserved slot its stream never took
        request.app[STATE].admission.release(params.get("CallSid", ""))
    record = {
        "type": "status",
        "status": params.get("CallStatus", "unknown"),
        "duration_s": params.get("CallDuration"),
        "direction": params.get("Direction"),
    }
    await _add_to_transcript(request, params.get("CallSid", ""), record)
    log.info(
        "call status %s",
        params.get("CallStatus", "unknown"),
        extra={"call_sid": params.get("CallSid", ""), "duration": params.get("CallDuration")},
    )
    return web.Response(status=204)


async def amd_webhook(request: web.Request) -> web.Response:
    """Twilio's asynchronous answering-machine detection result for an outbound call."""
    state = request.app[STATE]
    params = await _checked_form(request)
    call_sid = params.get("CallSid", "")
    answered_by = params.get("AnsweredBy", "unknown")
    call = next((c for c in state.calls if c.start.call_sid == call_sid), None)
    if call is not None:
        call.answered_by(answered_by)
    elif call_sid:  # its stream has not started (yet), or it is on another replica
        try:
            await state.store.post_answer(call_sid, answered_by)
        except StoreError as error:
            _refuse(state, request, "store_unavailable", str(error))
            raise web.HTTPServiceUnavailable(text="call store unavailable\n") from None
        log.info("answered by %s: kept for the call's stream", answered_by)
    return web.Response(status=204)


async def recording_webhook(request: web.Request) -> web.Response:
    """Twilio's recording status callback: the recording's SID and URL go in the transcript
    (the gateway stores no audio itself)."""
    params = await _checked_form(request)
    call_sid = params.get("CallSid", "")
    status = params.get("RecordingStatus", "unknown")
    record = {
        "type": "recording",
        "status": status,
        "recording_sid": params.get("RecordingSid"),
        "url": params.get("RecordingUrl"),
        "duration_s": params.get("RecordingDuration"),
        "channels": params.get("RecordingChannels"),
    }
    await _add_to_transcript(request, call_sid, record)
    log.info("recording %s", status, extra={"call_sid": call_sid})
    return web.Response(status=204)


async def _add_to_transcript(request: web.Request, call_sid: str, record: dict[str, Any]) -> None:
    """A callback's line in the call's transcript (which may have ended), if they are on."""
    directory = request.app[STATE].settings.transcript_dir
    if directory is None or not call_sid:
        return
    try:
        await asyncio.to_thread(append_record, directory, call_sid, record)
    except OSError as exc:
        log.warning("transcript %s not written: %s", record["type"], exc)


async def whisper_webhook(request: web.Request) -> web.Response:
    """What the person taking a warm transfer hears before the caller is connected: the
    summary the model gave `transfer_call` (in the signed URL, so any replica can answer)."""
    await _checked_form(request)
    summary = request.query.get("summary", "")[:MAX_SUMMARY_CHARS]
    language = request.query.get("language")
    return web.Response(text=whisper_twiml(summary, language), content_type="text/xml")


# -------------------------------------------------------------- media stream


async def media_stream(request: web.Request) -> web.StreamResponse:
    """Twilio's Media Stream for one call: checked, then joined to a Live session."""
    state = request.app[STATE]
    signature = state.signatures.check_websocket(
        state.stream_url + (f"?{request.query_string}" if request.query_string else ""),
        request.headers.get(SIGNATURE_HEADER),
        request.headers.get(SIGNATURE_SETTINGS_HEADER),
    )
    if signature is not SignatureResult.OK:
        reason = f"stream_signature_{signature.value}"
        _refuse(state, request, reason, f"{signature.value} signature on the stream upgrade")
        raise web.HTTPForbidden()
    # Draining with a shared store, a stream is still taken: the load balancer sent it here
    # before it caught up with the drain, and it is handed on at its first pause.
    refused = state.draining and state.settings.redis_url is None
    if refused or not state.admission.may_upgrade(len(state.calls)):
        reason = "draining" if state.draining else "busy"
        state.metrics.admission.rejected.labels(reason=f"stream_{reason}").inc()
        raise web.HTTPServiceUnavailable(text=reason)

    settings = state.settings
    # timeout: how long a close waits for the peer's close frame.
    ws = web.WebSocketResponse(
        max_msg_size=MAX_MESSAGE_BYTES, autoping=True, timeout=2.0, writer_limit=WRITER_LIMIT
    )
    await ws.prepare(request)
    stream = MediaStream(
        ws,
        settings.idle_timeout_s,
        transport=request.transport,
        audio_rate=settings.caller_audio_rate,
        audio_burst_s=settings.caller_audio_burst_s,
        send_buffer_s=settings.caller_send_buffer_s,
    )
    state.streams.add(ws)
    for quiet in state.admission.wait(stream, len(state.calls)):
        quiet.evict("too many streams waiting for start")
    try:
        await _serve_stream(state, request.app[CALLS], stream)
    finally:
        state.admission.left(stream)
        await stream.aclose()
        state.metrics.audio.caller_backlog.observe(stream.peak_queued_audio_s)
        state.streams.discard(ws)
        if not ws.closed:
            await ws.close()
    return ws


async def _serve_stream(state: GatewayState, calls: CallFactory, stream: MediaStream) -> None:
    """Wait for `start`, check its token, run the call; close on bad input, with a reason."""
    try:
        start = await stream.wait_start(state.settings.start_timeout_s)
        waited = state.admission.left(stream)
        if start is None:
            log.debug("stream closed before start")
            return
        bind_call(call_sid=start.call_sid, stream_sid=start.stream_sid)
        try:
            verdict = await state.tokens.redeem(
                start.custom_parameters.get(TOKEN_PARAMETER, ""),
                start.call_sid,
                account_sid=start.account_sid,
                persona=start.custom_parameters.get(PERSONA_PARAMETER, ""),
            )
        except StoreError as error:
            reason = f"call store unavailable: {error}"
            raise StreamProtocolError(CLOSE_INTERNAL_ERROR, reason) from None
        if verdict is not TokenResult.OK:
            raise StreamProtocolError(CLOSE_POLICY_VIOLATION, f"stream token {verdict.value}")
        if waited is not None:
            state.metrics.admission.stream_start_wait.observe(waited)
        if not state.admission.start(start.call_sid, len(state.calls)):
            await _stream_ended(state, start.call_sid)
            state.metrics.admission.rejected.labels(reason="stream_busy").inc()
            raise StreamProtocolError(CLOSE_TRY_AGAIN_LATER, "at call limit")
        resume, turns = await _handed_to_us(state, start.call_sid)
        try:
            call = calls.build(start, stream.send, resume=resume, turns=turns)
            state.calls.add(call)  # before the store is read: a result posted now reaches it
            try:
                await _take_answer(state, call)
                await call.run(stream.messages)
            finally:
                state.calls.discard(call)
                if call.stats.outcome is CallOutcome.HANGUP:
                    await _keep_for_next_stream(state, call)
                elif call.stats.outcome is not CallOutcome.HANDED_OFF:
                    stream_nonce = _stream_nonce(call)
                    with contextlib.suppress(StoreError):  # else its state expires
                        await state.store.forget(start.call_sid, stream_nonce)
        finally:
            await _stream_ended(state, start.call_sid)
        if call.stats.failure and not stream.closed:
            await stream.close(CLOSE_INTERNAL_ERROR, "live session failed")
    except StreamProtocolError as error:
        reason, label = error.reason, _label(error.reason)
        state.metrics.admission.stream_errors.labels(reason=label).inc()
        state.peers.logs.streams.note(
            label, "stream closed: %s", reason, close_code=error.close_code
        )
        await stream.close(error.close_code, reason)


async def _keep_for_next_stream(state: GatewayState, call: Call) -> None:
    """The stream closed without Twilio's `stop` and not by the gateway: the line between
    them broke (a load balancer or ingress restarted, the network), not the call. Stored as
    a hand-off, so that Twilio's `<Connect action>` (on any replica) goes on with it from
    its newest state; if the call was over after all, nobody asks and the state expires."""
    call_sid = call.start.call_sid
    saved, turns = _call_state(call, holder="")
    try:
        stored = await state.store.hand_off(call_sid, saved, turns)
    except StoreError as error:
        log.warning("stream lost: the call not kept (%s)", error, extra={"call_sid": call_sid})
        return
    if stored:
        state.metrics.replica.hand_offs.labels(outcome="stream_lost").inc()
        log.info("stream lost: the call kept for its next stream", extra={"call_sid": call_sid})


async def _stream_ended(state: GatewayState, call_sid: str) -> None:
    """The call's stream is over: remembered a while more (no second stream)."""
    try:
        await state.tokens.ended(call_sid)
    except StoreError as error:  # its claim lapses after CALL_STATE_TTL_S instead
        log.warning("stream end not stored: %s", error)


def _label(reason: str) -> str:
    """A low-cardinality metric label from an error reason."""
    return reason.split(":")[0].strip().replace(" ", "_")[:40]


# ---------------------------------------------------------------------- ops


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[STATE].unready()
    if reason:
        return web.Response(status=503, text=f"{reason}\n")
    return web.Response(text="ready\n")


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def start_draining(app: web.Application) -> None:
    """Fail readiness and turn new calls away; calls in progress go on, here or, with
    another replica ready, there (each handed off at its next pause)."""
    state = app[STATE]
    if not state.draining:
        state.draining = True
        log.info("draining: %s in progress", state.in_progress())
        task = asyncio.get_running_loop().create_task(_hand_off_all(state), name="hand-offs")
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)


async def _hand_off_all(state: GatewayState) -> None:
    """Hand every call off if another replica takes calls; else they go on here.

    From HAND_OFF_DELAY_S after the signal: the time a load balancer takes to stop sending
    streams here. Nothing rests on it being long enough: a stream sent here meanwhile (a
    hand-off's next stream among them) is taken and handed on at its first pause, as is
    every call that starts here until the drain ends; each such bounce costs its caller
    one more gap, so the delay trades a longer drain for fewer bounces."""
    await asyncio.sleep(state.settings.hand_off_delay_s)
    try:
        others = await state.store.others_ready(state.replica)
    except StoreError as error:
        log.warning("draining: no hand-off (%s): calls go on here", error)
        return
    if not others:
        if state.calls:
            log.info("draining: no other replica ready: calls go on here")
        return
    log.info("draining: handing %d call(s) off to %d other replica(s)", len(state.calls), others)
    handed: set[Call] = set()
    async with asyncio.TaskGroup() as group:
        while True:  # until the app's cleanup cancels it
            for call in state.calls - handed:
                handed.add(call)
                group.create_task(_hand_off(state, call))
            handed &= state.calls
            await asyncio.sleep(PAUSE_POLL_S)


async def _hand_off(state: GatewayState, call: Call) -> None:
    """At the call's next pause (at the latest after HAND_OFF_WAIT_S): store what the next
    replica needs, then close the stream; Twilio asks the `<Connect action>` next."""
    for _ in range(math.ceil(state.settings.hand_off_wait_s / PAUSE_POLL_S)):
        if call not in state.calls or call.at_pause():
            break
        await asyncio.sleep(PAUSE_POLL_S)
    if call not in state.calls:
        return
    paused = call.at_pause()
    call_sid = call.start.call_sid
    saved, turns = _call_state(call, holder="")
    try:
        stored = await state.store.hand_off(call_sid, saved, turns)
    except StoreError as error:
        log.warning(
            "hand-off failed: %s; the call goes on here", error, extra={"call_sid": call_sid}
        )
        state.metrics.replica.hand_offs.labels(outcome="failed").inc()
        return
    if not stored:  # another replica took the call over (its stream was lost)
        log.info("not handed off: the call went on elsewhere", extra={"call_sid": call_sid})
        return
    if not call.hand_off():  # it began to end meanwhile: nothing to continue
        with contextlib.suppress(StoreError):
            await state.store.take_hand_off(call_sid)
        return
    state.metrics.replica.hand_offs.labels(outcome="handed_off").inc()
    log.info(
        "handed off %s",
        "at a pause" if paused else "with no pause within HAND_OFF_WAIT_S",
        extra={"call_sid": call_sid},
    )


def _call_state(call: Call, holder: str) -> tuple[CallState, list[tuple[str, str]]]:
    """What another replica needs to go on with the call, as of now."""
    machine = call.live.machine
    turns = list(machine.history.turns)
    saved = CallState(
        persona=call.persona.name,
        greeted=call.greeted,
        handle=machine.handle,
        handle_replies=machine.handle_replies,
        handle_turns=len(turns),
        usage=call.usage.counts(),
        answered_by=call.stats.answered_by,
        watch=call.watch.marks(time.monotonic()),
        handed_off_at=time.time(),
        age_s=time.monotonic() - call.stats.started_at,
        holder=holder,
        stream=_stream_nonce(call),
    )
    return saved, turns


def _stream_nonce(call: Call) -> str:
    """Which of its call's streams `call` runs on (its token's nonce; the store refuses
    this stream's writes once the call moved on to another)."""
    return StreamTokens.nonce_of(call.start.custom_parameters.get(TOKEN_PARAMETER, ""))


async def _checkpoints(state: GatewayState) -> None:
    """With a shared store, each call's state as of its newest handle, every
    CHECKPOINT_EVERY_S: what another replica goes on from if this one dies."""
    saved: dict[str, str | None] = {}  # CallSid -> the handle stored
    while True:
        await asyncio.sleep(CHECKPOINT_EVERY_S)
        calls = {call.start.call_sid: call for call in state.calls}
        for call_sid in saved.keys() - calls.keys():
            del saved[call_sid]
        for call_sid, call in calls.items():
            handle = call.live.handle
            if handle is None or saved.get(call_sid) == handle or call.stats.outcome:
                continue
            try:
                stored = await state.store.checkpoint(call_sid, *_call_state(call, state.replica))
            except StoreError as error:
                log.warning("checkpoint failed: %s", error, extra={"call_sid": call_sid})
                break
            if not stored:
                log.info("checkpoint refused: the call went on elsewhere")
            saved[call_sid] = handle


async def _recoverable(
    state: GatewayState, call_sid: str, account_sid: str, defer_s: float = 0.0
) -> tuple[CallState, str] | None:
    """A call whose stream was lost: its state and its next stream's token, if this caller
    is the one to go on with it.

    Asked only after Twilio ended the stream. A replica alive that closed the stream itself
    forgot the call's state before (nothing to go on with); one that lost the stream to the
    network keeps the call as a hand-off (`_keep_for_next_stream`), taken here once it is
    stored. A call whose replica died goes on from its last checkpoint once the stream was
    seen gone (within ALIVE_FOR_S), or ALIVE_FOR_S after its stream was reported lost
    (`stream-error`) if the replica still seems alive: one that lost its stream to the
    network stores the call's newest state as a hand-off as soon as it sees the loss, which
    may be after Twilio reported it (taking the checkpoint then would lose what the caller
    said since it). Should that replica be alive after all, it cannot write over the call
    once it goes on here (the store's fence). Either way after `defer_s` more."""
    loop = asyncio.get_running_loop()
    lost_at: float | None = None
    for _ in range(math.ceil(RECOVERY_WAIT_S / RECOVERY_POLL_S)):
        saved = await state.store.load(call_sid)
        if saved is None:
            return None  # its replica ended the call (or none held it)
        if not saved.holder:
            break  # handed off: kept by its replica for its next stream
        if saved.holder != state.replica:
            if not await state.store.replica_alive(saved.holder):
                break
            if lost_at is None and await state.store.was_lost(call_sid):
                lost_at = loop.time()
            if lost_at is not None and loop.time() - lost_at >= ALIVE_FOR_S:
                break
        await asyncio.sleep(RECOVERY_POLL_S)
    else:
        return None  # alive: it holds the call still, or ends it
    await asyncio.sleep(defer_s)
    if await state.tokens.handed_off(call_sid):
        return await _next_stream(state, call_sid, account_sid)
    saved = await state.store.load(call_sid)  # its newest checkpoint
    if saved is None or not saved.holder:
        return None  # ended, or another request took its hand-off
    token = await state.tokens.recover(call_sid, account_sid=account_sid, persona=saved.persona)
    if token is None:
        return None
    state.metrics.replica.hand_offs.labels(outcome="recovered").inc()
    age = time.time() - saved.handed_off_at
    log.warning(
        "the call's replica is gone: going on from its checkpoint of %.3f s ago",
        age,
        extra={"call_sid": call_sid},
    )
    return saved, token


async def _next_stream(
    state: GatewayState, call_sid: str, account_sid: str
) -> tuple[CallState, str] | None:
    """A call handed off (taken): its state and its next stream's token."""
    saved = await state.store.load(call_sid)
    if saved is None:
        return None
    token = await state.tokens.issue_next(call_sid, account_sid=account_sid, persona=saved.persona)
    return saved, token


async def _handed_to_us(
    state: GatewayState, call_sid: str
) -> tuple[CallState | None, list[tuple[str, str]]]:
    """The state another replica stored when it handed this call off, if it did."""
    try:
        saved = await state.store.load(call_sid)
        if saved is None or saved.handle is None:
            return None, []
        turns = await state.store.turns(call_sid)
    except StoreError as error:
        log.warning("call state not read (%s): a fresh session", error)
        return None, []
    gap = time.time() - saved.handed_off_at
    state.metrics.replica.hand_offs.labels(outcome="continued").inc()
    log.info("call continued here, %.3f s after its state was stored", gap, extra={"gap_s": gap})
    return saved, turns


async def wait_calls_done(app: web.Application, limit_s: float) -> bool:
    """Wait until no media stream is left (calls, and streams still waiting for `start`)
    or `limit_s` passes; True if all ended."""
    return await app[STATE].streams.closed(limit_s)


async def _close_streams(app: web.Application) -> None:
    for call in app[STATE].calls:
        call.shutting_down = True
    for ws in list(app[STATE].streams.sockets):
        await ws.close(code=CLOSE_GOING_AWAY, message=b"server shutdown")
