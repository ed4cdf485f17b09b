"""Webhook helpers: TwiML, Twilio signature checks, single-use stream tokens."""

from __future__ import annotations

import asyncio
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

from gateway.store import MemoryStore
from gateway.twilio.twiml import (
    busy_twiml,
    connect_stream_twiml,
    dial_twiml,
    end_twiml,
    whisper_twiml,
)
from gateway.twilio.webhooks import (
    FORM_CONTENT_TYPE,
    FormError,
    SignatureChecker,
    SignatureResult,
    StreamTokens,
    TokenResult,
    parse_form,
    stream_url,
)

AUTH_TOKEN = "12345678901234567890123456789012"
SHARED_SECRET = "shared-key-secret-0123456789"
CALL = "CA5ff9d5d3a4e84f2a8b6b8f3c1e2d3c4b"
ACCOUNT = "AC" + "0" * 32
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


def test_connect_stream_twiml_with_an_action_and_the_end() -> None:
    action = "https://voice.example.com/twilio/connect-action"
    root = ET.fromstring(connect_stream_twiml("wss://h/twilio/media", {}, action=action))
    connect = root.find("Connect")
    assert connect is not None and connect.get("action") == action
    assert connect.find("Stream") is not None
    end = ET.fromstring(end_twiml())
    assert end.tag == "Response" and list(end) == []


def test_busy_twiml() -> None:
    root = ET.fromstring(busy_twiml())
    (reject,) = list(root)
    assert reject.tag == "Reject" and reject.get("reason") == "busy"


def test_dial_twiml_dials_a_number_or_a_sip_address_with_the_whisper() -> None:
    number = ET.fromstring(dial_twiml("+15550100099")).find("Dial/Number")
    assert number is not None and number.text == "+15550100099" and number.get("url") is None
    root = ET.fromstring(dial_twiml("sip:desk@pbx.example.com", "https://h/twilio/whisper?s=1"))
    sip = root.find("Dial/Sip")
    assert sip is not None and sip.text == "sip:desk@pbx.example.com"
    assert sip.get("url") == "https://h/twilio/whisper?s=1" and sip.get("method") == "POST"


def test_whisper_twiml_says_the_summary_in_a_well_formed_language_only() -> None:
    say = ET.fromstring(whisper_twiml("Ann <needs> help", "en-US")).find("Say")
    assert say is not None and say.text == "Ann <needs> help" and say.get("language") == "en-US"
    say = ET.fromstring(whisper_twiml("Ann", 'en"><Hangup/>')).find("Say")
    assert say is not None and say.get("language") is None
    assert list(ET.fromstring(whisper_twiml("  ", "en-US"))) == []


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


async def test_token_ok_then_reused() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue(CALL)
    assert token.isascii() and "." in token and len(token) < 300
    assert await tokens.redeem(token, CALL) is TokenResult.OK
    assert await tokens.redeem(token, CALL) is TokenResult.REUSED


async def test_tokens_are_distinct_and_a_call_gets_one_stream() -> None:
    tokens = StreamTokens(SECRET)
    first, second = tokens.issue(CALL), tokens.issue(CALL)
    assert first != second
    assert not await tokens.streamed(CALL)
    assert await tokens.redeem(second, CALL) is TokenResult.OK
    assert await tokens.streamed(CALL)
    # A replayed webhook's token for the same call opens no second stream, then or later.
    assert await tokens.redeem(first, CALL) is TokenResult.SECOND_STREAM
    await tokens.ended(CALL)
    assert await tokens.redeem(first, CALL) is TokenResult.SECOND_STREAM
    assert await tokens.redeem(second, CALL) is TokenResult.REUSED


async def test_a_call_that_goes_on_gets_one_next_stream() -> None:
    tokens = StreamTokens(SECRET)
    first = tokens.issue(CALL)
    assert await tokens.redeem(first, CALL) is TokenResult.OK
    await tokens.ended(CALL)
    replay = tokens.issue(CALL)  # a replayed voice webhook's
    following = await tokens.issue_next(CALL)
    assert await tokens.redeem(first, CALL) is TokenResult.SECOND_STREAM
    assert await tokens.redeem(replay, CALL) is TokenResult.SECOND_STREAM
    assert await tokens.redeem(following, CALL) is TokenResult.OK
    assert await tokens.redeem(following, CALL) is TokenResult.REUSED


