"""Greeting, personas per number, end_call / transfer_call, keypad, transcripts, outbound calls.

End to end with the Live emulator, the simulated caller and a local stand-in for the Twilio
REST API (the real twilio client, its requests sent to the stand-in, never to Twilio).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from gateway.call_factory import live_options
from gateway.config import GREETING as GREETING_DEFAULT
from gateway.config import ConfigError, Settings, load_settings
from gateway.live.events import ToolCall, Usage
from gateway.live.session import LiveSession
from gateway.outbound import place_call, run_call_command
from gateway.personas import PersonaTable
from gateway.server import CALLS
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    TestBed,
    quick_emulator,
    test_bed,
    test_settings,
)
from gateway.testing.live_emulator import EmulatorConfig
from gateway.testing.twilio_rest import RestRequest, TwilioRestStandIn
from gateway.testing.twilio_sim import SimulatedCall
from gateway.tools import CallTools, TwilioRest

# Only the settings a test gives: the repo's config/gateway.toml stays out of it.
pytestmark = pytest.mark.usefixtures("no_config_file")
SPEED = 2.0
REPLY_S = 0.8
SALES = "+15550100011"
SUPPORT = "+15550100012"
GREETING = "Greet the caller and ask how you can help."
PERSONAS: dict[str, Any] = {
    "sales": {
        "numbers": [SALES],
        "system_instruction": "You sell things.",
        "voice": "Kore",
        "language": "en-US",
        "greeting": GREETING,
        "tools": ["end_call", "transfer_call"],
        "transfer_to": {"desk": "+15550100099", "pbx": "sip:desk@pbx.example.com"},
    },
    "support": {"numbers": [SUPPORT], "system_instruction": "You fix things."},
}


def emulator_config(**overrides: Any) -> EmulatorConfig:
    return quick_emulator(
        **{"speed": SPEED, "reply_s": REPLY_S, "handle_interval": 0.3, **overrides}
    )


@asynccontextmanager
async def bed_with_rest(
    config: EmulatorConfig, **settings: Any
) -> AsyncIterator[tuple[TestBed, TwilioRestStandIn, dict[str, SimulatedCall]]]:
    """A test bed whose REST requests go to a stand-in that, like Twilio, ends the media
    stream of a call it hangs up or redirects (for the calls in the returned dict)."""
    calls: dict[str, SimulatedCall] = {}
    ended: list[asyncio.Task[None]] = []

    async def twilio_ends_stream(request: RestRequest) -> None:
        call = calls.get(request.call_sid or "")
        if call is not None and (
            request.form.get("Status") == "completed" or "Twiml" in request.form
        ):
            ended.append(asyncio.create_task(call.hangup()))

    async with TwilioRestStandIn(AUTH_TOKEN) as rest:
        rest.on_request = twilio_ends_stream
        client = TwilioRest(AUTH_TOKEN, http_client=rest.http_client())
        try:
            async with test_bed(config, personas=PERSONAS, rest=client, **settings) as bed:
                yield bed, rest, calls
                await asyncio.gather(*ended)
        finally:
            await client.close()


async def keep_line_open(call: SimulatedCall, until: Any, limit_s: float = 15.0) -> None:
    """Stream silence, as Twilio does, until `until()` holds."""
    deadline = time.monotonic() + limit_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        assert not call.closed, "call closed"
        await call.silence(0.1)


def heard_in_full(call: SimulatedCall, n: int) -> bool:
    """Reply n reached the caller's ear whole (in one piece or, on a loaded machine, several)."""
    heard = sum(r.duration_s for r in heard_replies(call.record) if r.n == n)
    return heard > REPLY_S - 0.1


def reply_done(bed: TestBed, call: SimulatedCall, n: int) -> bool:
    """Reply n was heard in full, to its mark, and the model finished it (so input now
    starts a new turn, and the next reply is heard apart from this one)."""
    done = any(
        kind == "turn_complete" and detail.endswith(f"n={n}")
        for _, kind, detail in bed.emulator.record.events
    )
    played = len(call.record.marks_echoed) == len(call.record.marks_received) > 0
    return done and played and heard_in_full(call, n)


def last_mark_echoed(call: SimulatedCall) -> float:
    """When the caller's side confirmed the last reply had played (Twilio's mark echo)."""
    return call.record.marks_echoed[-1][0]


