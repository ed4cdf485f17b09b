"""Webhook helpers: TwiML, Twilio signature checks, single-use stream tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from gateway.twilio.webhooks import (
    SignatureChecker,
    SignatureResult,
    StreamTokens,
    TokenResult,
    busy_twiml,
    connect_stream_twiml,
    stream_url,
)

AUTH_TOKEN = "12345678901234567890123456789012"
SHARED_SECRET = "shared-key-secret-0123456789"
CALL = "CA5ff9d5d3a4e84f2a8b6b8f3c1e2d3c4b"
SECRET = b"s" * 32

# --- TwiML ------------------------------------------------------------------------------


def test_connect_stream_twiml() -> None:
    url = "wss://voice.example.com/twilio/media"
    xml = connect_stream_twiml(url, {"token": "abc.def", "note": 'a"<&>b'})
    root = ET.fromstring(xml)
    assert root.tag == "Response"
    (connect,) = list(root)
    assert connect.tag == "Connect"
    (stream,) = list(connect)
    assert stream.tag == "Stream" and stream.get("url") == url
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"token": "abc.def", "note": 'a"<&>b'}


def test_connect_stream_twiml_without_parameters() -> None:
    root = ET.fromstring(connect_stream_twiml("wss://h/twilio/media", {}))
    stream = root.find("Connect/Stream")
    assert stream is not None and list(stream) == []


def test_busy_twiml() -> None:
    root = ET.fromstring(busy_twiml())
    (reject,) = list(root)
    assert reject.tag == "Reject" and reject.get("reason") == "busy"


@pytest.mark.parametrize(
    ("public", "expected"),
    [
        ("https://voice.example.com", "wss://voice.example.com/twilio/media"),
        ("https://voice.example.com/", "wss://voice.example.com/twilio/media"),
        ("https://voice.example.com:8443", "wss://voice.example.com:8443/twilio/media"),
        ("https://example.com/gw/", "wss://example.com/gw/twilio/media"),
        ("HTTPS://example.com/gw", "wss://example.com/gw/twilio/media"),
        ("http://localhost:8080", "ws://localhost:8080/twilio/media"),
    ],
)
def test_stream_url(public: str, expected: str) -> None:
    assert stream_url(public) == expected


def test_stream_url_custom_path() -> None:
    assert stream_url("https://h.example", "/ws") == "wss://h.example/ws"


@pytest.mark.parametrize(
    "public",
    [
        "ftp://example.com",
        "wss://example.com",
        "example.com",
        "https://",
        "https://user:pw@example.com",
        "https://example.com/?a=1",
        "https://example.com/#x",
    ],
)
def test_stream_url_rejects(public: str) -> None:
    with pytest.raises(ValueError):
        stream_url(public)


def test_stream_url_rejects_relative_path() -> None:
    with pytest.raises(ValueError):
        stream_url("https://example.com", "twilio/media")


# --- signatures ---------------------------------------------------------------------------

WEBHOOK_URL = "https://voice.example.com/twilio/voice"
PARAMS = {"CallSid": CALL, "From": "+15550100", "To": "+15550199", "Empty": ""}


def sign(url: str, params: dict[str, str], secret: str = AUTH_TOKEN, alg: str | None = None) -> str:
    signature: str = RequestValidator(secret).compute_signature(url, params, alg)
    return signature


def test_signature_ok() -> None:
    checker = SignatureChecker(AUTH_TOKEN)
    assert checker.check(WEBHOOK_URL, PARAMS, sign(WEBHOOK_URL, PARAMS)) is SignatureResult.OK


def test_signature_with_query_string() -> None:
    url = WEBHOOK_URL + "?tenant=a&x=1"
    checker = SignatureChecker(AUTH_TOKEN)
    assert checker.check(url, PARAMS, sign(url, PARAMS)) is SignatureResult.OK
    assert checker.check(WEBHOOK_URL, PARAMS, sign(url, PARAMS)) is SignatureResult.INVALID


@pytest.mark.parametrize("signature", [None, ""])
def test_signature_missing(signature: str | None) -> None:
    assert SignatureChecker(AUTH_TOKEN).check(WEBHOOK_URL, PARAMS, signature) is (
        SignatureResult.MISSING
    )


def test_signature_invalid() -> None:
    checker = SignatureChecker(AUTH_TOKEN)
    good = sign(WEBHOOK_URL, PARAMS)
    assert checker.check(WEBHOOK_URL, PARAMS, "x" + good[1:]) is SignatureResult.INVALID
    assert checker.check(WEBHOOK_URL, PARAMS, "garbage") is SignatureResult.INVALID
    # Same signature, other parameters / other URL / other token.
    tampered = {**PARAMS, "From": "+15550666"}
    assert checker.check(WEBHOOK_URL, tampered, good) is SignatureResult.INVALID
    assert checker.check(WEBHOOK_URL + "x", PARAMS, good) is SignatureResult.INVALID
    other = SignatureChecker("another-token-entirely-000000000")
    assert other.check(WEBHOOK_URL, PARAMS, good) is SignatureResult.INVALID


def test_signature_invalid_when_signed_for_another_host() -> None:
    """Callers pass PUBLIC_URL, so a request signed for another host never matches."""
    evil = "https://evil.example.com/twilio/voice"
    result = SignatureChecker(AUTH_TOKEN).check(WEBHOOK_URL, PARAMS, sign(evil, PARAMS))
    assert result is SignatureResult.INVALID


def test_signature_with_multidict_params() -> None:
    """aiohttp's form data is a MultiDict: repeated keys are all signed."""
    form: MultiDict[str] = MultiDict([("CallSid", CALL), ("Digits", "1"), ("Digits", "2")])
    signed = WEBHOOK_URL + "CallSid" + CALL + "Digits1Digits2"
    expected = base64.b64encode(
        hmac.new(AUTH_TOKEN.encode(), signed.encode(), hashlib.sha1).digest()
    ).decode()
    assert SignatureChecker(AUTH_TOKEN).check(WEBHOOK_URL, form, expected) is SignatureResult.OK


