"""Twilio Media Streams protocol: parsing, ordering rules, close codes and builders."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.twilio.protocol import (
    MAX_MEDIA_PAYLOAD_BYTES,
    MAX_MESSAGE_BYTES,
    Connected,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    MediaFormat,
    Start,
    Stop,
    StreamParser,
    StreamProtocolError,
    clear_message,
    mark_message,
    media_message,
)

STREAM = "MZ18ad3ab5a668481ce02b83e7395059f0"
ACCOUNT = "AC25e16e9a716a4a1786a7c83f58e30482"
CALL = "CA5ff9d5d3a4e84f2a8b6b8f3c1e2d3c4b"
FRAME = bytes(range(160))


def connected() -> dict[str, Any]:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "streamSid": STREAM,
        "accountSid": ACCOUNT,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"token": "abc.def", "caller": "+15550100"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    body.update(overrides)
    return {"event": "start", "sequenceNumber": "1", "start": body, "streamSid": STREAM}


def media(payload: bytes = FRAME, seq: int = 2, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "track": "inbound",
        "chunk": str(seq - 1),
        "timestamp": str((seq - 2) * 20),
        "payload": base64.b64encode(payload).decode("ascii"),
    }
    body.update(overrides)
    return {"event": "media", "sequenceNumber": str(seq), "media": body, "streamSid": STREAM}


def dtmf(digit: str = "5", track: str = "inbound_track") -> dict[str, Any]:
    return {
        "event": "dtmf",
        "streamSid": STREAM,
        "sequenceNumber": "5",
        "dtmf": {"track": track, "digit": digit},
    }


def mark(name: str = "turn-1") -> dict[str, Any]:
    return {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": name}}


def stop() -> dict[str, Any]:
    return {
        "event": "stop",
        "sequenceNumber": "9",
        "streamSid": STREAM,
        "stop": {"accountSid": ACCOUNT, "callSid": CALL},
    }


def started() -> StreamParser:
    parser = StreamParser()
    parser.parse(json.dumps(connected()))
    parser.parse(json.dumps(start()))
    return parser


def expect_error(parser: StreamParser, message: dict[str, Any] | str, code: int) -> str:
    text = message if isinstance(message, str) else json.dumps(message)
    with pytest.raises(StreamProtocolError) as info:
        parser.parse(text)
    err = info.value
    assert err.close_code == code
    assert 0 < len(err.reason.encode()) <= 123 and err.reason.isascii()
    return err.reason


# --- happy path -----------------------------------------------------------------------------


def test_full_stream_parses_every_message_type() -> None:
    parser = StreamParser()
    assert parser.parse(json.dumps(connected())) == Connected(protocol="Call", version="1.0.0")
    assert parser.start is None

    msg = parser.parse(json.dumps(start()))
    assert msg == Start(
        sequence_number=1,
        stream_sid=STREAM,
        account_sid=ACCOUNT,
        call_sid=CALL,
        tracks=("inbound",),
        custom_parameters={"token": "abc.def", "caller": "+15550100"},
        media_format=MediaFormat(encoding="audio/x-mulaw", sample_rate=8000, channels=1),
    )
    assert parser.start == msg
    hash(msg)  # frozen and hashable despite the dict field

    assert parser.parse(json.dumps(media(seq=3))) == Media(
        sequence_number=3,
        stream_sid=STREAM,
        track="inbound",
        chunk=2,
        timestamp_ms=20,
        payload=FRAME,
    )
    assert parser.parse(json.dumps(dtmf("#"))) == Dtmf(
        stream_sid=STREAM, track="inbound_track", digit="#"
    )
    assert parser.parse(json.dumps(mark("m-7"))) == Mark(stream_sid=STREAM, name="m-7")
    assert not parser.stopped
    assert parser.parse(json.dumps(stop())) == Stop(
        stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL
    )
    assert parser.stopped


def test_connected_is_optional() -> None:
    parser = StreamParser()
    assert isinstance(parser.parse(json.dumps(start())), Start)
    assert isinstance(parser.parse(json.dumps(media())), Media)


def test_integer_counters_and_missing_custom_parameters_are_accepted() -> None:
    parser = StreamParser()
    msg = start()
    del msg["start"]["customParameters"]
    msg["sequenceNumber"] = 1
    parsed = parser.parse(json.dumps(msg))
    assert isinstance(parsed, Start) and parsed.custom_parameters == {}
    frame = media(chunk=7, timestamp=140)
    frame["sequenceNumber"] = 9
    parsed_media = parser.parse(json.dumps(frame))
    assert isinstance(parsed_media, Media)
    assert (parsed_media.sequence_number, parsed_media.chunk, parsed_media.timestamp_ms) == (
        9,
        7,
        140,
    )


def test_media_payload_size_bounds() -> None:
    parser = started()
    for size in (1, 160, MAX_MEDIA_PAYLOAD_BYTES):
        msg = parser.parse(json.dumps(media(b"\x7f" * size)))
        assert isinstance(msg, Media) and msg.payload == b"\x7f" * size


def test_top_level_stream_sid_is_optional_on_start() -> None:
    msg = start()
    del msg["streamSid"]
    assert isinstance(StreamParser().parse(json.dumps(msg)), Start)


# --- close codes ----------------------------------------------------------------------------


def test_binary_frames_are_unsupported_data() -> None:
    parser = started()
    with pytest.raises(StreamProtocolError) as info:
        parser.parse_bytes(b'{"event":"media"}')
    assert info.value.close_code == 1003
    # The parser stays failed afterwards.
    expect_error(parser, media(), 1008)


def test_too_big_message() -> None:
    parser = started()
    expect_error(parser, " " * (MAX_MESSAGE_BYTES + 1), 1009)
    # Counted in UTF-8 bytes, not characters.
    expect_error(StreamParser(), "é" * (MAX_MESSAGE_BYTES // 2 + 1), 1009)


def test_message_at_size_limit_is_not_too_big() -> None:
    msg = json.dumps(start())
    text = msg + " " * (MAX_MESSAGE_BYTES - len(msg))
    assert isinstance(StreamParser().parse(text), Start)


@pytest.mark.parametrize(
    "fmt",
    [
        {"encoding": "audio/l16", "sampleRate": 8000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
    ],
)
def test_wrong_media_format_is_unsupported_data(fmt: dict[str, Any]) -> None:
    expect_error(StreamParser(), start(mediaFormat=fmt), 1003)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"event": "media",}',
        "[1, 2]",
        '"start"',
        "null",
        "[" * 60_000,
        "1" * 5000,
        # Where orjson is stricter than the stdlib: invalid JSON all the same.
        '{"event": NaN}',
        '{"event": "media", "x": Infinity}',
        '{"event": "\\ud800"}',
        '{"event": "start", "sequenceNumber": 123456789012345678901234567890}',
    ],
)
def test_bad_json_is_a_policy_violation(text: str) -> None:
    expect_error(StreamParser(), text, 1008)


@pytest.mark.parametrize(
    "message",
    [
        {"protocol": "Call"},
        {"event": None},
        {"event": "hello"},
        {"event": 5},
        {"event": ["media"]},
        {"event": "clear", "streamSid": STREAM},
    ],
)
def test_missing_or_unknown_event(message: dict[str, Any]) -> None:
    expect_error(started(), message, 1008)


def _without(msg: dict[str, Any], *path: str) -> dict[str, Any]:
    target = msg
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return msg


def _with(msg: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    target = msg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return msg


@pytest.mark.parametrize(
    "message",
    [
        _without(connected(), "protocol"),
        _without(connected(), "version"),
        _with(connected(), 1, "version"),
        _without(start(), "sequenceNumber"),
        _without(start(), "start"),
        _with(start(), "x", "start"),
        _without(start(), "start", "streamSid"),
        _without(start(), "start", "accountSid"),
        _without(start(), "start", "callSid"),
        _with(start(), "", "start", "callSid"),
        _with(start(), "CA\n123", "start", "callSid"),
        _with(start(), "C" * 65, "start", "callSid"),
        _without(start(), "start", "tracks"),
        _with(start(), [], "start", "tracks"),
        _with(start(), "inbound", "start", "tracks"),
        _with(start(), ["inbound", "outbound"], "start", "tracks"),
        _with(start(), {"a": 1}, "start", "customParameters"),
        _with(start(), ["a"], "start", "customParameters"),
        _without(start(), "start", "mediaFormat"),
        _with(start(), "8000", "start", "mediaFormat", "sampleRate"),
        _with(start(), True, "start", "mediaFormat", "channels"),
        _without(start(), "start", "mediaFormat", "encoding"),
        _with(start(), "MZother", "streamSid"),
        _with(start(), "-1", "sequenceNumber"),
        _with(start(), " 1", "sequenceNumber"),
        _with(start(), "１", "sequenceNumber"),
        _with(start(), 1.5, "sequenceNumber"),
        _with(start(), True, "sequenceNumber"),
    ],
)
def test_bad_connected_or_start_fields(message: dict[str, Any]) -> None:
    parser = StreamParser()
    if message["event"] == "start":
        parser.parse(json.dumps(connected()))
    expect_error(parser, message, 1008)


@pytest.mark.parametrize(
    "message",
    [
        _without(media(), "streamSid"),
        _with(media(), "MZother", "streamSid"),
        _without(media(), "media"),
        _with(media(), None, "media"),
        _without(media(), "sequenceNumber"),
        _without(media(), "media", "chunk"),
        _with(media(), "x", "media", "chunk"),
        _without(media(), "media", "timestamp"),
        _with(media(), -20, "media", "timestamp"),
        _without(media(), "media", "payload"),
        _with(media(), "", "media", "payload"),
        _with(media(), 123, "media", "payload"),
        _with(media(), "!!!!", "media", "payload"),
        _with(media(), "AAA", "media", "payload"),
        _with(media(), "AA==AA==", "media", "payload"),
        _with(media(), "AAAA\n", "media", "payload"),
        _with(media(), "ÿÿÿÿ", "media", "payload"),
        _with(media(), "=", "media", "payload"),
        _with(media(), "outbound", "media", "track"),
        _with(media(), "inbound_track", "media", "track"),
        _without(media(), "media", "track"),
        media(b"\x00" * (MAX_MEDIA_PAYLOAD_BYTES + 1)),
        media(b"\x00" * 40_000),
        _without(dtmf(), "dtmf"),
        _without(dtmf(), "streamSid"),
        dtmf(track="outbound_track"),
        _with(dtmf(), ["inbound_track"], "dtmf", "track"),
        dtmf(digit="55"),
        dtmf(digit="x"),
        dtmf(digit=""),
        _with(dtmf(), 5, "dtmf", "digit"),
        _without(mark(), "mark"),
        mark(name=""),
        _with(mark(), 3, "mark", "name"),
        mark(name="n" * 257),
        _with(mark(), "MZother", "streamSid"),
        _without(stop(), "stop"),
        _without(stop(), "stop", "callSid"),
        _with(stop(), "CAother", "stop", "callSid"),
        _with(stop(), "ACother", "stop", "accountSid"),
        _with(stop(), "MZother", "streamSid"),
    ],
)
def test_bad_fields_after_start(message: dict[str, Any]) -> None:
    expect_error(started(), message, 1008)


# --- order rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [media(), dtmf(), mark(), stop()])
def test_nothing_but_connected_or_start_before_start(message: dict[str, Any]) -> None:
    reason = expect_error(StreamParser(), message, 1008)
    assert "before start" in reason
    parser = StreamParser()
    parser.parse(json.dumps(connected()))
    expect_error(parser, message, 1008)


def test_connected_only_first() -> None:
    parser = StreamParser()
    parser.parse(json.dumps(connected()))
    expect_error(parser, connected(), 1008)
    expect_error(started(), connected(), 1008)


def test_start_exactly_once() -> None:
    expect_error(started(), start(), 1008)


@pytest.mark.parametrize("message", [connected(), start(), media(), dtmf(), mark(), stop()])
def test_nothing_after_stop(message: dict[str, Any]) -> None:
    parser = started()
    parser.parse(json.dumps(stop()))
    reason = expect_error(parser, message, 1008)
    assert reason == "message after stop"


def test_parser_stays_failed_after_an_error() -> None:
    parser = started()
    expect_error(parser, "garbage", 1008)
    expect_error(parser, media(), 1008)


def test_reasons_never_quote_content() -> None:
    secret = "SECRET-PAYLOAD-VALUE"
    cases = [
        (started(), _with(media(), secret + "!", "media", "payload")),
        (started(), _with(media(), secret, "streamSid")),
        (started(), {"event": secret}),
        (StreamParser(), start(callSid=secret * 5)),
        (started(), secret),
    ]
    for parser, message in cases:
        with pytest.raises(StreamProtocolError) as info:
            parser.parse(message if isinstance(message, str) else json.dumps(message))
        assert secret not in str(info.value) and secret not in info.value.reason


# --- builders -----------------------------------------------------------------------------------


def test_media_message_round_trip() -> None:
    text = media_message(STREAM, FRAME)
    assert json.loads(text) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": base64.b64encode(FRAME).decode("ascii")},
    }


def test_mark_and_clear_messages() -> None:
    assert json.loads(mark_message(STREAM, 'turn "7"\\')) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": 'turn "7"\\'},
    }
    assert json.loads(clear_message(STREAM)) == {"event": "clear", "streamSid": STREAM}


def test_builders_refuse_empty_arguments() -> None:
    with pytest.raises(ValueError):
        media_message(STREAM, b"")
    with pytest.raises(ValueError):
        mark_message(STREAM, "")
    with pytest.raises(ValueError):
        clear_message("")


def test_echoed_mark_parses_back() -> None:
    """Twilio echoes our mark with the same name; the parser must read it back."""
    echoed = json.loads(mark_message(STREAM, "turn-3"))
    echoed["sequenceNumber"] = "12"
    assert started().parse(json.dumps(echoed)) == Mark(stream_sid=STREAM, name="turn-3")


@given(st.binary(min_size=1, max_size=MAX_MEDIA_PAYLOAD_BYTES))
def test_outbound_media_payload_parses_as_inbound(payload: bytes) -> None:
    """Our encoder and the inbound decoder agree on any audio bytes."""
    sent = json.loads(media_message(STREAM, payload))
    frame = media()
    frame["media"]["payload"] = sent["media"]["payload"]
    msg = started().parse(json.dumps(frame))
    assert isinstance(msg, Media) and msg.payload == payload


# --- properties ---------------------------------------------------------------------------------

_EVENTS = ["connected", "start", "media", "dtmf", "mark", "stop", "clear"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "streamSid",
        "sequenceNumber",
        "start",
        "media",
        "dtmf",
        "mark",
        "stop",
        "protocol",
        "version",
        "track",
        "payload",
        "chunk",
        "timestamp",
        "accountSid",
        "callSid",
        "tracks",
        "customParameters",
        "mediaFormat",
        "name",
        "digit",
    ]
) | st.text(max_size=8)


def _check(parser: StreamParser, text: str) -> None:
    try:
        msg = parser.parse(text)
    except StreamProtocolError as err:
        assert err.close_code in (1003, 1008, 1009)
        assert err.reason.isascii() and len(err.reason.encode()) <= 123
    else:
        assert isinstance(msg, InboundMessage)


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_any_text_is_a_message_or_a_protocol_error(text: str) -> None:
    _check(StreamParser(), text)
    _check(started(), text)


@given(st.binary(max_size=200))
def test_any_bytes_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(StreamProtocolError) as info:
        StreamParser().parse_bytes(data)
    assert info.value.close_code == 1003


@settings(max_examples=300)
@given(
    st.sampled_from(_EVENTS),
    st.dictionaries(field_names, json_values, max_size=6),
    st.dictionaries(field_names, json_values, max_size=6),
    st.booleans(),
)
def test_random_fields_under_a_valid_event(
    event: str, top: dict[str, Any], inner: dict[str, Any], after_start: bool
) -> None:
    message: dict[str, Any] = {**top, "event": event}
    if event not in top:
        message[event] = inner
    parser = started() if after_start else StreamParser()
    _check(parser, json.dumps(message))


@settings(max_examples=200)
@given(st.data())
def test_valid_messages_with_one_field_replaced(data: st.DataObject) -> None:
    """Take a valid message, replace any one nested field by any JSON value."""
    builder = data.draw(st.sampled_from([connected, start, media, dtmf, mark, stop]))
    message = builder()
    target = message
    while True:
        key = data.draw(st.sampled_from(sorted(target)))
        if isinstance(target[key], dict) and data.draw(st.booleans()):
            target = target[key]
            continue
        target[key] = data.draw(json_values)
        break
    parser = StreamParser() if builder in (connected, start) else started()
    _check(parser, json.dumps(message))
