"""Gemini Live API emulator: the BidiGenerateContent WebSocket, as the google-genai SDK uses it.

The unmodified SDK (``client.aio.live.connect`` in Gemini Developer API mode) connects to it
over TLS; tests and the benchmark point the SDK here with ``HttpOptions(base_url=...)`` or
``GOOGLE_GEMINI_BASE_URL`` plus ``SSL_CERT_FILE`` (see :mod:`gateway.testing.tls`).

Wire protocol, as checked against google-genai 3.6 (``live.py``, ``_api_client.py``):

* URL ``wss://HOST/ws/google.ai.generativelanguage.{v1,v1beta,v1alpha}.GenerativeService.
  BidiGenerateContent`` (the SDK's default version is ``v1``). The SDK sends the key in the
  ``x-goog-api-key`` header; ``?key=`` is accepted too. Frames are JSON; the SDK mixes
  snake_case envelopes (``realtime_input``) with camelCase bodies, so every key is accepted
  in either spelling (proto3 JSON). Client base64 is URL-safe (SDK) or standard.
* ``connect()`` sends ``{"setup": ...}`` and waits for one message. Every refusal here is a
  close frame sent *after* reading the setup, which the SDK turns into
  ``google.genai.errors.APIError`` (``.code`` = the close code, plain ``APIError`` since
  1007/1008/1011 are outside 4xx/5xx) raised out of ``connect().__aenter__``:

  ======================================  ====  ==================================================
  cause                                   code  reason
  ======================================  ====  ==================================================
  no API key                              1008  "Method doesn't allow unregistered callers ..."
  wrong API key                           1007  "API key not valid. Please pass a valid API key."
  model not served (``config.models``)    1008  "models/X is not found for API version v1, or is
                                                not supported for bidiGenerateContent. ..."
  unknown / expired / ended handle        1008  "Session resumption handle is invalid or expired."
  outage (:meth:`refuse_connections`)     1011  "The service is currently unavailable."
  malformed JSON / unknown field / b64    1007  "Invalid JSON payload received. ..."
  message before setup, second setup      1008  "... must be the first message ..."
  ======================================  ====  ==================================================

  With ``EmulatorConfig.refuse_with_http`` an outage is an HTTP 503 at the handshake instead;
  the SDK does not wrap that: ``websockets.exceptions.InvalidStatus`` escapes ``connect()``.
* The models API the SDK's ``client.aio.models.get`` calls: ``GET /{v1,v1beta,v1alpha}/
  models/{id}`` with ``x-goog-api-key`` answers the model resource of ``config.models``
  (``supportedGenerationMethods`` lists ``bidiGenerateContent`` for a Live model); a wrong key
  is ``400 INVALID_ARGUMENT`` with reason ``API_KEY_INVALID``, no key ``403
  PERMISSION_DENIED``, a model not served ``404 NOT_FOUND`` (the real message for models.get
  was not found; the Live close reason above is quoted by several client projects), an
  outage (:meth:`refuse_connections`) ``503 UNAVAILABLE``. Errors have Google's JSON shape.
* Vertex AI (``vertexai=True``, base URL in ``GOOGLE_VERTEX_BASE_URL``; :class:`VertexService`):
  ``wss://HOST/ws/google.cloud.aiplatform.{v1,v1beta1}.LlmBidiService/BidiGenerateContent``
  (the SDK's default ``v1beta1``), ``Authorization: Bearer`` with a token the emulator issued
  at ``POST /token`` for a registered service account (google-auth's signed JWT assertion,
  :mod:`gateway.testing.service_account`), or ``x-goog-api-key`` with ``vertex_api_key``
  (express mode); ``setup.model`` is ``projects/P/locations/L/publishers/google/models/M``
  (``publishers/google/models/M`` in express mode), closed 1008 where L does not serve M.
  A Vertex connection ends after its goAway with 1000 "The operation was cancelled.", reports
  output tokens as ``candidatesTokenCount``, and with ``sessionResumption.transparent`` each
  handle carries ``lastConsumedClientMessageIndex``: the connection's last client message its
  state holds (the setup 0, each message processed one more; an int64, so a JSON string).
* Connection lifetime: ``goAway{timeLeft:"9.5s"}`` (protobuf Duration string) at
  ``lifetime - goaway_lead`` (at once, announcing what is left, when the lead is longer than
  that), then a close at ``lifetime`` with ``goaway_close_code``: **1011 "Deadline expired
  before operation could complete."** or 1000 "The operation was cancelled.".
  ``session.receive()`` then raises ``APIError`` with that code. :meth:`LiveEmulator.go_away`
  announces the end of one connection now.
* Session limit (no ``contextWindowCompression`` in the session's first setup): the session
  ends ``session_limit`` s after it was created, across resumptions, with close 1011
  "Session time limit exceeded." and no goAway; its handles stop working.
* Cuts at any moment, also during a setup (:meth:`LiveEmulator.cut`, or per connection
  ``abrupt_after`` + U(0, ``abrupt_jitter``) with a kind drawn from ``abrupt_kinds``): a TCP
  reset (SO_LINGER 0 + ``transport.abort()``, no close frame: the SDK's ``receive()`` raises
  ``APIError`` 1006, a send ``websockets.exceptions.ConnectionClosedError``) or a close frame
  with a code (:data:`CLOSE_REASONS`: 1000, 1007, 1008, 1011, each with a reason reported for
  it). :meth:`LiveEmulator.refuse_next` refuses the next N connections: HTTP 503 at the
  handshake, a reset during the setup, or a close code after it.
* Stalls (:meth:`LiveEmulator.stall`): a connection stops sending anything, pongs included,
  while its socket stays open and its input is still read (a wedged service behind a live
  TCP stack): only the client's own liveness check can tell. :meth:`LiveEmulator.cut_path`
  also stops reading, its receive buffer shrunk: the client's window closes and what it writes
  goes unacknowledged, as through a dead route.
* Server frames are camelCase JSON sent as binary frames; ``setupComplete`` is ``{}`` (the
  Developer API does not send a session id).

Resumption: when the setup carries ``sessionResumption``, a ``sessionResumptionUpdate`` goes
out every ``handle_interval`` and after every model turn: ``{newHandle, resumable:true}``,
or ``{resumable:false}`` while a reply is being generated or a ``toolCall`` waits for its
``toolResponse``. A handle is a snapshot of what the model holds (audio, turns, text history,
listening state, session start, compression) -- of the input the service had *processed* when
it issued it: with ``input_delay``, input still in flight is not in it. Resuming replaces the
session's state by that snapshot, so input the old connection delivered after the handle is
not in the new lineage. :class:`SessionRecord` shows the lineage of the latest resumption.

Behaviour knobs, and what each default rests on (sources: /work/shared/live-service-notes.md
and the public threads named there; nobody here can call the real service, so where the record
is thin every reading can be played):

==========================  ==================  ==============================================
knob                        default             rests on
==========================  ==================  ==============================================
``setup_latency``           U(0.2, 0.6) s       The SDK's ``connect()`` waits for
                                                ``setupComplete``; setups take hundreds of ms
                                                in practice (a resume reconnect "~300ms",
                                                pipecat#4403). Instant answers are an
                                                emulator artefact.
``concurrent_resume``       ``"refuse"``        The only public report (aicc2025/sip-to-ai
                                                PR #14, "verified against the live API"):
                                                a resume while an earlier socket of the
                                                session is open is rejected with 1011. No
                                                source says one is accepted; ``"fork"``
                                                (each connection its own state) and
                                                ``"takeover"`` (the newer owns the session
                                                from its accepted setup on; the older's
                                                input is dropped and counted, its reply
                                                stops, its later handles describe the
                                                newer's state) play the unknown case.
``handle_interval``         U(0.2, 1.0) s       Undocumented; the independent stand-in of
                                                issue 12, built from reports, issues them
                                                every few hundred ms. 0.2 s to 5 s are all
                                                plausible (a value or a (min, max) range).
``input_delay``             0 s                 One-way network delay of client messages
                                                (and pings): in flight meanwhile, so not in
                                                a handle. The Gemini API cannot say what a
                                                handle covers (``lastConsumedClientMessage
                                                Index`` needs ``transparent``, Vertex only).
``pong_delay``              0 s                 Extra pong delay, U(min, max) s, in order;
                                                any value plays, (0, 30) too. sip-to-ai PR
                                                #14 measured Gemini pongs at 8-30 s
                                                (/work/shared/live-service-notes.md): a
                                                ping's round trip need not measure the
                                                network, and a keepalive that waits 20 s
                                                for a pong cuts healthy connections.
``goaway_lead``             50 s                ``goAway{timeLeft:"50s"}`` on the Gemini API
                                                (kizuna-ai-lab/sokuji#179); ~30 s on Vertex
                                                (third-party), ~60 s (Firebase docs).
``goaway_close_code``       1011                sokuji#179: 1011 "Deadline expired before
                                                operation could complete."; on Vertex 1000
                                                "The operation was cancelled."
                                                (pipecat#3112).
``after_cut_reply``         ``"repeat"``        Unknown. Resumed from a handle issued before a
                                                reply that was cut off, with the caller's
                                                audio replayed: ``"repeat"`` says the reply
                                                again; ``"wait"`` holds that utterance as
                                                answered and waits for new speech or text.
``compress``                ``False``           The SDK's websockets client offers
                                                permessage-deflate; whether the real endpoint
                                                accepts it is not known here (under
                                                investigation). False keeps the emulator's
                                                behaviour until then.
``lifetime``                600 s               About 10 minutes per connection (many
                                                reports, e.g. pipecat#3112).
``session_limit``           900 s               Audio-only sessions without compression end
                                                at 15 minutes (Live API docs, via sokuji#179).
``handle_ttl``              7200 s              2 h on the Gemini API (24 h on Vertex).
``vertex_audio_stream_end`` ``False``           ``realtimeInput.audioStreamEnd`` on the Vertex
                                                path: Google's Vertex wire reference lists no
                                                such field ("implicit on silence"); SDK 3.6
                                                passes it. Unknown, so refused there (close
                                                1007, unknown field); the Gemini API takes it
                                                (live-models.md §2.2, §9 row 36).
==========================  ==================  ==============================================

Close reasons (:data:`CLOSE_REASONS`): 1000 "The operation was cancelled." (pipecat#3112),
1007 "Request contains an invalid argument." (pipecat#4403), 1008 "The operation was
aborted." (autonomous-os#238, through a proxy), 1011 "The service is currently unavailable.".

:func:`gateway.testing.harness.quick_emulator` keeps instant setups and forking resumes for
the tests written against them.

The "model": an energy VAD on the 16 kHz input (20 ms windows, audio time). After
``min_speech_s`` of speech and ``end_of_speech_s`` of silence it replies with a sine of
``reply_freq(n)`` Hz, n = model turns the session's state holds + 1, whose level rises evenly
from ``REPLY_LEVELS[0]`` to ``REPLY_LEVELS[1]`` of full scale over the reply, so a listener can
tell where in a reply a sound is (:func:`reply_position`): a reply that plays on after a stall
from one said again from its start. Speech during a reply interrupts it. Each model turn ends with a
``usageMetadata`` (on ``turnComplete``, or on ``interrupted`` for its share of the reply) as
:mod:`gateway.testing.billing` bills it for the setup's model (``billing_profiles``): the
session's whole context again each turn; ``SessionRecord.bill`` sums what it was sent.
Config knobs are read when used: timers, the setup latency and ``input_delay`` when a
connection opens, VAD and reply settings on each use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import math
import random
import re
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal

import numpy as np
from aiohttp import WSMsgType, web
from google.auth import jwt as google_jwt

from gateway.testing import billing
from gateway.testing.model_behaviour import (
    BEHAVIOURS,
    ModelBehaviour,
    ToolModes,
    instruction_text,
    setup_refusal,
)
from gateway.testing.tls import TestTLS

log = logging.getLogger(__name__)

IN_RATE = 16_000
OUT_RATE = 24_000
REPLY_LEVELS = (0.15, 0.45)  # a reply's amplitude at its start and at its end (full scale 1)
WINDOW_S = 0.02
WINDOW_BYTES = int(IN_RATE * WINDOW_S) * 2
#: The first piece of a caller's transcript where the model streams it while they speak
#: (`ModelBehaviour.input_transcription_incremental`); the rest comes at the utterance's end.
TX_HEAD = "caller "

REASON_NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
REASON_BAD_KEY = "API key not valid. Please pass a valid API key."
REASON_BAD_HANDLE = "Session resumption handle is invalid or expired."
REASON_UNAVAILABLE = "The service is currently unavailable."
REASON_DEADLINE = "Deadline expired before operation could complete."
REASON_SESSION_LIMIT = "Session time limit exceeded."
REASON_SHUTDOWN = "Server is shutting down."
REASON_CANCELLED = "The operation was cancelled."  # 1000, Vertex (pipecat#3112)
REASON_INVALID = "Request contains an invalid argument."  # 1007 (pipecat#4403)
REASON_ABORTED = "The operation was aborted."  # 1008 (autonomous-os#238)
# The reason a cut with a given close code carries.
CLOSE_REASONS = {
    1000: REASON_CANCELLED,
    1007: REASON_INVALID,
    1008: REASON_ABORTED,
    1011: REASON_UNAVAILABLE,
}
# The reason of the close that ends a connection after its goAway.
GOAWAY_REASONS = {1011: REASON_DEADLINE, 1000: REASON_CANCELLED}

_PATH = re.compile(
    r"^/ws/google\.ai\.generativelanguage\.(v1|v1beta|v1alpha)\.GenerativeService\."
    r"(BidiGenerateContent|BidiGenerateContentConstrained)$"
)
# Vertex AI: the Live path, a model as the SDK names it there (the ADC path prefixes project
# and location; express mode does not), and the OAuth token endpoint a test service
# account's `token_uri` names (see VertexService).
_VERTEX_PATH = re.compile(
    r"^/ws/google\.cloud\.aiplatform\.(v1|v1beta1)\.LlmBidiService/BidiGenerateContent$"
)
_VERTEX_MODEL = re.compile(
    r"^(?:projects/([^/]+)/locations/([^/]+)/)?publishers/google/models/([^/]+)$"
)
TOKEN_PATH = "/token"
# "Gemini Live API 2.5 models are not available in global" (Firebase AI Logic's locations
# page; live-models.md §5); a location that does not serve the model closes 1008 (litellm
# PR 39851), reason as a third-party table quotes it.
VERTEX_REGIONAL_ONLY = (
    "gemini-live-2.5-flash-native-audio",
    "gemini-live-2.5-flash-preview-native-audio-09-2025",
)
REASON_MODEL_NOT_FOUND = "Publisher model was not found."
# Google's standard UNAUTHENTICATED texts; over the Live socket, as the other refusals here,
# a close 1008 after the setup (how Vertex refuses a socket's credentials is not documented).
REASON_NO_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential."
)
REASON_BAD_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential."
)
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The audience google-auth puts in a service account's assertion, whatever its token_uri.
_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
_MODELS_PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/]+)$")
LIVE_METHOD = "bidiGenerateContent"


def _model_resource(
    model: str, display: str, methods: list[str], tokens_in: int, tokens_out: int
) -> dict[str, Any]:
    """A Gemini API model resource as ``GET /{version}/models/{id}`` answers it."""
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": display,
        "description": display,
        "inputTokenLimit": tokens_in,
        "outputTokenLimit": tokens_out,
        "supportedGenerationMethods": methods,
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    }


#: Models the emulator's Gemini API knows (live-models.md, the model table and §9 rows 1,
#: 31, 32: [G38][G38ET][G31][G25][D167186]); ``gemini-2.5-flash`` is a model without Live
#: support. ``gemini-live-2.5-flash-preview`` is absent: shut down 2025-12-09 [GCHGzh][GDEP6].
MODELS: dict[str, dict[str, Any]] = {
    m[0]: _model_resource(*m)
    for m in (
        ("gemini-3.8-live", "Gemini 3.8 Live", [LIVE_METHOD, "countTokens"], 131072, 65536),
        (
            "gemini-3.8-live-extended-thinking",
            "Gemini 3.8 Live Extended Thinking",
            [LIVE_METHOD, "countTokens"],
            131072,
            65536,
        ),
        (
            "gemini-3.1-flash-live-preview",
            "Gemini 3.1 Flash Live Preview",
            [LIVE_METHOD, "countTokens"],
            131072,
            65536,
        ),
        (
            "gemini-2.5-flash-native-audio-preview-12-2025",
            "Gemini 2.5 Flash Native Audio Preview 12-2025",
            [LIVE_METHOD, "countTokens"],
            131072,
            8192,
        ),
        (
            "gemini-2.5-flash-native-audio-preview-09-2025",
            "Gemini 2.5 Flash Native Audio Preview 09-2025",
            [LIVE_METHOD, "countTokens"],
            131072,
            8192,
        ),
        (
            "gemini-2.5-flash",
            "Gemini 2.5 Flash",
            ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"],
            1048576,
            65536,
        ),
    )
}
#: Models the emulator's Vertex AI knows (live-models.md, the model table and §5: [V25]
#: [V38][V25-09]); which locations serve them: VertexService.check_setup.
VERTEX_MODELS = (
    "gemini-3.8-live",
    "gemini-live-2.5-flash-native-audio",
    "gemini-live-2.5-flash-preview-native-audio-09-2025",
)
_VERTEX_MODELS_PATH = re.compile(
    r"^/(v1|v1beta1)/(?:projects/([^/]+)/locations/([^/]+)/)?publishers/google/models/([^/]+)$"
)
#: Shut-down models, with the day (what a 404 for one of them stands for).
RETIRED_MODELS = {"gemini-live-2.5-flash-preview": "2025-12-09"}


def _google_error(status: int, code: str, message: str, reason: str = "") -> web.Response:
    """An error as Google APIs answer one (``{"error": {code, message, status, details}}``)."""
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if reason:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return web.json_response({"error": error}, status=status)


def not_found_reason(model: str, version: str) -> str:
    """The close reason of a Live setup naming a model the service does not serve."""
    return (
        f"models/{model} is not found for API version {version}, or is not supported for "
        "bidiGenerateContent. Call ListModels to see the list of available models and their "
        "supported methods."
    )


_CLIENT_KEYS = frozenset(
    {"setup", "clientContent", "realtimeInput", "toolResponse", "contextUpdate"}
)


def reply_position(rms: float) -> float:
    """Where in a reply (0 its start, 1 its end) a 20-ms window of this RMS (16-bit) lies."""
    low, high = REPLY_LEVELS
    return (rms * math.sqrt(2) / 32767 - low) / (high - low)


def reply_freq(n: int) -> float:
    """Frequency (Hz) of the emulator's n-th model reply in a session (1-based)."""
    return 500.0 + 50.0 * ((n - 1) % 50)