async def test_token_binds_account_and_persona() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue(CALL, account_sid=ACCOUNT, persona="sales")
    assert await tokens.redeem(token, CALL, account_sid="AC" + "f" * 32, persona="sales") is (
        TokenResult.WRONG_ACCOUNT
    )
    assert await tokens.redeem(token, CALL, account_sid=ACCOUNT, persona="support") is (
        TokenResult.WRONG_PERSONA
    )
    assert await tokens.redeem(token, CALL, account_sid=ACCOUNT) is TokenResult.WRONG_PERSONA
    # None of the refusals consumed it.
    assert await tokens.redeem(token, CALL, account_sid=ACCOUNT, persona="sales") is TokenResult.OK


async def test_token_wrong_call_does_not_consume() -> None:
    tokens = StreamTokens(SECRET)
    token = tokens.issue(CALL)
    assert await tokens.redeem(token, "CAother") is TokenResult.WRONG_CALL
    assert await tokens.redeem(token, CALL) is TokenResult.OK


async def test_token_expired() -> None:
    clock = FakeClock()
    tokens = StreamTokens(SECRET, ttl_s=60.0, clock=clock)
    token = tokens.issue(CALL)
    clock.now += 59.9
    late = tokens.issue(CALL)
    clock.now += 0.1
    assert await tokens.redeem(token, CALL) is TokenResult.EXPIRED
    assert await tokens.redeem(late, CALL) is TokenResult.OK


async def test_calls_are_remembered_while_open_and_for_the_memory_after() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tokens = StreamTokens(SECRET, ttl_s=10.0, clock=clock, memory_s=100.0, store=store)
    calls = [f"CA{n:032d}" for n in range(30)]
    for call in calls:
        assert await tokens.redeem(tokens.issue(call), call) is TokenResult.OK
    for call in calls[:20]:
        await tokens.ended(call)
    clock.now += 1000.0  # an open call stays remembered (up to live_s: 4 h by default)
    # The 20 that ended were forgotten `memory_s` after; the 10 still open were not.
    assert await tokens.streamed(calls[0]) is False and store.keys == 10
    for call in calls[20:]:
        await tokens.ended(call)
    clock.now += 50.0
    replay = tokens.issue(calls[25])
    assert await tokens.redeem(replay, calls[25]) is TokenResult.SECOND_STREAM
    assert store.keys == 10
    clock.now += 50.0
    assert not await tokens.streamed(calls[25])
    assert store.keys == 0
    # Once forgotten, a replay issued afterwards opens a stream again: the memory's limit.
    assert await tokens.redeem(tokens.issue(calls[25]), calls[25]) is TokenResult.OK


async def test_memory_outlasts_every_token_issued_for_the_call() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    tokens = StreamTokens(SECRET, ttl_s=60.0, clock=clock, memory_s=0.0, store=store)
    early, late = tokens.issue(CALL), None
    clock.now += 30.0
    late = tokens.issue(CALL)
    assert await tokens.redeem(early, CALL) is TokenResult.OK
    await tokens.ended(CALL)  # a very short call
    clock.now += 59.0
    assert await tokens.redeem(late, CALL) is TokenResult.SECOND_STREAM
    clock.now += 2.0
    assert await tokens.redeem(late, CALL) is TokenResult.EXPIRED
    assert store.keys == 0


async def test_ended_without_a_stream_is_harmless() -> None:
    store = MemoryStore()
    tokens = StreamTokens(SECRET, store=store)
    await tokens.ended(CALL)
    assert store.keys == 0
    assert await tokens.redeem(tokens.issue(CALL), CALL) is TokenResult.OK


async def test_token_from_other_secret_is_bad_signature() -> None:
    token = StreamTokens(b"o" * 32).issue(CALL)
    assert await StreamTokens(SECRET).redeem(token, CALL) is TokenResult.BAD_SIGNATURE


