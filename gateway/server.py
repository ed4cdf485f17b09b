"""The aiohttp application: Twilio webhooks, the media-stream WebSocket, ops endpoints.

Every request from Twilio is signature-checked against `PUBLIC_URL` + path
(the URL Twilio used, never the request's Host, since the gateway runs behind
proxies). The voice webhook issues a single-use stream token; the stream's
`start` must carry it, or the stream is closed before any Live session opens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

from aiohttp import WSCloseCode, WSMsgType, web
from google import genai

from gateway.audio import FRAME_MS
from gateway.call import Call
from gateway.config import Settings
from gateway.live.session import LiveOptions, LiveSession
from gateway.logs import bind_call, register_secret
from gateway.metrics import Metrics
from gateway.personas import Persona, PersonaTable
from gateway.tools import CallTools, TwilioRest, declarations
from gateway.transcript import CallTranscript, append_record
from gateway.twilio.protocol import (
    MAX_MESSAGE_BYTES,
    InboundMessage,
    Start,
    StreamParser,
    StreamProtocolError,
)
from gateway.twilio.webhooks import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    SignatureChecker,
    SignatureResult,
    StreamTokens,
    TokenResult,
    busy_twiml,
    connect_stream_twiml,
    stream_url,
)

log = logging.getLogger(__name__)

TOKEN_PARAMETER = "token"
PERSONA_PARAMETER = "persona"
CLOSE_POLICY = 1008


@dataclass
class GatewayState:
    """Per-app state shared by the handlers."""

    settings: Settings
    metrics: Metrics
    client: genai.Client
    signatures: SignatureChecker
    tokens: StreamTokens
    stream_url: str
    live_options: LiveOptions
    personas: PersonaTable
    rest: TwilioRest  # Twilio's REST API, for the tools (tests swap in a stand-in client)
    calls: set[Call] = field(default_factory=set)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    draining: bool = False
    calls_idle: asyncio.Event = field(default_factory=asyncio.Event)

    def at_capacity(self) -> bool:
        return len(self.sockets) >= self.settings.max_calls


STATE = web.AppKey("state", GatewayState)


def live_options(settings: Settings) -> LiveOptions:
    """The Live session options a call gets from the settings."""
    return LiveOptions(
        model=settings.gemini_model,
        system_instruction=settings.system_instruction,
        voice=settings.voice or None,
        compression_trigger_tokens=settings.compression_trigger_tokens,
        compression_target_tokens=settings.compression_target_tokens,
        replay_limit_s=settings.replay_limit_s,
        reconnect_total_s=settings.reconnect_total_s,
        reconnect_max_attempts=settings.reconnect_max_attempts,
        goaway_margin_s=settings.goaway_margin_s,
        connect_timeout_s=settings.connect_timeout_s,
        caller_pause_s=settings.caller_pause_s,
    )


def persona_options(base: LiveOptions, persona: Persona) -> LiveOptions:
    """The Live options of a call answered by `persona`."""
    return replace(
        base,
        system_instruction=persona.system_instruction,
        voice=persona.voice,
        language=persona.language,
        tools=declarations(persona.tools, persona.transfer_to),
    )


def create_app(
    settings: Settings,
    *,
    client: genai.Client | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """Build the gateway application.

    The Live client honours GOOGLE_GEMINI_BASE_URL and SSL_CERT_FILE as the
    SDK reads them; tests and the demo point it at the emulator that way.
    """
    auth_token = settings.twilio_auth_token.get_secret_value()
    register_secret(auth_token)
    register_secret(settings.gemini_api_key.get_secret_value())
    # Shared by every replica that has the same auth token, so a stream may land on
    # another replica than its webhook did.
    token_secret = hmac.new(auth_token.encode(), b"gateway-stream-token", hashlib.sha256).digest()
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = GatewayState(
        settings=settings,
        metrics=metrics or Metrics(),
        client=client or genai.Client(api_key=settings.gemini_api_key.get_secret_value()),
        signatures=SignatureChecker(auth_token),
        tokens=StreamTokens(token_secret, ttl_s=settings.stream_token_ttl_s),
        stream_url=stream_url(settings.public_url),
        live_options=live_options(settings),
        personas=PersonaTable.from_settings(settings),
        rest=TwilioRest(auth_token),
    )
    app[STATE].calls_idle.set()
    app.add_routes(
        [
            web.post("/twilio/voice", voice_webhook),
            web.get("/twilio/media", media_stream),
            web.post("/twilio/status", status_webhook),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_endpoint),
        ]
    )
    app.on_shutdown.append(_close_streams)
    app.on_cleanup.append(_close_rest)
    return app


# ------------------------------------------------------------------ webhooks


async def _checked_form(request: web.Request) -> dict[str, str] | None:
    """The form parameters if Twilio's signature over them holds, else None."""
    state = request.app[STATE]
    form = await request.post()
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    url = state.settings.public_url + request.path_qs
    result = state.signatures.check(
        url,
        params,
        request.headers.get(SIGNATURE_HEADER),
        request.headers.get(SIGNATURE_SETTINGS_HEADER),
    )
    if result is not SignatureResult.OK:
        reason = f"signature_{result.value}"
        state.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected %s: %s signature", request.path, result.value)
        return None
    return params


