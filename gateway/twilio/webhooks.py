"""Webhook-side helpers: the stream URL, webhook bodies, Twilio signature checks, stream tokens.

Pure functions and small classes; the aiohttp server calls them. Secrets (the auth token,
the SharedKey secret, the token secret, issued tokens) never appear in return values other
than the token itself, in exception messages or in logs.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import twilio.request_validator as _request_validator
from twilio.request_validator import RequestValidator

from gateway.store import DEFAULT_TTL_S, CallStore, MemoryStore

__all__ = [
    "FORM_CONTENT_TYPE",
    "SIGNATURE_HEADER",
    "SIGNATURE_SETTINGS_HEADER",
    "FormError",
    "SignatureChecker",
    "SignatureResult",
    "StreamTokens",
    "TokenResult",
    "parse_form",
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


# --- stream URL -----------------------------------------------------------------------


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


# --- webhook bodies ----------------------------------------------------------------------

FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
#: Twilio sends a few dozen parameters; far more is not a Twilio request.
_MAX_FORM_FIELDS: Final = 500


class FormError(ValueError):
    """A webhook body that is not a form as Twilio sends one; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_form(body: bytes, content_type: str, charset: str | None = None) -> dict[str, str]:
    """The parameters of a webhook body, decoded strictly.

    Twilio posts ``application/x-www-form-urlencoded`` UTF-8. Anything else (another content
    type or charset, bytes or percent-escapes that are not UTF-8, a field without ``=``, too
    many fields) raises :class:`FormError`: a client error, never a server one. A key given
    twice keeps its last value, as the signature check has always seen it.
    """
    if content_type.lower() != FORM_CONTENT_TYPE:
        raise FormError("not a form")
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise FormError("charset not UTF-8")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("invalid UTF-8") from None
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except UnicodeDecodeError:
        raise FormError("invalid UTF-8") from None
    except ValueError:
        raise FormError("malformed form") from None
    return dict(pairs)


# --- stream tokens --------------------------------------------------------------------------