def format_duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form: ``9.5s``, ``10s``."""
    text = f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


ConcurrentResume = Literal["fork", "takeover", "refuse"]
AfterCutReply = Literal["repeat", "wait"]
# How a connection ends when the emulator cuts it: a TCP reset, or a close frame with a code.
CutKind = Literal["reset"] | int
# How a connection is refused (refuse_next): HTTP 503 at the handshake, a TCP reset during
# the setup, or a close frame with a code after reading the setup.
RefusalKind = Literal["http", "reset"] | int


@dataclass
class EmulatorConfig:
    """Knobs; mutable while the emulator runs (see the module docstring for when each is read
    and what each default rests on). Times are wall-clock seconds; ``speed`` compresses only
    the model's own pauses and replies."""

    lifetime: float = 600.0
    lifetime_jitter: float = 0.0  # each connection lives lifetime + U(0, jitter)
    goaway_lead: float = 50.0
    goaway_close_code: int = 1011  # the cut after a goAway: 1011 (Gemini API) or 1000 (Vertex)
    session_limit: float = 900.0
    setup_latency: tuple[float, float] = (0.2, 0.6)  # per connection, U(min, max)
    handle_interval: float | tuple[float, float] = (0.2, 1.0)  # a value or U(min, max) each
    handle_ttl: float = 7200.0
    concurrent_resume: ConcurrentResume = "refuse"
    after_cut_reply: AfterCutReply = "repeat"
    input_delay: float = 0.0  # one-way network delay of client -> service messages (and pings)
    pong_delay: tuple[float, float] = (0.0, 0.0)  # extra U(min, max) before a pong, in order
    compress: bool = False  # accept the client's permessage-deflate offer
    vad_threshold_db: float = -40.0
    end_of_speech_s: float = 0.5
    min_speech_s: float = 0.1
    reply_s: float = 1.0
    chunk_s: float = 0.04
    speed: float = 1.0
    pace: float = 1.05  # replies go out this much faster than real time, like the service
    response_delay_s: float = 0.2
    api_key: str = "test-key"
    abrupt_after: float | None = None
    abrupt_jitter: float = 0.0
    abrupt_kinds: tuple[CutKind, ...] = ("reset",)  # one drawn per connection
    seed: int = 0
    refuse_with_http: bool = False  # outage as HTTP 503 instead of close 1011
    record_audio: bool = True  # keep held audio bytes (off for long benchmarks: memory)
    audio_head_bytes: int = 0  # without record_audio: keep this much of each lineage's start
    setup_timeout: float = 10.0
    close_timeout: float = 2.0
    # How each model behaves (gateway.testing.model_behaviour): what its setup refuses,
    # clientContent policy, tool blocking, multi-part events, session cap. A model not
    # listed is played permissively.
    behaviours: dict[str, ModelBehaviour] = field(default_factory=lambda: dict(BEHAVIOURS))
    # The models the service serves (the models API's answers, the models a Live setup may
    # name): id -> model resource. Take one out to retire it while the emulator runs.
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(MODELS))
    # A setup naming a model not served (or one without bidiGenerateContent) closes with this
    # code and not_found_reason(): 1008, as client projects quote the real service.
    unknown_model_close: int = 1008
    # Function calling: a clientContent text turn containing a key gets a reply whose first
    # audio chunk is followed by toolCall{name, args} (the value). Recorded as events.
    tool_call_on_text: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    # Vertex AI (VertexService): its express-mode key, the life of the OAuth tokens it
    # issues, the models it does not serve in `global`, where an express-mode connection is
    # served, and how a connection's end after its goAway is closed.
    vertex_api_key: str = "test-vertex-key"
    vertex_token_ttl: float = 3600.0
    vertex_regional_only: tuple[str, ...] = VERTEX_REGIONAL_ONLY
    vertex_express_location: str = "global"
    vertex_goaway_close_code: int = 1000
    vertex_audio_stream_end: bool = False  # accepted on the Vertex path (else close 1007)
    # How each model's sessions are billed (gateway.testing.billing: rates, re-billing).
    billing_profiles: dict[str, billing.BillingProfile] = field(
        default_factory=lambda: dict(billing.PROFILES)
    )