async def voice_webhook(request: web.Request) -> web.Response:
    """Answer an incoming call with <Connect><Stream>, or busy when we cannot take it."""
    state = request.app[STATE]
    params = await _checked_form(request)
    if params is None:
        raise web.HTTPForbidden()
    call_sid = params.get("CallSid", "")
    if not call_sid:
        state.metrics.rejected.labels(reason="no_call_sid").inc()
        raise web.HTTPBadRequest(text="CallSid missing")
    if state.draining or state.at_capacity():
        reason = "draining" if state.draining else "busy"
        state.metrics.rejected.labels(reason=reason).inc()
        log.info("turned a call away (%s)", reason)
        return web.Response(text=busy_twiml(), content_type="text/xml")
    token = state.tokens.issue(call_sid)
    persona = _webhook_persona(state.personas, request, params)
    twiml = connect_stream_twiml(
        state.stream_url, {TOKEN_PARAMETER: token, PERSONA_PARAMETER: persona.name}
    )
    return web.Response(text=twiml, content_type="text/xml")


def _webhook_persona(
    personas: PersonaTable, request: web.Request, params: dict[str, str]
) -> Persona:
    """`?persona=` (outbound calls we place) if known, else by the number that was called
    (our own number, `From`, on outbound calls placed elsewhere); else the default."""
    named = request.query.get(PERSONA_PARAMETER)
    if named and named in personas.by_name:
        return personas.by_name[named]
    outbound = params.get("Direction", "inbound").startswith("outbound")
    return personas.for_number(params.get("From" if outbound else "To"))


async def status_webhook(request: web.Request) -> web.Response:
    """Twilio's call status callback: logged, so an operator sees how calls ended."""
    params = await _checked_form(request)
    if params is None:
        raise web.HTTPForbidden()
    directory = request.app[STATE].settings.transcript_dir
    call_sid = params.get("CallSid", "")
    if directory is not None and call_sid:
        record = {
            "type": "status",
            "status": params.get("CallStatus", "unknown"),
            "duration_s": params.get("CallDuration"),
            "direction": params.get("Direction"),
        }
        try:
            await asyncio.to_thread(append_record, directory, call_sid, record)
        except OSError as exc:
            log.warning("transcript status not written: %s", exc)
    log.info(
        "call status %s",
        params.get("CallStatus", "unknown"),
        extra={"call_sid": params.get("CallSid", ""), "duration": params.get("CallDuration")},
    )
    return web.Response(status=204)


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
        state.metrics.rejected.labels(reason=f"stream_signature_{signature.value}").inc()
        log.warning("rejected stream upgrade: %s signature", signature.value)
        raise web.HTTPForbidden()
    if state.draining or state.at_capacity():
        reason = "draining" if state.draining else "busy"
        state.metrics.rejected.labels(reason=f"stream_{reason}").inc()
        raise web.HTTPServiceUnavailable(text=reason)

    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True)
    await ws.prepare(request)
    state.sockets.add(ws)
    state.calls_idle.clear()
    try:
        await _serve_stream(state, ws)
    finally:
        state.sockets.discard(ws)
        if not state.sockets:
            state.calls_idle.set()
        if not ws.closed:
            await ws.close()
    return ws


async def _serve_stream(state: GatewayState, ws: web.WebSocketResponse) -> None:
    parser = StreamParser()
    settings = state.settings
    messages = _inbound(ws, parser, settings.idle_timeout_s)
    try:
        try:
            async with asyncio.timeout(settings.start_timeout_s):
                start = await _await_start(messages)
        except TimeoutError:
            raise StreamProtocolError(CLOSE_POLICY, "no start before the deadline") from None
        if start is None:
            log.info("stream closed before start")
            return
        bind_call(call_sid=start.call_sid, stream_sid=start.stream_sid)
        verdict = state.tokens.redeem(
            start.custom_parameters.get(TOKEN_PARAMETER, ""), start.call_sid
        )
        if verdict is not TokenResult.OK:
            raise StreamProtocolError(CLOSE_POLICY, f"stream token {verdict.value}")
        await _run_call(state, ws, start, messages)
    except StreamProtocolError as error:
        reason = error.reason
        state.metrics.stream_errors.labels(reason=_label(reason)).inc()
        log.warning("stream closed: %s", reason, extra={"close_code": error.close_code})
        await ws.close(code=error.close_code, message=reason.encode()[:120])
    finally:
        await messages.aclose()