class TokenResult(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CALL = "wrong_call"
    WRONG_ACCOUNT = "wrong_account"
    WRONG_PERSONA = "wrong_persona"
    EXPIRED = "expired"
    REUSED = "reused"
    SECOND_STREAM = "second_stream"


_TOKEN_RE: Final = re.compile(r"([A-Za-z0-9_-]{1,1024})\.([A-Za-z0-9_-]{43})", re.ASCII)
# The payload gained "a" and "p" since v1; a v1 reader ignores them, so a token this
# version issues still redeems on a replica not yet updated during a rollout.
_TOKEN_DOMAIN: Final = b"gateway.stream-token.v1."
_MIN_SECRET_BYTES: Final = 16


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Short-lived tokens tying a Media Stream to the webhook that created it, and at most
    one stream per call, on every replica that shares the call store.

    The voice webhook (signature-checked) issues a token for its CallSid, AccountSid and
    persona and puts it in a ``<Parameter>``; the stream's ``start`` message carries it back
    and is accepted only if the token redeems for that same CallSid, AccountSid and persona.
    Token = ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``; the payload
    binds those three, an expiry and a random nonce.

    Twilio's signatures carry no timestamp, so a captured voice webhook can be replayed at
    any time and gets a fresh token. What stops it is the call memory in the store
    (:meth:`CallStore.claim_stream`): the first stream a CallSid redeems is remembered while
    it runs (at most ``live_s``; :meth:`ended` starts the countdown) and ``memory_s`` after,
    and no other token for that call redeems meanwhile (``SECOND_STREAM``; the same token
    again is ``REUSED``). :meth:`streamed` lets the webhook refuse to issue one at all. A
    webhook Twilio itself retries before any stream started gets a token that works, once.
    With the Redis store that holds on every replica; with the in-process one (the default),
    on this one (docs/security.md on replicas).

    ``clock`` returns seconds; it defaults to wall-clock ``time.time`` because the expiry
    travels inside the token and must mean the same thing in every process sharing the
    secret and across restarts (a monotonic clock does not). The default store, this
    process's own, runs on the same clock.
    """

    __slots__ = ("_clock", "_live", "_memory", "_secret", "_store", "_ttl")

    def __init__(
        self,
        secret: bytes,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        *,
        memory_s: float = 86400.0,
        store: CallStore | None = None,
        live_s: float = DEFAULT_TTL_S,
    ) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"secret must be at least {_MIN_SECRET_BYTES} bytes")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        if not memory_s >= 0:
            raise ValueError("memory_s must not be negative")
        if not live_s > 0:
            raise ValueError("live_s must be positive")
        self._secret = bytes(secret)
        self._ttl = ttl_s
        self._memory = memory_s
        self._live = live_s
        self._clock = clock
        self._store: CallStore = store or MemoryStore(clock=clock)

    def _sign(self, body: str) -> str:
        mac = hmac.new(self._secret, _TOKEN_DOMAIN + body.encode("ascii"), hashlib.sha256)
        return _b64url(mac.digest())

    def issue(self, call_sid: str, *, account_sid: str = "", persona: str = "") -> str:
        return self._issue(call_sid, account_sid, persona)[0]

    def _issue(self, call_sid: str, account_sid: str, persona: str) -> tuple[str, str]:
        """A token and its nonce."""
        if not call_sid:
            raise ValueError("call_sid must be non-empty")
        nonce = secrets.token_hex(16)
        payload = {
            "c": call_sid,
            "a": account_sid,
            "p": persona,
            "e": self._clock() + self._ttl,
            "n": nonce,
        }
        body = _b64url(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return f"{body}.{self._sign(body)}", nonce

    async def issue_next(self, call_sid: str, *, account_sid: str = "", persona: str = "") -> str:
        """A token for the next stream of a call that goes on (a hand-off): the call's
        claim is passed on to it, so it redeems once though the call had its stream."""
        token, nonce = self._issue(call_sid, account_sid, persona)
        await self._store.pass_stream(call_sid, nonce, self._live)
        return token

    async def recover(
        self, call_sid: str, *, account_sid: str = "", persona: str = ""
    ) -> str | None:
        """A token for the next stream of a call whose stream was lost with its replica,
        if this caller is the one to continue it (:meth:`CallStore.claim_recovery`)."""
        token, nonce = self._issue(call_sid, account_sid, persona)
        return token if await self._store.claim_recovery(call_sid, nonce, self._live) else None

    @staticmethod
    def nonce_of(token: str) -> str:
        """The nonce of a token :meth:`redeem` accepted: which of the call's streams it
        opened (the store refuses that stream's writes once the call moved on); "" if none."""
        match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        try:
            nonce = json.loads(_unb64url(match.group(1)))["n"] if match else ""
        except (ValueError, binascii.Error, TypeError, KeyError, RecursionError):
            return ""
        return nonce if isinstance(nonce, str) else ""

    async def redeem(
        self, token: str, call_sid: str, *, account_sid: str = "", persona: str = ""
    ) -> TokenResult:
        """Check a ``start``'s token against what the ``start`` says; OK opens the call's
        one stream (call :meth:`ended` when it closes). A refusal consumes nothing.
        The store's :class:`~gateway.store.StoreError` goes through."""
        match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return TokenResult.MALFORMED
        body, sig = match.groups()
        if not hmac.compare_digest(self._sign(body).encode("ascii"), sig.encode("ascii")):
            return TokenResult.BAD_SIGNATURE
        try:
            payload = json.loads(_unb64url(body))
            fields = (payload["c"], payload["a"], payload["p"], payload["n"])
            expiry = payload["e"]
        except (ValueError, binascii.Error, TypeError, KeyError, RecursionError):
            return TokenResult.MALFORMED
        if not all(isinstance(f, str) for f in fields) or type(expiry) not in (int, float):
            return TokenResult.MALFORMED
        token_call, token_account, token_persona, nonce = fields
        # None of these is secret: plain comparisons are fine.
        if token_call != call_sid:
            return TokenResult.WRONG_CALL
        if token_account != account_sid:
            return TokenResult.WRONG_ACCOUNT
        if token_persona != persona:
            return TokenResult.WRONG_PERSONA
        if not self._clock() < expiry:
            return TokenResult.EXPIRED
        held = await self._store.claim_stream(call_sid, nonce, self._live)
        if held is None:
            return TokenResult.OK
        return TokenResult.REUSED if held == nonce else TokenResult.SECOND_STREAM

    async def handed_off(self, call_sid: str) -> bool:
        """Whether the call was handed off and waits for its next stream (taken: once)."""
        return await self._store.take_hand_off(call_sid)

    async def streamed(self, call_sid: str) -> bool:
        """Whether the call has (or recently had) its stream: a webhook for it is a replay."""
        return await self._store.stream_claimed(call_sid)

    async def ended(self, call_sid: str) -> None:
        """The call's stream closed: remember the call ``memory_s`` more (at least until
        any token issued for it has expired), then forget it."""
        await self._store.stream_ended(call_sid, max(self._memory, self._ttl))