def test_websocket_upgrade_signature() -> None:
    url = "wss://voice.example.com/twilio/media"
    checker = SignatureChecker(AUTH_TOKEN)
    assert checker.check_websocket(url, sign(url, {})) is SignatureResult.OK
    assert checker.check_websocket(url, None) is SignatureResult.MISSING
    assert checker.check_websocket(url, sign(url, PARAMS)) is SignatureResult.INVALID
    https = "https://voice.example.com/twilio/media"
    assert checker.check_websocket(url, sign(https, {})) is SignatureResult.INVALID


def test_websocket_upgrade_signature_with_explicit_port() -> None:
    url = "wss://voice.example.com:8443/twilio/media"
    checker = SignatureChecker(AUTH_TOKEN)
    assert checker.check_websocket(url, sign(url, {})) is SignatureResult.OK


@pytest.mark.parametrize("alg", ["HMAC_SHA256", "HMAC_SHA1"])
def test_shared_key_signature(alg: str) -> None:
    settings = f"key=webhooks_sharedkey_123,algorithm={alg}"
    checker = SignatureChecker(AUTH_TOKEN, shared_key_secret=SHARED_SECRET)
    signature = sign(WEBHOOK_URL, PARAMS, SHARED_SECRET, alg)
    assert checker.check(WEBHOOK_URL, PARAMS, signature, settings) is SignatureResult.OK
    # Without the settings header the Auth Token / SHA-1 is expected.
    assert checker.check(WEBHOOK_URL, PARAMS, signature) is SignatureResult.INVALID
    # A SharedKey signature made with the Auth Token is not accepted.
    by_token = sign(WEBHOOK_URL, PARAMS, AUTH_TOKEN, alg)
    assert checker.check(WEBHOOK_URL, PARAMS, by_token, settings) is SignatureResult.INVALID


def test_shared_key_signature_on_websocket_upgrade() -> None:
    url = "wss://voice.example.com/twilio/media"
    settings = "key=k1,algorithm=HMAC_SHA256"
    checker = SignatureChecker(AUTH_TOKEN, shared_key_secret=SHARED_SECRET)
    signature = sign(url, {}, SHARED_SECRET, "HMAC_SHA256")
    assert checker.check_websocket(url, signature, settings) is SignatureResult.OK


def test_shared_key_refused_when_not_configured_or_unknown_algorithm() -> None:
    signature = sign(WEBHOOK_URL, PARAMS, SHARED_SECRET, "HMAC_SHA256")
    settings = "key=k1,algorithm=HMAC_SHA256"
    unconfigured = SignatureChecker(AUTH_TOKEN)
    assert unconfigured.check(WEBHOOK_URL, PARAMS, signature, settings) is SignatureResult.INVALID
    configured = SignatureChecker(AUTH_TOKEN, shared_key_secret=SHARED_SECRET)
    assert (
        configured.check(WEBHOOK_URL, PARAMS, signature, "key=k1,algorithm=HMAC_MD5")
        is SignatureResult.INVALID
    )


