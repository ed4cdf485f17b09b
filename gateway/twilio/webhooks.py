"""Webhook-side helpers: TwiML, Twilio signature checks and single-use stream tokens.

Pure functions and small classes; the aiohttp server calls them. Secrets (the auth token,
the SharedKey secret, the token secret, issued tokens) never appear in return values other
than the token itself, in exception messages or in logs.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import heapq
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import twilio.request_validator as _request_validator
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Parameter, Stream, VoiceResponse

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNATURE_SETTINGS_HEADER",
    "SignatureChecker",
    "SignatureResult",
    "StreamTokens",
    "TokenResult",
    "busy_twiml",
    "connect_stream_twiml",
    "stream_url",
]

SIGNATURE_HEADER: Final = "X-Twilio-Signature"
#: Present when a Twilio Webhook Rule signs with a SharedKey: ``key=<id>,algorithm=<alg>``.
SIGNATURE_SETTINGS_HEADER: Final = "X-Twilio-Webhooks-Signature-Settings"

_HMAC_SHA1: Final = "HMAC_SHA1"
_HMAC_SHA256: Final = "HMAC_SHA256"
#: twilio>=9.13 validates SharedKey signatures (``algorithm=`` argument); older releases
#: only know the Auth Token's HMAC-SHA1, and then settings-signed requests are refused.
_SHARED_KEY_SUPPORTED: Final = hasattr(_request_validator, "get_signature_algorithm")


def _settings_algorithm(settings: str) -> str:
    """The ``algorithm=`` of a signature-settings header; HMAC_SHA1 when absent."""
    for part in settings.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip().lower() == "algorithm" and value.strip():
            return value.strip().upper()
    return _HMAC_SHA1


# --- TwiML ------------------------------------------------------------------------------


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    """TwiML answering a call with a bidirectional ``<Connect><Stream>``.

    ``parameters`` arrive back in the stream's ``start.customParameters``.
    """
    stream = Stream(url=stream_url)
    for name, value in parameters.items():
        stream.append(Parameter(name=name, value=value))
    connect = Connect()
    connect.append(stream)
    response = VoiceResponse()
    response.append(connect)
    return str(response)


def busy_twiml() -> str:
    """TwiML refusing a call with a busy signal (e.g. at capacity); the call is not billed."""
    response = VoiceResponse()
    response.reject(reason="busy")
    return str(response)


def stream_url(public_url: str, path: str = "/twilio/media") -> str:
    """``https://host[:port][/prefix]`` -> ``wss://host[:port][/prefix]<path>``.

    ``http`` maps to ``ws`` for local trials (Twilio itself only connects to ``wss``).
    """
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError("public_url must be an http(s) URL")
    if not parts.hostname:
        raise ValueError("public_url must have a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("public_url must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError("public_url must not have a query or fragment")
    if not path.startswith("/"):
        raise ValueError("path must start with '/'")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


# --- signatures -------------------------------------------------------------------------


class SignatureResult(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    INVALID = "invalid"


class SignatureChecker:
    """Checks ``X-Twilio-Signature`` with the twilio library's ``RequestValidator``.

    ``url`` must be the URL Twilio was told to call, built from PUBLIC_URL + path
    (+ query string), never from the request's Host header, which a client controls.

    By default Twilio signs with the account Auth Token and HMAC-SHA1. When a Webhook
    Rule applies a SharedKey, Twilio adds ``X-Twilio-Webhooks-Signature-Settings`` naming
    the algorithm (HMAC_SHA1 or HMAC_SHA256) and signs with the SharedKey secret; pass
    that header's value as ``settings`` and configure ``shared_key_secret``. A settings
    header without a configured secret, or naming an unknown algorithm, is INVALID.
    """

    __slots__ = ("_auth", "_shared")

    def __init__(self, auth_token: str, *, shared_key_secret: str | None = None) -> None:
        if not auth_token:
            raise ValueError("auth_token must be non-empty")
        self._auth = RequestValidator(auth_token)
        self._shared = RequestValidator(shared_key_secret) if shared_key_secret else None

    def check(
        self,
        url: str,
        params: Mapping[str, str],
        signature: str | None,
        settings: str | None = None,
    ) -> SignatureResult:
        """Check a webhook: ``params`` are the form-encoded POST parameters."""
        if not signature:
            return SignatureResult.MISSING
        if settings:
            algorithm = _settings_algorithm(settings)
            if (
                algorithm not in (_HMAC_SHA1, _HMAC_SHA256)
                or self._shared is None
                or not _SHARED_KEY_SUPPORTED
            ):
                return SignatureResult.INVALID
            ok = self._shared.validate(url, params, signature, algorithm=algorithm)
        else:
            ok = self._auth.validate(url, params, signature)
        return SignatureResult.OK if ok is True else SignatureResult.INVALID

    def check_websocket(
        self, url: str, signature: str | None, settings: str | None = None
    ) -> SignatureResult:
        """Check the WebSocket upgrade Twilio makes for a Media Stream.

        Twilio signs the upgrade request like a webhook: the ``wss://`` URL from the
        TwiML ``<Stream url>`` (query string included), with no body parameters.
        """
        return self.check(url, {}, signature, settings)


# --- stream tokens --------------------------------------------------------------------------


class TokenResult(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CALL = "wrong_call"
    EXPIRED = "expired"
    REUSED = "reused"


_TOKEN_RE: Final = re.compile(r"([A-Za-z0-9_-]{1,512})\.([A-Za-z0-9_-]{43})", re.ASCII)
_TOKEN_DOMAIN: Final = b"gateway.stream-token.v1."
_MIN_SECRET_BYTES: Final = 16


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Single-use, short-lived tokens tying a Media Stream to the webhook that created it.

    The voice webhook (signature-checked) issues a token for its CallSid and puts it in a
    ``<Parameter>``; the stream's ``start`` message carries it back and is accepted only if
    the token redeems for that same CallSid. Token = ``base64url(payload) "." base64url(
    HMAC-SHA256(secret, payload))``; the payload binds the CallSid, an expiry and a random
    nonce. Redeemed nonces are remembered until their expiry, then purged.

    ``clock`` returns seconds; it defaults to wall-clock ``time.time`` because the expiry
    travels inside the token and must mean the same thing in every process sharing the
    secret and across restarts (a monotonic clock does not).
    """

    __slots__ = ("_clock", "_expiries", "_redeemed", "_secret", "_ttl")

    def __init__(
        self, secret: bytes, ttl_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {_MIN_SECRET_BYTES} bytes")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        self._secret = bytes(secret)
        self._ttl = ttl_s
        self._clock = clock
        self._redeemed: set[str] = set()
        self._expiries: list[tuple[float, str]] = []  # heap of (expiry, nonce)

    def _sign(self, body: str) -> str:
        mac = hmac.new(self._secret, _TOKEN_DOMAIN + body.encode("ascii"), hashlib.sha256)
        return _b64url(mac.digest())

    def issue(self, call_sid: str) -> str:
        if not call_sid:
            raise ValueError("call_sid must be non-empty")
        payload = {"c": call_sid, "e": self._clock() + self._ttl, "n": secrets.token_hex(16)}
        body = _b64url(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return f"{body}.{self._sign(body)}"

    def redeem(self, token: str, call_sid: str) -> TokenResult:
        match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return TokenResult.MALFORMED
        body, sig = match.groups()
        if not hmac.compare_digest(self._sign(body).encode("ascii"), sig.encode("ascii")):
            return TokenResult.BAD_SIGNATURE
        try:
            payload = json.loads(_unb64url(body))
            token_call, expiry, nonce = payload["c"], payload["e"], payload["n"]
        except (ValueError, binascii.Error, TypeError, KeyError, RecursionError):
            return TokenResult.MALFORMED
        if (
            not isinstance(token_call, str)
            or type(expiry) not in (int, float)
            or not isinstance(nonce, str)
        ):
            return TokenResult.MALFORMED
        if token_call != call_sid:  # not secret: a plain comparison is fine
            return TokenResult.WRONG_CALL
        now = self._clock()
        self._purge(now)
        if not now < expiry:
            return TokenResult.EXPIRED
        if nonce in self._redeemed:
            return TokenResult.REUSED
        self._redeemed.add(nonce)
        heapq.heappush(self._expiries, (float(expiry), nonce))
        return TokenResult.OK

    def _purge(self, now: float) -> None:
        """Forget nonces whose tokens have expired: they fail the expiry check anyway."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, nonce = heapq.heappop(heap)
            self._redeemed.discard(nonce)

    @property
    def remembered(self) -> int:
        """How many redeemed nonces are held (for tests and metrics)."""
        return len(self._redeemed)