def _tamper_payload(token: str, **changes: object) -> str:
    body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + sig


async def test_tampered_token_is_bad_signature() -> None:
    clock = FakeClock()
    tokens = StreamTokens(SECRET, clock=clock)
    token = tokens.issue(CALL)
    body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert await tokens.redeem(f"{body}.{flipped}", CALL) is TokenResult.BAD_SIGNATURE
    assert await tokens.redeem(_tamper_payload(token, c="CAother"), "CAother") is (
        TokenResult.BAD_SIGNATURE
    )
    assert await tokens.redeem(_tamper_payload(token, e=clock.now + 1e9), CALL) is (
        TokenResult.BAD_SIGNATURE
    )
    assert await tokens.redeem(token, CALL) is TokenResult.OK


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
async def test_garbage_token_is_malformed(garbage: str) -> None:
    assert await StreamTokens(SECRET).redeem(garbage, CALL) is TokenResult.MALFORMED


@given(st.text(max_size=200))
def test_any_text_redeems_without_exceptions(text: str) -> None:
    tokens = StreamTokens(SECRET)
    assert asyncio.run(tokens.redeem(text, CALL)) in (
        TokenResult.MALFORMED,
        TokenResult.BAD_SIGNATURE,
    )


def test_token_secret_and_ttl_validation() -> None:
    with pytest.raises(ValueError) as info:
        StreamTokens(b"short")
    assert "short" not in str(info.value)
    with pytest.raises(ValueError):
        StreamTokens(SECRET, ttl_s=0)
    with pytest.raises(ValueError):
        StreamTokens(SECRET, memory_s=-1)
    with pytest.raises(ValueError):
        StreamTokens(SECRET, live_s=0)
    with pytest.raises(ValueError):
        StreamTokens(SECRET).issue("")


def test_token_does_not_leak_secret() -> None:
    token = StreamTokens(SECRET).issue(CALL)
    body, _ = token.split(".")
    assert SECRET not in base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert SECRET.decode() not in token


# --- webhook bodies ----------------------------------------------------------------------


def test_form_as_twilio_sends_it() -> None:
    body = b"CallSid=CA123&From=%2B15005550006&To=%2B15005550001&Caller=J%C3%BCrgen+X&Empty="
    assert parse_form(body, FORM_CONTENT_TYPE, "UTF-8") == {
        "CallSid": "CA123",
        "From": "+15005550006",
        "To": "+15005550001",
        "Caller": "J\u00fcrgen X",
        "Empty": "",
    }
    assert parse_form(b"", FORM_CONTENT_TYPE) == {}
    assert parse_form(b"A=1&A=2", FORM_CONTENT_TYPE) == {"A": "2"}


@pytest.mark.parametrize(
    ("body", "content_type", "charset", "reason"),
    [
        (b"CallSid=CA\xff\xfe", FORM_CONTENT_TYPE, None, "invalid UTF-8"),
        (b"CallSid=CA%FF%FE", FORM_CONTENT_TYPE, None, "invalid UTF-8"),
        (b"\xc3(=1", FORM_CONTENT_TYPE, None, "invalid UTF-8"),
        (b"CallSid", FORM_CONTENT_TYPE, None, "malformed form"),
        (b"a=1&&b=2", FORM_CONTENT_TYPE, None, "malformed form"),
        (b"&".join([b"a=1"] * 501), FORM_CONTENT_TYPE, None, "malformed form"),
        (b'{"CallSid": "CA1"}', "application/json", None, "not a form"),
        (b"--x\r\n", "multipart/form-data", None, "not a form"),
        (b"CallSid=CA1", FORM_CONTENT_TYPE, "latin-1", "charset not UTF-8"),
    ],
)
def test_bad_bodies_are_form_errors(
    body: bytes, content_type: str, charset: str | None, reason: str
) -> None:
    with pytest.raises(FormError) as error:
        parse_form(body, content_type, charset)
    assert error.value.reason == reason


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_form_error(body: bytes) -> None:
    try:
        params = parse_form(body, FORM_CONTENT_TYPE)
    except FormError as error:
        assert error.reason in ("invalid UTF-8", "malformed form")
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