@dataclass
class TurnRecord:
    """One model reply; ``finished_at`` stays None if its connection died mid-reply."""

    index: int
    trigger: Literal["audio", "text"]
    started_at: float
    finished_at: float | None
    interrupted: bool
    freq_hz: float
    utterance: int = 0  # the caller utterance it answers (0: a text turn)
    cut: bool = False  # its connection ended (or was taken over) while it was being said


@dataclass
class SessionState:
    """What the model holds for one lineage of a session; lists only ever grow."""

    session_id: str
    created_at: float
    compression: bool
    audio: bytearray = field(default_factory=bytearray)
    audio_bytes: int = 0
    turns: list[TurnRecord] = field(default_factory=list)
    history_text: list[tuple[str, str]] = field(default_factory=list)
    model_turns: int = 0  # finished or interrupted replies + "model" turns given as history
    utterances: int = 0
    # Seconds of speech (windows over the VAD threshold) of each utterance taken as a turn:
    # whether a caller's turn reached the model whole (silence suppression must cut none).
    # Append-only, like `turns`: a snapshot holds a prefix.
    utterance_speech_s: list[float] = field(default_factory=list)
    context: billing.Context = field(default_factory=billing.Context)  # in tokens
    # The system instruction: the setup's, or the latest contextUpdate's (kept through
    # compression, like the setup's).
    instruction: str = ""


@dataclass(frozen=True)
class _Snapshot:
    """A handle's view of a state: prefixes of its append-only lists, so issuing is O(1)."""

    state: SessionState
    audio_bytes: int
    n_turns: int
    n_history: int
    model_turns: int
    utterances: int
    issued_at: float
    # Turn detection in progress (voiced windows, silent windows, speech confirmed, a
    # partial window): the session's listening state is part of what it holds, so an
    # utterance begun before a reset and finished after it is still one turn.
    vad: tuple[int, int, bool, bytes] = (0, 0, False, b"")
    context: billing.Context = billing.EMPTY
    conn_id: int = 0  # the connection that issued it
    instruction: str = ""

    def restore(self) -> SessionState:
        s = self.state
        return SessionState(
            session_id=s.session_id,
            created_at=s.created_at,
            compression=s.compression,
            audio=bytearray(s.audio[: self.audio_bytes]),
            audio_bytes=self.audio_bytes,
            turns=s.turns[: self.n_turns],
            history_text=s.history_text[: self.n_history],
            model_turns=self.model_turns,
            utterances=self.utterances,
            utterance_speech_s=s.utterance_speech_s[: self.utterances],
            context=self.context,
            instruction=self.instruction,
        )


@dataclass
class ConnectionRecord:
    """One WebSocket; ``setup`` is the raw setup JSON (also kept when the setup was refused)."""

    id: int
    session_id: str
    opened_at: float
    closed_at: float | None
    close_kind: str | None  # goaway|abrupt|cut|client|session_limit|error|refused|...
    setup: dict[str, Any]
    resumed_from: str | None
    refused: bool
    close_code: int | None = None
    audio_bytes_received: int = 0  # caller audio the session processed from this connection
    messages_received: int = 0  # client frames read after the setup (in flight or processed)
    handles_issued: int = 0  # resumable handles sent on it
    ends_at: float | None = None  # when its lifetime ends (its goAway comes before)
    setup_latency: float = 0.0  # drawn for this connection
    setup_completed_at: float | None = None
    compressed: bool = False  # permessage-deflate negotiated
    superseded_by: int | None = None  # takeover: the connection that took the session over
    dropped_messages: int = 0  # takeover: client messages ignored once superseded
    dropped_audio_bytes: int = 0  # takeover: caller audio among them
    in_flight_lost_bytes: int = 0  # input_delay: caller audio still in flight at the server's
    # close or cut (never processed)
    # Resumed: the connection that issued its handle, and the caller audio (bytes) it held.
    resumed_holding: tuple[int, int] | None = None
    api_version: str = "v1"  # of its URL


@dataclass
class SessionRecord:
    """A session; ``state`` (and ``audio``/``turns``/``history_text``) is the lineage of the
    latest connection that created or resumed it."""

    id: str
    created_at: float
    connection_ids: list[int]
    state: SessionState
    ended_at: float | None = None
    # Utterances (numbers in the lineage) whose reply was cut off by the end of its
    # connection; with after_cut_reply="wait" a resumed lineage treats them as answered.
    cut_replies: set[int] = field(default_factory=set)
    withheld: list[int] = field(default_factory=list)  # utterances left unanswered ("wait")
    capped: bool = False  # a connection of it was closed at the model's session cap
    bill: billing.Bill = field(default_factory=billing.Bill)  # every usage report it was sent

    @property
    def audio(self) -> bytearray:
        return self.state.audio

    @property
    def turns(self) -> list[TurnRecord]:
        return self.state.turns

    @property
    def history_text(self) -> list[tuple[str, str]]:
        return self.state.history_text


@dataclass
class EmulatorRecord:
    """What happened, for tests to assert on. Expired handles are dropped from
    ``handles_issued`` (memory: a long benchmark issues one per connection per second)."""

    connections: list[ConnectionRecord] = field(default_factory=list)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    handles_issued: dict[str, tuple[str, float]] = field(default_factory=dict)
    handles_used: list[str] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def event(self, kind: str, detail: str) -> None:
        self.events.append((time.monotonic(), kind, detail))