async def _run_call(
    state: GatewayState,
    ws: web.WebSocketResponse,
    start: Start,
    messages: AsyncIterator[InboundMessage],
) -> None:
    metrics = state.metrics
    latency = metrics.added_latency.labels(direction="caller_to_model")
    persona = state.personas.get(start.custom_parameters.get(PERSONA_PARAMETER))
    live = LiveSession(
        state.client, persona_options(state.live_options, persona), on_audio_sent=latency.observe
    )

    async def send(text: str) -> None:
        if ws.closed:
            return
        try:
            await ws.send_str(text)
        except ConnectionResetError:
            pass  # the caller is gone; the inbound side ends the call

    tools = None
    if persona.tools:
        tools = CallTools(
            state.rest,
            account_sid=start.account_sid,
            call_sid=start.call_sid,
            tools=persona.tools,
            transfer_to=persona.transfer_to,
        )
    transcript = CallTranscript(state.settings.transcript_dir, start.call_sid)
    transcript.event("start", persona=persona.name, stream_sid=start.stream_sid)
    call = Call(
        start,
        live,
        send,
        metrics,
        greeting=persona.greeting,
        tools=tools,
        transcript=transcript,
        hangup_wait_s=state.settings.hangup_wait_s,
        batch_frames=state.settings.caller_audio_batch_ms // FRAME_MS,
    )
    state.calls.add(call)
    metrics.calls_active.inc()
    log.info("call started")
    # The call counts later connections (resumed, fallback) itself; the first one is ours.
    first = asyncio.create_task(_count_first_connection(live, metrics), name="first-conn")
    try:
        await call.run(messages)
    finally:
        first.cancel()
        state.calls.discard(call)
        metrics.calls_active.dec()
    if call.stats.failure and not ws.closed:
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"live session failed")


async def _count_first_connection(live: LiveSession, metrics: Metrics) -> None:
    await live.wait_started()
    metrics.live_connections.labels(kind="fresh").inc()


async def _await_start(messages: AsyncIterator[InboundMessage]) -> Start | None:
    async for message in messages:
        if isinstance(message, Start):
            return message
    return None


class _IdleWatch:
    """Interrupts a wait on a stream that sends nothing for ``limit`` seconds.

    One timer per stream, re-armed when it fires, instead of ``receive(timeout=...)``, which
    arms and cancels a timer for every 20 ms frame (~6% of the gateway's CPU). As with a
    timeout, the budget starts when the wait does and the waiting task is cancelled; the
    timer stops once the socket is closed.
    """

    def __init__(self, ws: web.WebSocketResponse, limit: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._ws = ws
        self._limit = limit
        self.since = self.loop.time()
        self.waiter: asyncio.Task[object] | None = None
        self.fired = False
        self.loop.call_at(self.since + limit, self._check)

    def _check(self) -> None:
        if self._ws.closed:
            return
        now = self.loop.time()
        if self.waiter is not None and now >= self.since + self._limit:
            self.fired = True
            self.waiter.cancel()
            return
        due = self.since + self._limit if self.waiter is not None else now + self._limit
        self.loop.call_at(due, self._check)


async def _inbound(
    ws: web.WebSocketResponse, parser: StreamParser, idle_timeout: float
) -> AsyncGenerator[InboundMessage]:
    """Parsed, validated Twilio messages until the socket closes."""
    idle = _IdleWatch(ws, idle_timeout)
    while True:
        task = asyncio.current_task()
        idle.since, idle.waiter = idle.loop.time(), task
        try:
            msg = await ws.receive()
        except asyncio.CancelledError:
            if idle.fired and task is not None and task.uncancel() == 0:
                raise StreamProtocolError(CLOSE_POLICY, "stream idle too long") from None
            raise
        finally:
            idle.waiter = None
        if msg.type is WSMsgType.TEXT:
            yield parser.parse(msg.data)
        elif msg.type is WSMsgType.BINARY:
            parser.parse_bytes(msg.data)
        elif msg.type is WSMsgType.ERROR:
            # aiohttp has already closed the socket with this code (1009, 1007, 1002).
            code = getattr(msg.data, "code", None)
            if code == WSCloseCode.MESSAGE_TOO_BIG:
                raise StreamProtocolError(1009, "message too big")
            if code == WSCloseCode.INVALID_TEXT:
                raise StreamProtocolError(1007, "invalid UTF-8 text")
            raise StreamProtocolError(int(code or 1002), "websocket protocol error")
        else:  # CLOSE, CLOSING, CLOSED
            return


def _label(reason: str) -> str:
    """A low-cardinality metric label from an error reason."""
    return reason.split(":")[0].strip().replace(" ", "_")[:40]


# ---------------------------------------------------------------------- ops


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return web.Response(status=503, text="draining\n")
    if state.at_capacity():
        return web.Response(status=503, text="at call limit\n")
    return web.Response(text="ready\n")


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def start_draining(app: web.Application) -> None:
    """Fail readiness and turn new calls away; calls in progress go on."""
    state = app[STATE]
    if not state.draining:
        state.draining = True
        log.info("draining: %d call(s) in progress", len(state.sockets))


async def wait_calls_done(app: web.Application, limit_s: float) -> bool:
    """Wait until no call is left or `limit_s` passes; True if all ended."""
    state = app[STATE]
    deadline = time.monotonic() + limit_s
    while state.sockets:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await state.calls_idle.wait()
        except TimeoutError:
            return False
    return True


async def _close_rest(app: web.Application) -> None:
    await app[STATE].rest.close()


async def _close_streams(app: web.Application) -> None:
    for call in app[STATE].calls:
        call.shutting_down = True
    for ws in list(app[STATE].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