def camel(value: Any) -> Any:
    """Setup JSON with camelCase keys (the SDK mixes both spellings)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            head, *rest = str(key).split("_")
            out[head + "".join(p[:1].upper() + p[1:] for p in rest)] = camel(item)
        return out
    if isinstance(value, list):
        return [camel(v) for v in value]
    return value


def setup_of(bed: TestBed) -> dict[str, Any]:
    setup: dict[str, Any] = camel(bed.emulator.record.connections[0].setup)
    return setup


def only_session_history(bed: TestBed) -> list[tuple[str, str]]:
    (session,) = bed.emulator.record.sessions.values()
    return list(session.history_text)


# ----------------------------------------------------------------- personas, greeting


async def test_greeting_is_heard_before_the_caller_speaks_with_the_numbers_persona() -> None:
    async with test_bed(emulator_config(), personas=PERSONAS) as bed:
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        assert call.record.custom_parameters["persona"] == "sales"
        await keep_line_open(call, lambda: heard_in_full(call, 1))
        await call.hangup()

    # The caller only ever sent silence: the model spoke first, prompted by the greeting.
    (session,) = bed.emulator.record.sessions.values()
    assert session.state.utterances == 0
    assert session.history_text[0] == ("user", GREETING)
    assert [t.trigger for t in session.turns] == ["text"]
    setup = setup_of(bed)
    assert setup["systemInstruction"]["parts"][0]["text"] == "You sell things."
    speech = setup["generationConfig"]["speechConfig"]
    assert speech["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"] == "Kore"
    assert speech["languageCode"] == "en-US"
    (tool,) = setup["tools"]
    names = [f["name"] for f in tool["functionDeclarations"]]
    assert names == ["end_call", "transfer_call"]
    destination = tool["functionDeclarations"][1]["parameters"]["properties"]["destination"]
    assert sorted(destination["enum"]) == ["desk", "pbx"]


async def test_an_unknown_number_gets_the_default_persona() -> None:
    overrides = {"system_instruction": "You are the default bot.", "voice": "Puck"}
    async with test_bed(emulator_config(), personas=PERSONAS, **overrides) as bed:
        call = await bed.caller(speed=SPEED).place_call(to="+15559990000")
        assert call.record.custom_parameters["persona"] == "default"
        await call.speak_tone(400.0, 0.5)
        await keep_line_open(call, lambda: heard_in_full(call, 1))
        await call.hangup()

    setup = setup_of(bed)
    assert setup["systemInstruction"]["parts"][0]["text"] == "You are the default bot."
    assert (
        setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"]
        == "Puck"
    )
    assert not setup.get("tools")
    # No greeting: the first thing the model got was the caller's speech.
    assert only_session_history(bed)[0] == ("user", "caller utterance 1")


def test_personas_inherit_the_top_level_and_a_number_picks_its_persona() -> None:
    settings = test_settings("k", personas=PERSONAS, greeting="Hello first.", voice="Aoede")
    table = PersonaTable.from_settings(settings)
    assert table.for_number("+1 (555) 010-0012").name == "support"
    assert table.for_number("+15550000000") is table.default
    assert table.for_number(None) is table.default
    support = table.by_name["support"]
    assert support.voice == "Aoede" and support.greeting == "Hello first."  # inherited
    assert support.tools == () and support.system_instruction == "You fix things."
    assert table.get("nonsense") is table.default


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[personas.a]\ntools = ["end_cal"]\n', "invalid setting personas.a.tools[0]"),
        ('[personas.a]\nvoise = "Kore"\n', "invalid setting personas.a.voise"),
        ('[personas.a]\nnumbers = ["5550100"]\n', "invalid setting personas.a.numbers"),
        ('[personas.a]\ntools = ["transfer_call"]\n', "missing setting personas.a.transfer_to"),
        ('[personas.a]\nlanguage = "english please"\n', "invalid setting personas.a.language"),
        (
            '[personas.a]\nnumbers = ["+15550100011"]\n'
            '[personas.b]\nnumbers = ["+1 555 010 0011"]\n',
            "invalid setting personas.b.numbers: +15550100011 is already answered by personas.a",
        ),
    ],
)
def test_invalid_persona_configuration_fails_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, message: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    with pytest.raises(ConfigError) as caught:  # what `python -m gateway` does at start
        PersonaTable.from_settings(
            load_settings(public_url=PUBLIC_URL, twilio_auth_token="t", gemini_api_key="k")
        )
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_the_shipped_configuration_has_two_numbered_personas_and_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("GATEWAY_CONFIG", str(root / "config" / "gateway.toml"))
    settings = load_settings(public_url=PUBLIC_URL, twilio_auth_token="t", gemini_api_key="k")
    table = PersonaTable.from_settings(settings)
    numbered = [p for p in table.by_name.values() if p.numbers]
    assert len(numbered) >= 2
    for persona in numbered:
        assert table.for_number(persona.numbers[0]) is persona
    # A fresh install greets like a phone system: the file and the code agree on it.
    assert table.default.greeting == GREETING_DEFAULT == Settings.model_fields["greeting"].default
    assert table.by_name["soporte"].greeting != GREETING_DEFAULT  # its own, in Spanish


async def test_the_default_persona_greets_and_a_persona_can_turn_it_off() -> None:
    personas = {"quiet": {"numbers": [SUPPORT], "system_instruction": "Wait.", "greeting": ""}}
    async with test_bed(emulator_config(), personas=personas, greeting=GREETING_DEFAULT) as bed:
        greeted = await bed.caller(speed=SPEED).place_call(to="+15559990000")
        await keep_line_open(greeted, lambda: heard_in_full(greeted, 1))
        await greeted.hangup()
        quiet = await bed.caller(speed=SPEED).place_call(to=SUPPORT)
        await quiet.silence(1.0)
        await quiet.speak_tone(400.0, 0.5)
        await keep_line_open(quiet, lambda: heard_in_full(quiet, 1))
        await quiet.hangup()

    first, second = bed.emulator.record.sessions.values()
    # The caller of the default persona only sent silence: the model spoke first.
    assert first.history_text[0] == ("user", GREETING_DEFAULT)
    assert [t.trigger for t in first.turns] == ["text"] and first.state.utterances == 0
    # The persona without a greeting waited for the caller's words.
    assert second.history_text[0] == ("user", "caller utterance 1")
    assert [t.trigger for t in second.turns] == ["audio"]


# ------------------------------------------------------------------- tools and keypad


async def test_end_call_hangs_up_only_after_the_goodbye_was_heard() -> None:
    config = emulator_config(tool_call_on_text={"key 9": ("end_call", {"reason": "done"})})
    async with bed_with_rest(config) as (bed, rest, calls):
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        calls[call.record.call_sid] = call
        await keep_line_open(call, lambda: reply_done(bed, call, 1))  # the greeting
        await call.send_dtmf("9")  # "the caller pressed the key 9": the model says goodbye
        await keep_line_open(call, lambda: bool(rest.record.updates()) or call.closed)
        await call.wait_closed(10)

    (update,) = rest.record.updates()
    assert update.form == {"Status": "completed"}
    assert update.call_sid == call.record.call_sid
    assert update.account_sid == call.record.account_sid == update.user
    # The goodbye (reply 2) was heard in full, its mark echoed, and only then the hang-up.
    assert heard_in_full(call, 2), (heard_replies(call.record), call.record.events[-30:])
    assert [name for _, name in call.record.marks_echoed] == ["reply-1", "reply-2"]
    mark_at = last_mark_echoed(call)
    assert update.at >= mark_at
    tool_calls = [t for t, kind, _ in bed.emulator.record.events if kind == "tool_call"]
    assert tool_calls and tool_calls[0] < mark_at  # the model asked while still speaking
    responses = [d for _, kind, d in bed.emulator.record.events if kind == "tool_response"]
    assert len(responses) == 1 and "end_call" in responses[0]
    assert call.record.closed_by == "caller"  # Twilio (the stand-in) ended the stream


async def test_transfer_call_redirects_to_the_configured_sip_address() -> None:
    config = emulator_config(tool_call_on_text={"key 0": ("transfer_call", {"destination": "pbx"})})
    async with bed_with_rest(config) as (bed, rest, calls):
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        calls[call.record.call_sid] = call
        await keep_line_open(call, lambda: reply_done(bed, call, 1))
        await call.send_dtmf("0")
        await keep_line_open(call, lambda: bool(rest.record.updates()) or call.closed)
        await call.wait_closed(10)

    (update,) = rest.record.updates()
    sid, account = call.record.call_sid, call.record.account_sid
    assert update.path == f"/2010-04-01/Accounts/{account}/Calls/{sid}.json"
    assert update.form == {
        "Twiml": '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response><Dial><Sip>sip:desk@pbx.example.com</Sip></Dial></Response>"
    }
    assert heard_in_full(call, 2), (heard_replies(call.record), call.record.events[-30:])
    assert update.at >= last_mark_echoed(call)


async def test_a_keypad_press_reaches_the_model_as_text() -> None:
    async with test_bed(emulator_config(), personas=PERSONAS) as bed:
        call = await bed.caller(speed=SPEED).place_call(to=SUPPORT)
        await call.silence(0.2)
        await call.send_dtmf("5")
        await keep_line_open(call, lambda: heard_in_full(call, 1))  # the model answered it
        await call.hangup()

    assert only_session_history(bed)[0] == ("user", "The caller pressed the key 5.")
    (session,) = bed.emulator.record.sessions.values()
    assert [t.trigger for t in session.turns] == ["text"]


async def test_end_call_hangs_up_through_the_stream_when_the_rest_api_fails() -> None:
    config = emulator_config(tool_call_on_text={"key 9": ("end_call", {})})
    async with bed_with_rest(config) as (bed, rest, _calls):
        rest.fail_status = 500
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        await keep_line_open(call, lambda: reply_done(bed, call, 1))
        await call.send_dtmf("9")
        await keep_line_open(call, lambda: call.closed)

    assert len(rest.record.updates()) == 1
    assert heard_in_full(call, 2), (heard_replies(call.record), call.record.events[-30:])
    assert call.record.closed_by == "gateway"  # no verb after <Connect>: Twilio hangs up


def test_tool_requests_outside_the_configuration_are_declined() -> None:
    rest = TwilioRest(AUTH_TOKEN)
    tools = CallTools(
        rest,
        account_sid="AC1",
        call_sid="CA1",
        tools=("transfer_call",),
        transfer_to={"desk": "+15550100099", "pbx": "sip:desk@pbx.example.com"},
    )
    assert tools.prepare(ToolCall("1", "end_call", {})).response["error"]
    unknown = tools.prepare(ToolCall("2", "transfer_call", {"destination": "moon"}))
    assert unknown.action is None and "desk, pbx" in str(unknown.response["error"])
    first = tools.prepare(ToolCall("3", "transfer_call", {"destination": "desk"}))
    assert first.action is not None and first.ends_call
    again = tools.prepare(ToolCall("4", "transfer_call", {"destination": "pbx"}))
    assert again.action is None  # the call is already being handed over


# ---------------------------------------------------------------------- transcripts


async def test_transcript_holds_every_turn_a_reset_and_how_the_call_ended(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "transcripts"
    async with test_bed(emulator_config(), personas=PERSONAS, transcript_dir=directory) as bed:
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        await keep_line_open(call, lambda: reply_done(bed, call, 1))  # greeting
        await call.speak_tone(400.0, 0.5)
        await keep_line_open(call, lambda: reply_done(bed, call, 2))
        await call.silence(0.2)  # the handle after the reply reaches the gateway
        await bed.emulator.cut_all(abrupt=True)
        await keep_line_open(call, lambda: len(bed.emulator.open_connections()) == 1)
        await call.silence(0.3)
        await call.speak_tone(450.0, 0.5)
        await keep_line_open(call, lambda: reply_done(bed, call, 3))
        await call.hangup()
        await asyncio.sleep(0.2)
        status = {
            "CallSid": call.record.call_sid,
            "AccountSid": call.record.account_sid,
            "CallStatus": "completed",
            "CallDuration": "7",
            "Direction": "inbound",
        }
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            PUBLIC_URL + "/twilio/status", status
        )
        async with bed.http.post(
            bed.gateway_url + "/twilio/status",
            data=status,
            headers={"X-Twilio-Signature": signature},
        ) as resp:
            assert resp.status == 204

    path = directory / f"{call.record.call_sid}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("ts" in line and "type" in line for line in lines)
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "start" and lines[0]["persona"] == "sales"
    assert kinds[-2:] == ["end", "status"]
    assert lines[-2]["outcome"] == "completed"
    assert lines[-1]["status"] == "completed" and lines[-1]["duration_s"] == "7"
    turns = [(line["speaker"], line["text"]) for line in lines if line["type"] == "turn"]
    assert turns[:3] == [
        ("model", "reply 1"),
        ("caller", "caller utterance 1"),
        ("model", "reply 2"),
    ]
    assert turns[3:] == [("caller", "caller utterance 2"), ("model", "reply 3")]
    (reset,) = [line for line in lines if line["type"] == "reset"]
    assert reset["cause"] == "abrupt" and reset["fresh"] is False
    # The reset sits between the turns before it and after it.
    assert kinds[kinds.index("reset") - 1 :][:4] == ["turn", "reset", "turn", "turn"]
    times = [line["t"] for line in lines if "t" in line]
    assert times == sorted(times)


async def test_transcripts_are_off_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with test_bed(emulator_config(), personas=PERSONAS) as bed:
        assert bed.settings.transcript_dir is None
        call = await bed.caller(speed=SPEED).place_call(to=SUPPORT)
        await call.speak_tone(400.0, 0.5)
        await keep_line_open(call, lambda: heard_in_full(call, 1))
        await call.hangup()
    assert not await asyncio.to_thread(lambda: any(tmp_path.rglob("*.jsonl")))


# --------------------------------------------------------------------- outbound calls


async def test_outbound_call_asks_twilio_to_connect_the_callee_to_the_gateway() -> None:
    settings = test_settings("k", personas=PERSONAS, twilio_account_sid="AC" + "1" * 32)
    async with TwilioRestStandIn(AUTH_TOKEN) as rest:
        client = TwilioRest(AUTH_TOKEN, http_client=rest.http_client())
        try:
            personas = PersonaTable.from_settings(settings)
            placed = await place_call(
                settings, personas, "+1 555 765 4321", persona="sales", rest=client
            )
        finally:
            await client.close()

    (create,) = rest.record.creates()
    assert create.path == f"/2010-04-01/Accounts/{'AC' + '1' * 32}/Calls.json"
    assert create.user == "AC" + "1" * 32
    assert create.form == {
        "To": "+15557654321",
        "From": SALES,
        "Url": PUBLIC_URL + "/twilio/voice?persona=sales",
        "Method": "POST",
        "StatusCallback": PUBLIC_URL + "/twilio/status",
        "StatusCallbackMethod": "POST",
    }
    assert placed.sid.startswith("CA") and placed.persona == "sales"


async def test_the_outbound_calls_webhook_answers_with_its_persona() -> None:
    """What Twilio asks when the callee answers: the signed Url with ?persona=."""
    async with test_bed(emulator_config(), personas=PERSONAS) as bed:
        params = {
            "CallSid": "CA" + "2" * 32,
            "AccountSid": "AC" + "1" * 32,
            "From": SALES,
            "To": "+15557654321",
            "Direction": "outbound-api",
            "CallStatus": "in-progress",
        }
        for query, persona in (("?persona=support", "support"), ("", "sales")):
            url = PUBLIC_URL + "/twilio/voice" + query
            signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
            async with bed.http.post(
                bed.gateway_url + "/twilio/voice" + query,
                data=params,
                headers={"X-Twilio-Signature": signature},
            ) as resp:
                assert resp.status == 200
                body = await resp.text()
            assert f'<Parameter name="persona" value="{persona}" />' in body, body


async def test_the_call_command_names_a_missing_setting(capsys: pytest.CaptureFixture[str]) -> None:
    settings = test_settings("k", personas=PERSONAS)
    personas = PersonaTable.from_settings(settings)
    assert await run_call_command(settings, personas, "+15557654321", "sales", None) == 2
    assert "missing setting TWILIO_ACCOUNT_SID" in capsys.readouterr().err
    settings = test_settings("k", twilio_account_sid="AC" + "1" * 32)
    personas = PersonaTable.from_settings(settings)
    assert await run_call_command(settings, personas, "+15557654321", None, None) == 2
    assert "missing setting TWILIO_FROM_NUMBER" in capsys.readouterr().err
    assert await run_call_command(settings, personas, "+15557654321", "nobody", "+15550100011") == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


# ------------------------------------------------------------------------ usage and cost


async def test_the_live_session_reports_the_services_token_counts_by_modality() -> None:
    async with test_bed(emulator_config()) as bed:
        calls = bed.app[CALLS]
        live = LiveSession(calls.client, live_options(bed.settings, calls.personas.default))
        runner = asyncio.create_task(live.run())
        live.send_text("Hello.")
        seen: list[object] = []
        async with asyncio.timeout(15):
            async for event in live.events():
                seen.append(event)
                if isinstance(event, Usage):
                    break
        live.close()
        await runner

    usage = seen[-1]
    assert isinstance(usage, Usage)
    # The emulator bills the turn's text (the instruction and its own reply, 4 tokens each)
    # and 0.8 s of reply at 25 tokens a second; no caller audio was sent.
    assert usage.prompt_by_modality == (("audio", 0), ("text", 8))
    assert usage.response_by_modality == (("audio", 20),)
    assert (usage.prompt_tokens, usage.response_tokens, usage.total_tokens) == (8, 20, 28)