def test_settings_header_without_algorithm_means_sha1_with_shared_key() -> None:
    checker = SignatureChecker(AUTH_TOKEN, shared_key_secret=SHARED_SECRET)
    signature = sign(WEBHOOK_URL, PARAMS, SHARED_SECRET)
    assert checker.check(WEBHOOK_URL, PARAMS, signature, "key=k1") is SignatureResult.OK


def test_empty_auth_token_is_refused() -> None:
    with pytest.raises(ValueError):
        SignatureChecker("")


# --- stream tokens --------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_token_ok_then_reused() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue(CALL)
    assert token.isascii() and "." in token and len(token) < 300
    assert tokens.redeem(token, CALL) is TokenResult.OK
    assert tokens.redeem(token, CALL) is TokenResult.REUSED


def test_tokens_are_distinct() -> None:
    tokens = StreamTokens(SECRET)
    first, second = tokens.issue(CALL), tokens.issue(CALL)
    assert first != second
    assert tokens.redeem(first, CALL) is TokenResult.OK
    assert tokens.redeem(second, CALL) is TokenResult.OK


def test_token_wrong_call_does_not_consume() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue(CALL)
    assert tokens.redeem(token, "CAother") is TokenResult.WRONG_CALL
    assert tokens.redeem(token, CALL) is TokenResult.OK


def test_token_expired() -> None:
    clock = FakeClock()
    tokens = StreamTokens(SECRET, ttl_s=60.0, clock=clock)
    token = tokens.issue(CALL)
    clock.now += 59.9
    late = tokens.issue(CALL)
    clock.now += 0.1
    assert tokens.redeem(token, CALL) is TokenResult.EXPIRED
    assert tokens.redeem(late, CALL) is TokenResult.OK


def test_redeemed_nonces_are_purged_after_expiry() -> None:
    clock = FakeClock()
    tokens = StreamTokens(SECRET, ttl_s=10.0, clock=clock)
    for _ in range(100):
        assert tokens.redeem(tokens.issue(CALL), CALL) is TokenResult.OK
        clock.now += 0.5
    assert tokens.remembered == 20  # only tokens issued in the last 10 s
    replay = tokens.issue(CALL)
    assert tokens.redeem(replay, CALL) is TokenResult.OK
    clock.now += 10.0
    # Its nonce is forgotten, but the replay is still refused: it has expired.
    assert tokens.redeem(replay, CALL) is TokenResult.EXPIRED
    assert tokens.remembered == 0


def test_token_from_other_secret_is_bad_signature() -> None:
    token = StreamTokens(b"o" * 32).issue(CALL)
    assert StreamTokens(SECRET).redeem(token, CALL) is TokenResult.BAD_SIGNATURE


def _tamper_payload(token: str, **changes: object) -> str:
    body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + sig


def test_tampered_token_is_bad_signature() -> None:
    clock = FakeClock()
    tokens = StreamTokens(SECRET, clock=clock)
    token = tokens.issue(CALL)
    body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert tokens.redeem(f"{body}.{flipped}", CALL) is TokenResult.BAD_SIGNATURE
    assert tokens.redeem(_tamper_payload(token, c="CAother"), "CAother") is (
        TokenResult.BAD_SIGNATURE
    )
    assert tokens.redeem(_tamper_payload(token, e=clock.now + 1e9), CALL) is (
        TokenResult.BAD_SIGNATURE
    )
    assert tokens.redeem(token, CALL) is TokenResult.OK


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "a.b.c",
        "a b.c",
        "é.é",
        "abc.def",
        "x" * 2000 + "." + "y" * 43,
    ],
)
def test_garbage_token_is_malformed(garbage: str) -> None:
    assert StreamTokens(SECRET).redeem(garbage, CALL) is TokenResult.MALFORMED


@given(st.text(max_size=200))
def test_any_text_redeems_without_exceptions(text: str) -> None:
    tokens = StreamTokens(SECRET)
    assert tokens.redeem(text, CALL) in (TokenResult.MALFORMED, TokenResult.BAD_SIGNATURE)


def test_token_secret_and_ttl_validation() -> None:
    with pytest.raises(ValueError) as info:
        StreamTokens(b"short")
    assert "short" not in str(info.value)
    with pytest.raises(ValueError):
        StreamTokens(SECRET, ttl_s=0)
    with pytest.raises(ValueError):
        StreamTokens(SECRET).issue("")


def test_token_does_not_leak_secret() -> None:
    token = StreamTokens(SECRET).issue(CALL)
    body, _ = token.split(".")
    assert SECRET not in base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert SECRET.decode() not in token