class _Refused(Exception):
    """Close the connection with this code and reason (protocol error or refusal)."""

    def __init__(self, code: int, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind


def _camel(key: str) -> str:
    if "_" not in key:
        return key
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _normalize(value: Any) -> Any:
    """Recursively rename snake_case keys to camelCase (proto3 JSON accepts both)."""
    if isinstance(value, dict):
        return {_camel(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _normalize_message(obj: dict[str, Any]) -> dict[str, Any]:
    """``_normalize`` with a shallow fast path for the audio stream (most of the traffic)."""
    if len(obj) == 1:
        key, body = next(iter(obj.items()))
        if key in ("realtime_input", "realtimeInput") and isinstance(body, dict):
            inner = {_camel(k): v for k, v in body.items()}
            audio = inner.get("audio")
            if isinstance(audio, dict):
                inner["audio"] = {_camel(k): v for k, v in audio.items()}
            if "mediaChunks" in inner:
                inner["mediaChunks"] = _normalize(inner["mediaChunks"])
            return {"realtimeInput": inner}
    result: dict[str, Any] = _normalize(obj)
    return result


def _b64decode(data: Any) -> bytes:
    if not isinstance(data, str):
        raise _Refused(1007, "Invalid JSON payload received. Blob data is not a string.", "error")
    text = data.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        reason = "Invalid value at 'data' (TYPE_BYTES), Base64 decoding failed."
        raise _Refused(1007, reason, "error") from None


def _audio_rate(mime: Any) -> int | None:
    """Sample rate of an ``audio/pcm`` mime type (16 kHz when omitted); None if not PCM audio."""
    if not isinstance(mime, str) or not mime.startswith("audio/pcm"):
        return None
    match = re.search(r"rate=(\d+)", mime)
    return int(match.group(1)) if match else IN_RATE


@functools.lru_cache(maxsize=512)
def _reply_frames(freq: float, reply_s: float, chunk_s: float, parts: int = 1) -> tuple[bytes, ...]:
    """Pre-encoded serverContent frames of one reply tone (cached: CPU for 200 calls); each
    frame's chunk in `parts` parts (a multi-part model's events)."""
    n = max(1, round(reply_s * OUT_RATE))
    t = np.arange(n, dtype=np.float64) / OUT_RATE
    low, high = REPLY_LEVELS
    level = low + (high - low) * t / max(reply_s, 1e-9)
    pcm = (level * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()
    step = max(2, round(chunk_s * OUT_RATE) * 2)
    frames = []
    mime = f"audio/pcm;rate={OUT_RATE}"
    for i in range(0, len(pcm), step):
        chunk = pcm[i : i + step]
        cut = max(2, len(chunk) // parts // 2 * 2)
        pieces = [chunk[j : j + cut] for j in range(0, len(chunk), cut)]
        found = [
            {"inlineData": {"mimeType": mime, "data": base64.b64encode(p).decode("ascii")}}
            for p in pieces
        ]
        frames.append(json.dumps({"serverContent": {"modelTurn": {"parts": found}}}).encode())
    return tuple(frames)


def _dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _audio_bytes(msg: dict[str, Any]) -> int:
    """Bytes of audio a (normalized) client message carries; 0 if it is not realtime audio."""
    rt = msg.get("realtimeInput")
    if not isinstance(rt, dict):
        return 0
    blobs = [rt.get("audio"), *(rt.get("mediaChunks") or [])]
    total = 0
    for blob in blobs:
        if isinstance(blob, dict) and _audio_rate(blob.get("mimeType")) is not None:
            with contextlib.suppress(_Refused):
                total += len(_b64decode(blob.get("data", "")))
    return total


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return rng.uniform(lo, hi) if hi > lo else max(lo, 0.0)


class _Connection:
    """One WebSocket: its timers, VAD and reply task; owns every task it starts."""

    def __init__(
        self,
        emu: LiveEmulator,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        record: ConnectionRecord,
    ) -> None:
        self.emu = emu
        self.ws = ws
        self.transport = transport
        self.rec = record
        self.state: SessionState | None = None
        self.session: SessionRecord | None = None
        self.resumption = False
        self.in_tx = False
        self.out_tx = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.reply_task: asyncio.Task[None] | None = None
        self.reply_frames_left = 0  # audio frames of the reply being said not yet sent
        self.reply_frames = 0  # all of them
        self.next_tool_call: tuple[str, dict[str, Any]] | None = None
        self.behaviour = ModelBehaviour()  # the model's, once its setup is read
        self._tx_head = False  # the current utterance's first transcript piece went out
        self.tool_modes = ToolModes(default="NON_BLOCKING")  # unlisted: never waits
        self._tool_answered = asyncio.Event()
        self.history_open = False  # initial history announced and not complete yet
        self.end_of_speech_s: float | None = None  # the setup's silenceDurationMs
        self.barge_in = True  # the setup's activityHandling is not NO_INTERRUPTION
        self.pending_tool_calls: set[str] = set()  # toolCall ids not answered yet
        self.turn: TurnRecord | None = None
        self.closing = False
        self.close_task: asyncio.Task[Any] | None = None
        self.setup_received = False  # its first message was read
        self.setup_done = False  # setupComplete sent
        self.superseded_by: _Connection | None = None  # takeover
        self.stalled = False  # sends nothing more, pongs included (LiveEmulator.stall)
        self._pending = b""
        self._voiced = 0  # voiced windows in the current utterance
        self._silent = 0  # silent windows since the last voiced one
        self._speech_confirmed = False
        # input_delay: client messages in flight, (due, data); None marks the client's close
        self._inbox: deque[tuple[float, str | bytes | None]] = deque()
        self._inbox_wake = asyncio.Event()
        self._processor: asyncio.Task[None] | None = None
        self._pongs: deque[tuple[float, bytes]] = deque()
        self._pong_wake = asyncio.Event()
        self._ponger: asyncio.Task[None] | None = None
        self._last_pong_at = 0.0
        self.vertex = False  # reached on the Vertex AI path
        self.transparent = False  # Vertex: handles name the last client message they hold
        self.consumed = 0  # index of the last client message processed (the setup is 0)

    # --- plumbing -------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A timer or reply that crashed is a bug: log it and end the connection with 1011."""
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("emulator connection %d task failed", self.rec.id, exc_info=exc)
        self.request_close(1011, f"Internal error encountered: {type(exc).__name__}", "error")

    async def send(self, message: dict[str, Any] | bytes) -> None:
        if self.closing or self.ws.closed or self.stalled:
            return
        data = message if isinstance(message, bytes) else _dumps(message)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_bytes(data)

    def request_close(self, code: int, reason: str, kind: str) -> None:
        """Send a close frame (once); the handler waits for the close handshake."""
        if self.closing:
            return
        self.closing = True
        self.rec.close_kind = kind
        self.rec.close_code = code
        self.emu.record.event("close", f"conn={self.rec.id} kind={kind} code={code} {reason}")
        message = reason.encode()[:123]
        self.close_task = asyncio.ensure_future(self.ws.close(code=code, message=message))

    def abort(self, kind: str) -> None:
        """Reset the TCP connection: no goAway, no close frame."""
        if self.closing:
            return
        self.closing = True
        self.rec.close_kind = kind
        self.rec.close_code = 1006
        self.emu.record.event("close", f"conn={self.rec.id} kind={kind} tcp reset")
        self.reset_transport()

    def cut(self, how: CutKind, kind: str) -> None:
        """End the connection now: a TCP reset, or a close frame with code ``how``."""
        if how == "reset":
            self.abort(kind)
        else:
            self.request_close(how, CLOSE_REASONS.get(how, REASON_UNAVAILABLE), kind)

    def reset_transport(self) -> None:
        """SO_LINGER 0 then abort: the kernel sends RST instead of FIN."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def end(self) -> None:
        """The connection is over: a reply still being said was cut off; input still in
        flight never reached the service."""
        self._stop_reply()
        while self._inbox:
            _, data = self._inbox.popleft()
            self._lose(data)

    async def shutdown_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, denied: tuple[int, str] | None, refusal: RefusalKind | None) -> None:
        cfg = self.emu.config
        first = await self._first_message()
        if first is None:
            self.rec.close_kind = self.rec.close_kind or "client"
            return
        received_at = time.monotonic()
        self.setup_received = True
        with contextlib.suppress(ValueError, UnicodeDecodeError):  # recorded even if refused
            raw = json.loads(first.data)
            raw_setup = raw.get("setup") if isinstance(raw, dict) else None
            if isinstance(raw_setup, dict):
                self.rec.setup = raw_setup
        if denied is not None:  # credentials refused
            raise _Refused(*denied, "refused")
        if refusal == "reset":  # the line drops while the service works on the setup
            self.abort("refused")
            return
        if isinstance(refusal, int):
            raise _Refused(refusal, CLOSE_REASONS.get(refusal, REASON_UNAVAILABLE), "refused")
        message = self._parse(first.data)
        if "setup" not in message:
            raise _Refused(1008, "The first message must be 'setup'.", "error")
        if self.vertex:
            self.transparent = self.emu.vertex.check_setup(message["setup"])
        else:
            self._check_model(message["setup"])
        self._check_behaviour(message["setup"])
        # The setup reaches the service input_delay after it was sent; answering takes a while.
        self.rec.setup_latency = _uniform(self.emu._rng, cfg.setup_latency)
        wait = received_at + cfg.input_delay + self.rec.setup_latency - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.closing:  # cut during the setup
            return
        self._setup(message["setup"])
        await self.send({"setupComplete": {}})
        self.setup_done = True
        self.rec.setup_completed_at = time.monotonic()
        self._start_timers()
        await self._read_loop(cfg.input_delay)

    async def _first_message(self) -> Any:
        """The first data frame (the setup), answering pings meanwhile; None if the client
        closed first."""
        deadline = time.monotonic() + self.emu.config.setup_timeout
        while True:
            try:
                msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise _Refused(1008, "No setup message received.", "error") from None
            if msg.type == WSMsgType.PING:
                self._ping(msg.data)
            elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                return msg
            elif msg.type != WSMsgType.PONG:
                return None

    async def _read_loop(self, delay: float) -> None:
        """Client messages until the connection ends; with a delay, each is processed that
        long after it arrived, in order (it is "in flight" meanwhile)."""
        if delay > 0:
            self._processor = self.spawn(self._process_inbox())
        async for msg in self.ws:
            if msg.type == WSMsgType.PING:
                self._ping(msg.data)
                continue
            if msg.type == WSMsgType.PONG:
                continue
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            self.rec.messages_received += 1
            if self._processor is not None:
                self._inbox.append((time.monotonic() + delay, msg.data))
                self._inbox_wake.set()
            else:
                await self._on_input(msg.data)
            if self.closing:
                break
        processor = self._processor
        if not self.closing and processor is not None:
            # The client closed: what it sent before its close still reaches the service.
            self._inbox.append((time.monotonic() + delay, None))
            self._inbox_wake.set()
            await asyncio.wait({processor}, timeout=delay + self.emu.config.close_timeout)
        if not self.closing:
            self.rec.close_kind = "client"
            self.closing = True

    async def _process_inbox(self) -> None:
        while True:
            if not self._inbox:
                self._inbox_wake.clear()
                await self._inbox_wake.wait()
                continue
            due, data = self._inbox[0]
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            self._inbox.popleft()
            if data is None:
                return
            if self.closing:
                self._lose(data)
                continue
            try:
                await self._on_input(data)
            except _Refused as exc:
                self.request_close(exc.code, exc.reason, exc.kind)

    def _lose(self, data: str | bytes | None) -> None:
        if data is None:
            return
        with contextlib.suppress(_Refused):
            self.rec.in_flight_lost_bytes += _audio_bytes(self._parse(data))

    def _ping(self, data: bytes) -> None:
        """Pong after the same one-way delay as input (plus pong_delay), in order."""
        cfg = self.emu.config
        at = time.monotonic() + cfg.input_delay + _uniform(self.emu._rng, cfg.pong_delay)
        at = max(at, self._last_pong_at)
        self._last_pong_at = at
        self._pongs.append((at, data))
        self._pong_wake.set()
        if self._ponger is None:
            self._ponger = self.spawn(self._pong_loop())

    async def _pong_loop(self) -> None:
        while True:
            if not self._pongs:
                self._pong_wake.clear()
                await self._pong_wake.wait()
                continue
            at, data = self._pongs.popleft()
            if at > time.monotonic():
                await asyncio.sleep(at - time.monotonic())
            if not self.closing and not self.ws.closed and not self.stalled:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.pong(data)

    def _parse(self, data: str | bytes) -> dict[str, Any]:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(1007, "Invalid JSON payload received.", "error") from None
        if not isinstance(obj, dict):
            raise _Refused(1007, "Invalid JSON payload received. Expected an object.", "error")
        norm = _normalize_message(obj)
        unknown = [k for k in norm if k not in _CLIENT_KEYS]
        if unknown or not norm:
            name = unknown[0] if unknown else ""
            raise _Refused(1007, f'Invalid JSON payload received. Unknown name "{name}".', "error")
        return norm

    def _check_behaviour(self, setup: Any) -> None:
        """The model's behaviour (model_behaviour.BEHAVIOURS): a setup field it refuses
        closes the socket with its refusal code."""
        name = setup.get("model") if isinstance(setup, dict) else None
        if not isinstance(name, str):
            return
        behaviour = self.emu.config.behaviours.get(name.rsplit("/", 1)[-1])
        if behaviour is None:
            return
        self.behaviour = behaviour
        reason = setup_refusal(behaviour, setup)
        if reason is not None:
            raise _Refused(behaviour.refusal_code, f"{REASON_INVALID} {reason}", "refused")
        self.tool_modes = ToolModes.of(behaviour, setup)

    def _check_model(self, setup: Any) -> None:
        """A model the service does not serve for Live: refused before anything else."""
        name = setup.get("model") if isinstance(setup, dict) else None
        if not isinstance(name, str):
            return  # _setup refuses it
        model = name.removeprefix("models/")
        found = self.emu.config.models.get(model)
        if found is None or LIVE_METHOD not in found.get("supportedGenerationMethods", []):
            reason = not_found_reason(model, self.rec.api_version)
            raise _Refused(self.emu.config.unknown_model_close, reason, "refused")

    def _setup(self, setup: Any) -> None:
        if not isinstance(setup, dict) or not isinstance(setup.get("model"), str):
            raise _Refused(1007, "Request contains an invalid argument: setup.model.", "error")
        emu = self.emu
        now = time.monotonic()
        self.resumption = isinstance(setup.get("sessionResumption"), dict)
        self.in_tx = (
            setup.get("inputAudioTranscription") is not None
            or self.behaviour.input_transcription_always
        )
        self.out_tx = (
            setup.get("outputAudioTranscription") is not None
            or self.behaviour.output_transcription_always
        )
        realtime = setup.get("realtimeInputConfig")
        realtime = realtime if isinstance(realtime, dict) else {}
        # The setup's VAD: the silence that ends a turn, and whether speech interrupts.
        detection = realtime.get("automaticActivityDetection")
        silence_ms = detection.get("silenceDurationMs") if isinstance(detection, dict) else None
        self.end_of_speech_s = silence_ms / 1000 if isinstance(silence_ms, int) else None
        self.barge_in = realtime.get("activityHandling") != "NO_INTERRUPTION"
        handle = setup.get("sessionResumption", {}).get("handle") if self.resumption else None
        history = setup.get("historyConfig")
        self.history_open = not handle and (
            isinstance(history, dict) and history.get("initialHistoryInClientContent") is True
        )
        others: list[_Connection] = []
        if handle:
            snap = emu._snapshots.get(handle)
            session = emu.record.sessions.get(snap.state.session_id) if snap else None
            if (
                snap is None
                or session is None
                or now - snap.issued_at > emu.config.handle_ttl
                or session.ended_at is not None
            ):
                raise _Refused(1008, REASON_BAD_HANDLE, "bad_handle")
            if session.capped and self.behaviour.resume_after_cap is not None:
                raise _Refused(*self.behaviour.resume_after_cap, "bad_handle")
            mode = emu.config.concurrent_resume
            others = [
                c
                for c in emu._conns.values()
                if c is not self and c.session is session and not c.closing
            ]
            if others and mode == "refuse":
                raise _Refused(1011, REASON_UNAVAILABLE, "refused")
            if mode != "takeover":
                others = []
            self.state = snap.restore()
            self._voiced, self._silent, self._speech_confirmed, self._pending = snap.vad
            session.state = self.state
            self.rec.resumed_from = handle
            self.rec.resumed_holding = (snap.conn_id, snap.audio_bytes)
            emu.record.handles_used.append(handle)
        else:
            sid = f"s{len(emu.record.sessions) + 1}-{secrets.token_hex(4)}"
            compression = setup.get("contextWindowCompression") is not None
            self.state = SessionState(session_id=sid, created_at=now, compression=compression)
            self.state.context = billing.start(setup)
            self.state.instruction = instruction_text(setup.get("systemInstruction"))
            session = SessionRecord(id=sid, created_at=now, connection_ids=[], state=self.state)
            session.bill.profile = billing.profile_for(setup["model"], emu.config.billing_profiles)
            emu.record.sessions[sid] = session
        self.session = session
        session.connection_ids.append(self.rec.id)
        self.rec.session_id = self.state.session_id
        emu.record.event(
            "setup", f"conn={self.rec.id} session={self.state.session_id} resumed={bool(handle)}"
        )
        for older in others:
            if older.superseded_by is None:
                older.supersede(self)

    def supersede(self, newer: _Connection) -> None:
        """Takeover: ``newer`` owns the session from now on; this one's input is ignored, its
        reply stops and its handles describe the newer one's state."""
        self.superseded_by = newer
        self.rec.superseded_by = newer.rec.id
        self.emu.record.event("takeover", f"conn={self.rec.id} by={newer.rec.id}")
        self._stop_reply()

    def _owner(self) -> _Connection:
        conn = self
        while conn.superseded_by is not None:
            conn = conn.superseded_by
        return conn

    def _start_timers(self) -> None:
        cfg = self.emu.config
        rng = self.emu._rng
        assert self.state is not None
        opened = self.rec.opened_at
        life = cfg.lifetime + (rng.uniform(0.0, cfg.lifetime_jitter) if cfg.lifetime_jitter else 0)
        # A lead longer than what is left: the goAway goes out at once with the time left.
        self.rec.ends_at = opened + life
        self.spawn(self._lifetime(opened + life - cfg.goaway_lead, opened + life))
        if not self.state.compression:
            self.spawn(self._session_limit(self.state.created_at + cfg.session_limit))
        if self.resumption:
            self.spawn(self._handle_ticks())
        cap = self.behaviour.session_cap_s
        if cap is not None:
            self.spawn(self._cap(opened + cap))
        if cfg.abrupt_after is not None:
            jitter = rng.uniform(0.0, cfg.abrupt_jitter) if cfg.abrupt_jitter else 0.0
            how = rng.choice(cfg.abrupt_kinds) if cfg.abrupt_kinds else "reset"
            self.spawn(self._abrupt(opened + cfg.abrupt_after + jitter, how))

    async def _lifetime(self, goaway_at: float, end_at: float) -> None:
        await asyncio.sleep(max(0.0, goaway_at - time.monotonic()))
        await self.announce(end_at - time.monotonic(), None)

    async def announce(self, time_left: float, code: int | None) -> None:
        """goAway{timeLeft}, then the close (code: goaway_close_code when None)."""
        end_at = time.monotonic() + max(0.0, time_left)
        self.emu.record.event("goaway", f"conn={self.rec.id}")
        await self.send({"goAway": {"timeLeft": format_duration(time_left)}})
        await asyncio.sleep(max(0.0, end_at - time.monotonic()))
        if code is None:
            cfg = self.emu.config
            code = cfg.vertex_goaway_close_code if self.vertex else cfg.goaway_close_code
        self.request_close(code, GOAWAY_REASONS.get(code, REASON_DEADLINE), "goaway")

    async def _session_limit(self, end_at: float) -> None:
        await asyncio.sleep(max(0.0, end_at - time.monotonic()))
        if self.session is not None and self.session.ended_at is None:
            self.session.ended_at = time.monotonic()
        self.request_close(1011, REASON_SESSION_LIMIT, "session_limit")

    async def _cap(self, at: float) -> None:
        """The model's reported hard end of a connection: a close, no goAway before it."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if self.session is not None:
            self.session.capped = True
        self.request_close(*self.behaviour.cap_close, "session_cap")

    async def _abrupt(self, at: float, how: CutKind) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.cut(how, "abrupt")

    def _handle_interval(self) -> float:
        interval = self.emu.config.handle_interval
        if isinstance(interval, tuple):
            return _uniform(self.emu._rng, interval)
        return interval

    async def _handle_ticks(self) -> None:
        while True:
            await asyncio.sleep(max(0.01, self._handle_interval()))
            await self._resumption_update()

    def _bill(self, reply_s: float) -> dict[str, Any]:
        """The ``usageMetadata`` of a model turn (:mod:`gateway.testing.billing`), billed."""
        st, session = self.state, self.session
        assert st is not None and session is not None
        st.context, usage = billing.bill_turn(
            session.bill.profile,
            st.context,
            audio_bytes=st.audio_bytes,
            history=[text for _, text in st.history_text[st.context.text_entries :]],
            history_len=len(st.history_text),
            reply_s=reply_s,
        )
        session.bill.add(usage)
        return vertex_usage(usage) if self.vertex else usage

    async def _resumption_update(self) -> None:
        if self.closing:
            return
        src = self._owner()  # takeover: the state the session holds now
        if src.reply_task is not None or src.pending_tool_calls:
            await self.send({"sessionResumptionUpdate": {"resumable": False}})
            return
        st = src.state
        assert st is not None
        handle = secrets.token_urlsafe(18)
        now = time.monotonic()
        self.emu._add_snapshot(
            handle,
            _Snapshot(
                st,
                st.audio_bytes,
                len(st.turns),
                len(st.history_text),
                st.model_turns,
                st.utterances,
                now,
                (src._voiced, src._silent, src._speech_confirmed, src._pending),
                st.context,
                src.rec.id,  # whose lineage it is (the newer one's, after a takeover)
                st.instruction,
            ),
        )
        self.rec.handles_issued += 1
        update: dict[str, Any] = {"newHandle": handle, "resumable": True}
        if self.transparent and self.superseded_by is None:
            update["lastConsumedClientMessageIndex"] = str(self.consumed)  # int64: a string
        await self.send({"sessionResumptionUpdate": update})

    # --- client messages ------------------------------------------------------------------

    async def _on_input(self, data: str | bytes) -> None:
        msg = self._parse(data)
        if self.superseded_by is not None:  # takeover: the session is elsewhere now
            self.rec.dropped_messages += 1
            self.rec.dropped_audio_bytes += _audio_bytes(msg)
            return
        self.consumed += 1  # in the state from now on (a handle issued while it is processed)
        await self._on_message(msg)

    async def _on_message(self, msg: dict[str, Any]) -> None:
        if "setup" in msg:
            raise _Refused(1008, "setup must be the first message, and only once.", "error")
        if "realtimeInput" in msg:
            await self._on_realtime(msg["realtimeInput"])
        if "clientContent" in msg:
            await self._on_client_content(msg["clientContent"])
        if "toolResponse" in msg:
            body = msg["toolResponse"]
            text = json.dumps(body, sort_keys=True)[:500]
            self.emu.record.event("tool_response", f"conn={self.rec.id} {text}")
            responses = body.get("functionResponses") if isinstance(body, dict) else None
            ids = {r.get("id") for r in responses or [] if isinstance(r, dict)} - {None}
            if ids:
                self.pending_tool_calls -= ids
            else:
                self.pending_tool_calls.clear()
            self._tool_answered.set()
        if "contextUpdate" in msg:
            self._on_context_update(msg["contextUpdate"])

    def _on_context_update(self, update: Any) -> None:
        """A new system instruction (or tools) mid-session, where the model takes it
        (``ModelBehaviour.context_update``): it replaces the setup's in what the session
        holds, and is billed and kept through compression as that was."""
        backend = "vertex" if self.vertex else "gemini"
        if backend not in self.behaviour.context_update:
            reason = f"{REASON_INVALID} contextUpdate is not supported for this model."
            raise _Refused(self.behaviour.refusal_code, reason, "error")
        if not isinstance(update, dict):
            raise _Refused(1007, "Invalid JSON payload received. contextUpdate.", "error")
        st = self.state
        assert st is not None
        instruction = update.get("systemInstruction")
        if instruction is not None:
            st.instruction = instruction_text(instruction)
            st.context = replace(st.context, system=billing.text_tokens(st.instruction))
        self.emu.record.event(
            "context_update", f"conn={self.rec.id} {json.dumps(st.instruction)[:500]}"
        )

    async def _on_realtime(self, rt: Any) -> None:
        if not isinstance(rt, dict):
            raise _Refused(1007, "Invalid JSON payload received. realtimeInput.", "error")
        blobs: list[Any] = []
        if "audio" in rt:
            blobs.append(rt["audio"])
        chunks = rt.get("mediaChunks")
        if isinstance(chunks, list):
            blobs.extend(chunks)
        for blob in blobs:
            if not isinstance(blob, dict):
                raise _Refused(1007, "Invalid JSON payload received. Blob.", "error")
            rate = _audio_rate(blob.get("mimeType"))
            pcm = _b64decode(blob.get("data", ""))
            if rate is None:
                continue  # video frames etc.: accepted, ignored
            if rate != IN_RATE:
                raise _Refused(1007, f"Unsupported audio sample rate {rate}; send 16000.", "error")
            await self._on_audio(pcm)
        if rt.get("activityStart") is not None:
            self._speech_confirmed = True
            await self._interrupt()
        if rt.get("audioStreamEnd"):
            self.emu.record.event("audio_stream_end", f"conn={self.rec.id}")
            if self.vertex and not self.emu.config.vertex_audio_stream_end:
                reason = 'Invalid JSON payload received. Unknown name "audioStreamEnd".'
                raise _Refused(1007, reason, "error")
        if rt.get("activityEnd") is not None or rt.get("audioStreamEnd"):
            if self._voiced >= self._min_speech_windows() or rt.get("activityEnd") is not None:
                await self._end_of_utterance()
        text = rt.get("text")
        if isinstance(text, str) and text:
            assert self.state is not None
            self.state.history_text.append(("user", text))
            self._tool_call_for([text])
            await self._start_reply("text")

    def _tool_call_for(self, texts: list[str]) -> None:
        for key, call in self.emu.config.tool_call_on_text.items():
            if any(key in text for text in texts):
                self.next_tool_call = call

    async def _on_client_content(self, cc: Any) -> None:
        if not isinstance(cc, dict):
            raise _Refused(1007, "Invalid JSON payload received. clientContent.", "error")
        st = self.state
        assert st is not None
        initial = self.history_open
        if not initial and self.behaviour.client_content == "initial_history_only":
            raise _Refused(1007, REASON_INVALID, "error")
        for turn in cc.get("turns") or []:
            if not isinstance(turn, dict):
                raise _Refused(1007, "Invalid JSON payload received. Content.", "error")
            role = str(turn.get("role") or "user")
            parts = turn.get("parts") or []
            texts = [str(p["text"]) for p in parts if isinstance(p, dict) and "text" in p]
            st.history_text.append((role, " ".join(texts)))
            if role == "model":
                st.model_turns += 1
            if role == "user" and not initial:
                self._tool_call_for(texts)
        if cc.get("turnComplete"):
            if initial:  # the initial history is complete: no reply to it [SDK HistoryConfig]
                self.history_open = False
                return
            await self._start_reply("text")

    # --- VAD ------------------------------------------------------------------------------

    async def _on_audio(self, pcm: bytes) -> None:
        st = self.state
        assert st is not None
        cfg = self.emu.config
        if cfg.record_audio:
            st.audio += pcm
        elif len(st.audio) < cfg.audio_head_bytes:
            st.audio += pcm[: cfg.audio_head_bytes - len(st.audio)]
        st.audio_bytes += len(pcm)
        self.rec.audio_bytes_received += len(pcm)
        buf = self._pending + pcm if self._pending else pcm
        n = len(buf) // WINDOW_BYTES
        self._pending = bytes(buf[n * WINDOW_BYTES :])
        if n == 0:
            return
        x = np.frombuffer(buf, dtype="<i2", count=n * WINDOW_BYTES // 2).astype(np.float32)
        # sum of squares per window against the threshold's; dot() is the 1-window fast path
        limit = (32768.0 * 10 ** (cfg.vad_threshold_db / 20)) ** 2 * (WINDOW_BYTES // 2)
        if n == 1:
            flags = [float(np.dot(x, x)) > limit]
        else:
            w = x.reshape(n, -1)
            flags = (np.einsum("ij,ij->i", w, w) > limit).tolist()
        min_speech = self._min_speech_windows()
        end_of_speech = (
            cfg.end_of_speech_s if self.end_of_speech_s is None else self.end_of_speech_s
        )
        end_silence = max(1, math.ceil(end_of_speech / WINDOW_S - 1e-9))
        for voiced in flags:
            if voiced:
                self._voiced += 1
                self._silent = 0
                if self._voiced >= min_speech and not self._speech_confirmed:
                    self._speech_confirmed = True
                    if self.reply_task is not None and self.barge_in:
                        await self._interrupt()
                    if self.in_tx and self.behaviour.input_transcription_incremental:
                        self._tx_head = True  # the rest at the utterance's end
                        head = {"inputTranscription": {"text": TX_HEAD}}
                        await self.send({"serverContent": head})
            elif self._voiced:
                self._silent += 1
                if self._silent >= end_silence:
                    if self._voiced >= min_speech:
                        await self._end_of_utterance()
                    self._voiced = self._silent = 0
                    self._speech_confirmed = False

    def _min_speech_windows(self) -> int:
        return max(1, math.ceil(self.emu.config.min_speech_s / WINDOW_S - 1e-9))

    async def _end_of_utterance(self) -> None:
        st = self.state
        assert st is not None
        st.utterance_speech_s.append(self._voiced * WINDOW_S)
        self._voiced = self._silent = 0
        self._speech_confirmed = False
        st.utterances += 1
        utterance = st.utterances
        text = f"caller utterance {utterance}"
        st.history_text.append(("user", text))
        if self.in_tx:
            rest = text.removeprefix(TX_HEAD) if self._tx_head else text
            await self.send({"serverContent": {"inputTranscription": {"text": rest}}})
        self._tx_head = False
        session = self.session
        if (
            self.emu.config.after_cut_reply == "wait"
            and session is not None
            and self.rec.resumed_from is not None
            and utterance in session.cut_replies
        ):
            # The model holds this utterance as answered already: it waits for new input.
            session.cut_replies.discard(utterance)
            session.withheld.append(utterance)
            self.emu.record.event("withheld", f"conn={self.rec.id} utterance={utterance}")
            return
        await self._start_reply("audio", utterance)

    # --- replies --------------------------------------------------------------------------

    async def _start_reply(self, trigger: Literal["audio", "text"], utterance: int = 0) -> None:
        current = self.reply_task
        if current is not None and trigger == "audio" and not self.barge_in:
            # NO_INTERRUPTION: the reply is said to its end, then the caller is answered.
            self.spawn(self._answer_after(current, utterance))
            return
        if self.reply_task is not None:
            await self._interrupt()
        st = self.state
        assert st is not None
        n = st.model_turns + 1
        self.turn = TurnRecord(
            n, trigger, time.monotonic(), None, False, reply_freq(n), utterance=utterance
        )
        st.turns.append(self.turn)
        self.reply_frames = self.reply_frames_left = 0  # none of it generated yet
        self.emu.record.event("turn", f"conn={self.rec.id} n={n} trigger={trigger}")
        self.reply_task = self.spawn(self._reply(self.turn))

    async def _answer_after(self, reply: asyncio.Task[None], utterance: int) -> None:
        await asyncio.wait({reply})
        if not self.closing and self.reply_task is None:
            await self._start_reply("audio", utterance)

    def _stop_reply(self) -> None:
        """The reply being said is cut off (its connection ends or was taken over)."""
        task, turn = self.reply_task, self.turn
        if task is None or turn is None:
            return
        task.cancel()
        self.reply_task = self.turn = None
        turn.cut = True
        if turn.utterance and self.session is not None:
            self.session.cut_replies.add(turn.utterance)
        self.emu.record.event("reply_cut", f"conn={self.rec.id} n={turn.index}")

    async def _interrupt(self) -> None:
        task, turn, st = self.reply_task, self.turn, self.state
        if task is None or turn is None or st is None:
            return
        task.cancel()
        self.reply_task = self.turn = None
        turn.interrupted = True
        turn.finished_at = time.monotonic()
        st.model_turns += 1
        said = 1 - self.reply_frames_left / self.reply_frames if self.reply_frames else 0.0
        usage = self._bill(self.emu.config.reply_s * said)
        st.history_text.append(("model", f"reply {turn.index}"))
        self.emu.record.event("interrupted", f"conn={self.rec.id} n={turn.index}")
        await self.send({"serverContent": {"interrupted": True}, "usageMetadata": usage})
        if self.resumption:
            await self._resumption_update()

    async def _call_tool(self, turn: TurnRecord, name: str, args: dict[str, Any]) -> float:
        """Send a toolCall; a blocking one holds the reply until its toolResponse (the
        model "will not start responding until you've sent the tool response" [G31]), a
        NON_BLOCKING one lets it go on. Returns how long the reply was held."""
        call_id = f"call-{turn.index}"
        self.pending_tool_calls.add(call_id)
        await self.send(
            {"toolCall": {"functionCalls": [{"id": call_id, "name": name, "args": args}]}}
        )
        self.emu.record.event("tool_call", f"conn={self.rec.id} n={turn.index} {name}")
        if self.tool_modes.non_blocking(name):
            return 0.0
        began = time.monotonic()
        while call_id in self.pending_tool_calls and not self.closing:
            self._tool_answered.clear()
            await self._tool_answered.wait()
        return time.monotonic() - began

    async def _reply(self, turn: TurnRecord) -> None:
        cfg = self.emu.config
        tool_call, self.next_tool_call = self.next_tool_call, None
        speed = max(cfg.speed, 1e-6)
        await asyncio.sleep(cfg.response_delay_s / speed)
        multi = self.behaviour.multi_part
        frames = _reply_frames(turn.freq_hz, cfg.reply_s, cfg.chunk_s, 2 if multi else 1)
        interval = cfg.chunk_s / (speed * max(cfg.pace, 1e-6))
        start = time.monotonic()
        self.reply_frames = self.reply_frames_left = len(frames)
        for i, frame in enumerate(frames):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            said = {"text": f"reply {turn.index}"}
            if i == 0 and self.out_tx and multi:  # the transcript in the same event
                message = json.loads(frame)
                message["serverContent"]["outputTranscription"] = said
                frame = _dumps(message)
            await self.send(frame)
            self.reply_frames_left -= 1
            if i == 0 and self.out_tx and not multi:
                await self.send({"serverContent": {"outputTranscription": said}})
            if i == 0 and tool_call is not None:
                start += await self._call_tool(turn, *tool_call)
        await self.send({"serverContent": {"generationComplete": True}})
        st = self.state
        assert st is not None
        self.reply_task = self.turn = None
        turn.finished_at = time.monotonic()
        st.model_turns += 1
        usage = self._bill(cfg.reply_s)
        st.history_text.append(("model", f"reply {turn.index}"))
        await self.send({"serverContent": {"turnComplete": True}, "usageMetadata": usage})
        self.emu.record.event("turn_complete", f"conn={self.rec.id} n={turn.index}")
        if self.resumption:
            await self._resumption_update()


class LiveEmulator:
    """An aiohttp server speaking BidiGenerateContent; see the module docstring."""

    def __init__(self, config: EmulatorConfig, tls: TestTLS | None) -> None:
        self.config = config
        self.tls = tls
        self.record = EmulatorRecord()
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._conns: dict[int, _Connection] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._next_id = 0
        self._refuse_until: float | None = None
        self._refusals: deque[RefusalKind] = deque()
        self._rng = random.Random(config.seed)
        self.vertex = VertexService(self)

    async def __aenter__(self) -> LiveEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self.vertex.token)
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        ssl_ctx = self.tls.server_ssl if self.tls else None
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_ctx)
        await site.start()
        bound = self._runner.addresses[0]
        scheme = "https" if ssl_ctx else "http"
        self.base_url = f"{scheme}://{host}:{bound[1]}"

    async def stop(self) -> None:
        """Close every connection (1001), wait for their tasks, stop the server."""
        for conn in list(self._conns.values()):
            conn.request_close(1001, REASON_SHUTDOWN, "stopped")
        closes = [c.close_task for c in self._conns.values() if c.close_task is not None]
        if closes:
            await asyncio.wait(closes, timeout=self.config.close_timeout + 1.0)
        for conn in list(self._conns.values()):
            if conn.close_task is not None and not conn.close_task.done():
                conn.reset_transport()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def refuse_connections(self, until: float | None) -> None:
        """Refuse new connections until monotonic time ``until`` (None: accept again)."""
        self._refuse_until = until

    def refuse_next(self, n: int, how: RefusalKind = "http") -> None:
        """Refuse the next ``n`` connections: ``"http"`` (503 at the handshake), ``"reset"``
        (a TCP reset once the setup was read) or a close code after the setup (1011: the
        service is unavailable). Queued behind refusals already ordered."""
        self._refusals.extend([how] * n)

    async def cut_all(self, abrupt: bool = True, *, code: int | None = None) -> None:
        for cid in list(self._conns):
            await self.cut(cid, abrupt, code=code)

    async def cut(
        self, connection_id: int, abrupt: bool = True, *, code: int | None = None
    ) -> None:
        """End a connection now, also during its setup. ``code``: a close frame with that
        code (1000, 1007, 1008, 1011: see CLOSE_REASONS), no goAway. Else abrupt: a TCP
        reset; not abrupt: goAway{timeLeft:"0s"} then close 1011."""
        conn = self._conns.get(connection_id)
        if conn is None or conn.closing:
            return
        if code is not None:
            conn.cut(code, "cut")
        elif abrupt:
            conn.abort("abrupt")
        else:
            await conn.send({"goAway": {"timeLeft": "0s"}})
            conn.request_close(1011, REASON_UNAVAILABLE, "cut")

    def go_away(self, connection_id: int, time_left: float, code: int | None = None) -> bool:
        """Announce the end of a connection now: goAway{timeLeft}, then the close after
        ``time_left`` (``code``, else ``goaway_close_code``). False if it is not open."""
        conn = self._conns.get(connection_id)
        if conn is None or conn.closing or not conn.setup_done:
            return False
        conn.spawn(conn.announce(time_left, code))
        return True

    def stall(self, connection_id: int) -> bool:
        """Connection ``connection_id`` sends nothing more, pongs included, its socket left
        open and its input still read. False if it is not open."""
        conn = self._conns.get(connection_id)
        if conn is None or conn.closing or not conn.setup_done:
            return False
        conn.stalled = True
        self.record.event("stall", f"conn={connection_id}")
        return True

    def cut_path(self, connection_id: int) -> bool:
        """The network path to connection ``connection_id`` dies: it sends nothing more and
        stops reading (its receive buffer shrunk, so the client's window closes within a
        few kB), its socket left open. The client's writes then go unacknowledged, as
        through a dead route. False if it is not open."""
        conn = self._conns.get(connection_id)
        if conn is None or conn.closing or not conn.setup_done or conn.transport is None:
            return False
        conn.stalled = True
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.transport.pause_reading()
        self.record.event("cut_path", f"conn={connection_id}")
        return True

    def open_connections(self) -> list[int]:
        """Connections not closing, including those whose setup is not answered yet."""
        return [cid for cid, c in self._conns.items() if not c.closing]

    def replying(self) -> list[int]:
        """Open connections saying a reply now (some of its audio still to send: once the
        last is out, the reply's end, generationComplete, is a message away)."""
        return [
            cid
            for cid, c in self._conns.items()
            if not c.closing and c.reply_task and c.reply_frames_left > 0
        ]

    def reply_left(self, cid: int) -> float:
        """The share of the reply connection `cid` is saying whose audio is not sent yet."""
        conn = self._conns.get(cid)
        if conn is None or conn.reply_task is None or not conn.reply_frames:
            return 0.0
        return conn.reply_frames_left / conn.reply_frames

    def in_setup(self) -> list[int]:
        """Open connections whose setup was read and not answered yet."""
        return [
            cid
            for cid, c in self._conns.items()
            if not c.closing and c.setup_received and not c.setup_done
        ]

    def _key_denial(self, request: web.Request) -> tuple[int, str] | None:
        """Why the Gemini API refuses the request's key (None: it is the one served)."""
        auth = request.headers.get("Authorization", "")
        api_key = (
            request.headers.get("x-goog-api-key")
            or request.query.get("key")
            or request.query.get("access_token")
            or (auth[len("Token ") :] if auth.startswith("Token ") else None)
        )
        if not api_key:
            return 1008, REASON_NO_KEY
        if api_key != self.config.api_key:
            return 1007, REASON_BAD_KEY
        return None

    def _refusing(self) -> bool:
        until = self._refuse_until
        return until is not None and time.monotonic() < until

    def _add_snapshot(self, handle: str, snap: _Snapshot) -> None:
        # Handles are issued in time order: drop the expired ones from the front.
        ttl = self.config.handle_ttl
        while self._snapshots:
            oldest = next(iter(self._snapshots))
            if snap.issued_at - self._snapshots[oldest].issued_at <= ttl:
                break
            del self._snapshots[oldest]
            self.record.handles_issued.pop(oldest, None)
        self._snapshots[handle] = snap
        self.record.handles_issued[handle] = (snap.state.session_id, snap.issued_at)

    def _get_model(self, request: web.Request, version: str, model: str) -> web.Response:
        """The models API's ``models.get``: the key checked first, then the model."""
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        self.record.event("models_get", f"{version} {model}")
        if not key:
            return _google_error(403, "PERMISSION_DENIED", REASON_NO_KEY)
        if key != self.config.api_key:
            return _google_error(400, "INVALID_ARGUMENT", REASON_BAD_KEY, "API_KEY_INVALID")
        if self._refusing():
            return _google_error(503, "UNAVAILABLE", REASON_UNAVAILABLE)
        found = self.config.models.get(model)
        if found is None:
            text = f"models/{model} is not found for API version {version}."
            return _google_error(404, "NOT_FOUND", text)
        return web.json_response(found)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        models = _MODELS_PATH.match(request.path)
        if models is not None:
            return self._get_model(request, models.group(1), models.group(2))
        vertex_model = _VERTEX_MODELS_PATH.match(request.path)
        if vertex_model is not None:
            return self.vertex.get_model(request, *vertex_model.groups()[1:])
        match = _PATH.match(request.path)
        vertex = match is None and (match := _VERTEX_PATH.match(request.path)) is not None
        if match is None:
            return web.Response(status=404, text="Not found")
        refusal: RefusalKind | None = None
        if self._refusals:
            refusal = self._refusals.popleft()
        elif self._refusing():
            refusal = "http" if self.config.refuse_with_http else 1011
        refused = refusal is not None
        self._next_id += 1
        rec = ConnectionRecord(
            id=self._next_id,
            session_id="",
            opened_at=time.monotonic(),
            closed_at=None,
            close_kind=None,
            setup={},
            resumed_from=None,
            refused=refused,
            api_version=match.group(1),
        )
        self.record.connections.append(rec)
        if refusal == "http":
            rec.closed_at, rec.close_kind, rec.close_code = time.monotonic(), "refused", 503
            self.record.event("refused", f"conn={rec.id} http 503")
            return web.Response(status=503, text=REASON_UNAVAILABLE)
        denied = self.vertex.denial(request) if vertex else self._key_denial(request)
        ws = web.WebSocketResponse(
            compress=self.config.compress,
            autoping=False,  # pongs go out after input_delay, in order (_Connection._ping)
            max_msg_size=16 * 1024 * 1024,
            timeout=self.config.close_timeout,
        )
        await ws.prepare(request)
        rec.compressed = bool(ws.compress)
        conn = _Connection(self, ws, request.transport, rec)
        conn.vertex = vertex
        self._conns[rec.id] = conn
        self.record.event("open", f"conn={rec.id} version={match.group(1)}")
        try:
            await conn.run(denied, refusal)
        except _Refused as exc:
            if exc.kind == "refused" and refused:
                rec.close_kind = "refused"
            conn.request_close(exc.code, exc.reason, exc.kind)
        except ConnectionError:
            conn.closing = True
            rec.close_kind = rec.close_kind or "error"
        except Exception as exc:  # never a traceback to the peer: close 1011 and log
            log.exception("emulator connection %d failed", rec.id)
            conn.request_close(1011, f"Internal error encountered: {type(exc).__name__}", "error")
        finally:
            conn.end()
            await conn.shutdown_tasks()
            if conn.close_task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await conn.close_task
            rec.closed_at = time.monotonic()
            self._conns.pop(rec.id, None)
        return ws


# ------------------------------------------------------------------------------- Vertex AI


def vertex_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """A Gemini API ``usageMetadata`` in Vertex AI's shape: output tokens are
    ``candidatesTokenCount`` / ``candidatesTokensDetails`` there (the SDK's
    ``_UsageMetadata_from_vertex`` maps them back)."""
    renamed = {"responseTokenCount": "candidatesTokenCount"}
    renamed["responseTokensDetails"] = "candidatesTokensDetails"
    return {renamed.get(key, key): value for key, value in usage.items()}


class VertexService:
    """The emulator's Vertex AI side: an OAuth token endpoint, who may open a Live socket on
    the Vertex path, and which models a location serves.

    Tokens come the way google-auth gets them for a service account: a POST to the account
    file's ``token_uri`` with a JWT assertion (RS256, signed with the account's private key;
    ``iss`` the account, ``aud`` the endpoint, ``scope`` cloud-platform). The emulator checks
    the signature against the public key registered for the account
    (:meth:`register_service_account`) and answers with an access token it then accepts as
    ``Authorization: Bearer`` for ``vertex_token_ttl`` seconds. Errors are OAuth's
    (``invalid_grant``, as Google words them), which google-auth raises as ``RefreshError``.
    Express mode sends ``vertex_api_key`` as ``x-goog-api-key`` instead.
    """

    def __init__(self, emu: LiveEmulator) -> None:
        self.emu = emu
        self.accounts: dict[str, str] = {}  # client_email -> public key PEM
        self.tokens: dict[str, tuple[str, float]] = {}  # access token -> (account, expires)
        self.exchanges: list[str] = []  # accounts, in the order their assertions were accepted

    @property
    def token_uri(self) -> str:
        return self.emu.base_url + TOKEN_PATH

    def register_service_account(self, email: str, public_key_pem: str) -> None:
        """Accept assertions signed by the private half of `public_key_pem` for `email`."""
        self.accounts[email] = public_key_pem

    async def token(self, request: web.Request) -> web.Response:
        """POST /token: a JWT-bearer grant in, an access token out."""
        form = await request.post()
        if form.get("grant_type") != _JWT_BEARER:
            return _oauth_error("unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion")
        if not isinstance(assertion, str):
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        try:
            claims = google_jwt.decode(assertion, verify=False)  # type: ignore[no-untyped-call]
        except ValueError:
            return _oauth_error("invalid_grant", "Invalid JWT.")
        email = str(claims.get("iss", ""))
        key = self.accounts.get(email)
        if key is None:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        try:  # signature, then iat/exp (with google-auth's clock skew) and aud
            audience = [_TOKEN_AUDIENCE, self.token_uri]
            google_jwt.decode(assertion, certs=key, audience=audience)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            text = str(exc)
            if "signature" in text:
                return _oauth_error("invalid_grant", "Invalid JWT Signature.")
            return _oauth_error("invalid_grant", f"Invalid JWT: {text}")
        if _CLOUD_PLATFORM not in str(claims.get("scope", "")).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience.")
        ttl = self.emu.config.vertex_token_ttl
        access = "ya29.emulator-" + secrets.token_urlsafe(24)
        self.tokens[access] = (email, time.monotonic() + ttl)
        self.exchanges.append(email)
        self.emu.record.event("token", f"account={email}")
        body = {"access_token": access, "expires_in": int(ttl), "token_type": "Bearer"}
        return web.json_response(body)

    def denial(self, request: web.Request) -> tuple[int, str] | None:
        """Why a Live socket on the Vertex path is refused (None: its credentials hold)."""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            found = self.tokens.get(auth[len("Bearer ") :])
            if found is None or found[1] < time.monotonic():
                return 1008, REASON_BAD_CREDENTIALS
            return None
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if key is None:
            return 1008, REASON_NO_CREDENTIALS
        if key != self.emu.config.vertex_api_key:
            return 1007, REASON_BAD_KEY
        return None

    def get_model(
        self, request: web.Request, project: str | None, location: str | None, model: str
    ) -> web.Response:
        """Vertex AI's ``models.get`` of a publisher model (no generation methods listed):
        credentials as for a Live socket (401 UNAUTHENTICATED, or 400 API_KEY_INVALID for a
        wrong express-mode key), then 404 for a model not served in the location."""
        self.emu.record.event("models_get", f"vertex {location} {model}")
        denied = self.denial(request)
        if denied is not None:
            code, reason = denied
            if code == 1007:
                return _google_error(400, "INVALID_ARGUMENT", reason, "API_KEY_INVALID")
            return _google_error(401, "UNAUTHENTICATED", reason)
        cfg = self.emu.config
        where = location or cfg.vertex_express_location
        name = f"publishers/google/models/{model}"
        if model not in VERTEX_MODELS or (where == "global" and model in cfg.vertex_regional_only):
            full = f"projects/{project}/locations/{where}/{name}" if project else name
            text = (
                f"Publisher Model `{full}` was not found or your project does not have access "
                "to it."
            )
            return _google_error(404, "NOT_FOUND", text)
        return web.json_response({"name": name, "versionId": "001", "launchStage": "GA"})

    def check_setup(self, setup: Any) -> bool:
        """Refuse (1008) a model not named as on Vertex or not served in its location;
        whether the session asked for transparent resumption."""
        model = setup.get("model") if isinstance(setup, dict) else None
        found = _VERTEX_MODEL.match(model) if isinstance(model, str) else None
        if found is None:
            raise _Refused(1008, REASON_MODEL_NOT_FOUND, "refused")
        cfg = self.emu.config
        location = found.group(2) or cfg.vertex_express_location
        if location == "global" and found.group(3) in cfg.vertex_regional_only:
            raise _Refused(1008, REASON_MODEL_NOT_FOUND, "refused")
        if found.group(3) not in VERTEX_MODELS:
            raise _Refused(1008, REASON_MODEL_NOT_FOUND, "refused")
        resumption = setup.get("sessionResumption")
        return isinstance(resumption, dict) and resumption.get("transparent") is True


def _oauth_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


__all__ = [
    "CLOSE_REASONS",
    "MODELS",
    "RETIRED_MODELS",
    "VERTEX_MODELS",
    "AfterCutReply",
    "ConcurrentResume",
    "ConnectionRecord",
    "CutKind",
    "EmulatorConfig",
    "EmulatorRecord",
    "LiveEmulator",
    "RefusalKind",
    "SessionRecord",
    "SessionState",
    "TurnRecord",
    "VertexService",
    "format_duration",
    "reply_freq",
]
