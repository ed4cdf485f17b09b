"""Model profiles: the setup is built from the model's profile, text goes by the channel it
allows, a setting it does not take stops the start; the emulator plays what each model is
reported to refuse (real SDK over TLS)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import errors, types
from test_ops import base_env

from gateway.config import ConfigError, Settings, load_settings
from gateway.live.events import Usage
from gateway.live.profiles import (
    PROFILES,
    ModelSettings,
    problems,
    profile_for,
)
from gateway.personas import PersonaTable
from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    environment,
    quick_emulator,
    test_bed,
    test_settings,
)
from gateway.testing.live_emulator import MODELS, EmulatorConfig, LiveEmulator
from gateway.testing.model_behaviour import BEHAVIOURS, ModelBehaviour
from gateway.testing.tls import make_tls
from gateway.usage import CallUsage, prices_for

M38, ET, M31, M25 = (
    "gemini-3.8-live",
    "gemini-3.8-live-extended-thinking",
    "gemini-3.1-flash-live-preview",
    "gemini-2.5-flash-native-audio-preview-12-2025",
)

# ------------------------------------------------------------------------- the table


def test_every_gemini_api_profile_names_a_model_the_service_lists() -> None:
    for profile in PROFILES:
        assert profile.sources, profile.label
        if profile.backend == "gemini":
            assert profile.model in MODELS, profile.label


def test_a_model_gets_its_row_its_familys_or_the_cautious_fallback() -> None:
    assert profile_for(f"models/{M31}").text == "realtime_text"
    latest = profile_for("gemini-2.5-flash-native-audio-latest")
    assert latest.model == "gemini-2.5-flash-native-audio-latest" and latest.thinking == "budget"
    unknown = profile_for("gemini-9.9-live")
    assert (unknown.text, unknown.history, unknown.thinking) == (
        "realtime_text",
        "initial_history",
        "none",
    )
    assert profile_for("gemini-3.8-live", "vertex").usage == "vertex"


@pytest.mark.parametrize(
    ("model", "level", "problem"),
    [
        (M38, "low", "gemini-3.8-live takes no thinking level"),
        (ET, "minimal", "gemini-3.8-live-extended-thinking takes one of low, medium, high"),
        (ET, "high", None),
        (M31, "minimal", None),
        (M25, "low", "gemini-2.5-flash-native-audio-preview-12-2025 takes no thinking level"),
    ],
)
def test_a_thinking_level_is_checked_against_the_profile(
    model: str, level: str, problem: str | None
) -> None:
    found = problems(profile_for(model), ModelSettings(thinking_level=level))
    assert found == ([("thinking_level", problem)] if problem else [])


def test_a_setting_the_personas_model_does_not_take_stops_the_start() -> None:
    settings = test_settings(
        "k", gemini_model=M31, thinking_level="minimal", personas={"sales": {"gemini_model": M38}}
    )
    with pytest.raises(ConfigError) as caught:
        PersonaTable.from_settings(settings)
    assert str(caught.value) == (
        "invalid setting personas.sales.thinking_level: gemini-3.8-live takes no thinking level"
    )


def test_a_thinking_level_on_3_8_stops_the_process_with_one_line(tmp_path: Path) -> None:
    env = base_env(
        PUBLIC_URL=PUBLIC_URL,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        GEMINI_API_KEY="k",
        THINKING_LEVEL="low",
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "gateway: invalid setting THINKING_LEVEL: gemini-3.8-live takes no thinking level"
    ]


# ------------------------------------------------------- the setup each model gets


@pytest.mark.parametrize("model", [M38, ET, M31, M25])
async def test_the_setup_carries_what_the_profile_takes_and_text_its_channel(model: str) -> None:
    level = {ET: "high", M31: "low"}.get(model)
    async with test_bed(
        quick_emulator(),
        gemini_model=model,
        thinking_level=level,
        temperature=0.6,
        transcription_languages=("en-US", "es-US"),
        tools=["end_call"],
        greeting="Greet the caller.",
    ) as bed:
        call = await bed.caller(speed=2.0).place_call()
        await await_reply(call, 1, min_s=0.7, limit_s=15.0)  # the greeting
        await call.hangup()
    [conn] = bed.emulator.record.connections
    setup = conn.setup
    generation = setup.get("generationConfig", {})
    thinking = generation.get("thinkingConfig")
    # (the SDK keeps nested keys in snake_case, which the service accepts too)
    assert (list(thinking.values()) if thinking else None) == ([level.upper()] if level else None)
    assert generation.get("temperature") == 0.6
    hints = {"language_codes": ["en-US", "es-US"]}  # nested keys as the SDK sends them
    assert setup["inputAudioTranscription"] == setup["outputAudioTranscription"] == hints
    assert "enableAffectiveDialog" not in generation and "proactivity" not in setup
    [declaration] = setup["tools"][0]["functionDeclarations"]
    assert declaration.get("behavior") == ("NON_BLOCKING" if model == ET else None)
    history = setup.get("historyConfig")
    assert (list(history.values()) if history else None) == ([True] if model == M31 else None)
    [session] = bed.emulator.record.sessions.values()
    assert session.history_text[0] == ("user", "Greet the caller.")
    assert [t.trigger for t in session.turns] == ["text"]


# ----------------------------------------------------- what the emulator refuses


@asynccontextmanager
async def live(
    config: EmulatorConfig | None = None,
) -> AsyncIterator[tuple[LiveEmulator, genai.Client]]:
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        async with LiveEmulator(config or EmulatorConfig(), tls) as emu:
            options = types.HttpOptions(base_url=emu.base_url)
            with environment(SSL_CERT_FILE=tls.ca_pem_path):  # the SDK reads it here
                client = genai.Client(api_key=emu.config.api_key, http_options=options)
            try:
                yield emu, client
            finally:
                await client.aio.aclose()


def function(behavior: types.Behavior | None = None) -> types.Tool:
    return types.Tool(
        function_declarations=[types.FunctionDeclaration(name="end_call", behavior=behavior)]
    )


@pytest.mark.parametrize(
    ("model", "config"),
    [
        (M38, {"thinking_config": types.ThinkingConfig(thinking_budget=0)}),
        (M38, {"enable_affective_dialog": True}),
        (M38, {"proactivity": types.ProactivityConfig(proactive_audio=False)}),
        (ET, {"thinking_config": types.ThinkingConfig(thinking_level=types.ThinkingLevel.MINIMAL)}),
        (ET, {"tools": [function(types.Behavior.BLOCKING)]}),
        (M31, {"enable_affective_dialog": True}),
        (M31, {"proactivity": types.ProactivityConfig(proactive_audio=True)}),
        (M31, {"tools": [function(types.Behavior.NON_BLOCKING)]}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
async def test_a_setup_field_the_model_refuses_closes_1007(
    model: str, config: dict[str, Any]
) -> None:
    async with live() as (_emu, client):
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(
                model=model, config=types.LiveConnectConfig(**config)
            ):
                pass
        assert caught.value.code == 1007
        accepted = {ET: {"thinking_config": types.ThinkingConfig(thinking_level="HIGH")}}
        async with client.aio.live.connect(
            model=model, config=types.LiveConnectConfig(**accepted.get(model, {}))
        ):
            pass


async def test_3_1_takes_client_content_only_as_initial_history() -> None:
    async with live() as (emu, client):
        turn = types.Content(role="user", parts=[types.Part(text="hello")])
        history = types.LiveConnectConfig(
            history_config=types.HistoryConfig(initial_history_in_client_content=True)
        )
        async with client.aio.live.connect(model=M31, config=history) as session:
            await session.send_client_content(turns=[turn], turn_complete=True)  # no reply
            await session.send_realtime_input(text="and now?")  # a reply
            async for message in session.receive():
                if message.server_content and message.server_content.turn_complete:
                    break
        assert [t.trigger for t in list(emu.record.sessions.values())[-1].turns] == ["text"]
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=M31) as session:
                await session.send_client_content(turns=[turn], turn_complete=True)
                async for _ in session.receive():
                    pass
        assert caught.value.code == 1007


async def test_3_x_packs_audio_and_transcript_in_one_event() -> None:
    async with live(quick_emulator()) as (_emu, client):
        config = types.LiveConnectConfig(
            output_audio_transcription=types.AudioTranscriptionConfig()
        )
        async with client.aio.live.connect(model=M38, config=config) as session:
            await session.send_realtime_input(text="hello")
            first = None
            async for message in session.receive():
                content = message.server_content
                if content and content.model_turn and first is None:
                    first = content
                if content and content.turn_complete:
                    break
        assert first is not None and first.model_turn is not None
        assert len(first.model_turn.parts or []) == 2
        assert first.output_transcription is not None and first.output_transcription.text


async def test_2_5_streams_the_callers_transcript_while_they_speak() -> None:
    speech = b"\x00\x10\x00\xf0" * 8000  # 1 s of a square wave at -18 dBFS: speech
    async with live(quick_emulator()) as (_emu, client):
        config = types.LiveConnectConfig(input_audio_transcription=types.AudioTranscriptionConfig())
        async with client.aio.live.connect(model=M25, config=config) as session:
            blob = types.Blob(data=speech, mime_type="audio/pcm;rate=16000")
            await session.send_realtime_input(audio=blob)
            pieces: list[str] = []
            async with asyncio.timeout(5):
                async for message in session.receive():  # still speaking: no turn ended
                    content = message.server_content
                    if content and content.input_transcription:
                        pieces.append(content.input_transcription.text or "")
                        break
            silence = types.Blob(data=bytes(32000), mime_type="audio/pcm;rate=16000")
            await session.send_realtime_input(audio=silence)
            async with asyncio.timeout(5):
                async for message in session.receive():
                    content = message.server_content
                    if content and content.input_transcription:
                        pieces.append(content.input_transcription.text or "")
                    if content and content.turn_complete:
                        break
        assert len(pieces) == 2 and "".join(pieces) == "caller utterance 1", pieces


async def test_a_3_8_connection_is_closed_at_its_cap_with_1011_deadline_expired() -> None:
    config = quick_emulator()
    config.behaviours = {**BEHAVIOURS, M38: ModelBehaviour(session_cap_s=0.5)}
    async with live(config) as (_emu, client):
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=M38) as session:
                async with asyncio.timeout(5):
                    while True:
                        async for _ in session.receive():
                            pass
        assert caught.value.code == 1011
        assert "Deadline expired before operation could complete." in str(caught.value)


# -------------------------------------------------------------------- usage and prices


def test_a_3_8_report_counts_its_thoughts_once_as_output_text() -> None:
    """The 3.8 frame of [D188765]: total 564 = prompt 522 + response 42, thoughts 136
    outside it; 25 prompt tokens not in the details count as text."""
    usage = CallUsage(prices=prices_for(M38, {}))
    kinds = usage.add(
        Usage(
            prompt_tokens=522,
            response_tokens=42,
            total_tokens=564,
            prompt_by_modality=(("text", 332), ("audio", 165)),
            response_by_modality=(("audio", 42),),
            thoughts_tokens=136,
        )
    )
    assert kinds == {
        "prompt_text": 357,
        "prompt_audio": 165,
        "response_audio": 42,
        "response_text": 136,
    }
    assert usage.total_tokens == 700
    # a total that includes the thoughts (the SDK's reading) is not counted twice
    usage.add(Usage(prompt_tokens=10, response_tokens=5, total_tokens=20, thoughts_tokens=5))
    assert usage.total_tokens == 720
    expected = (357 + 10) * 0.75 + 165 * 3.0 + 42 * 12.0 + (136 + 5 + 5) * 4.5
    assert usage.cost_usd() == pytest.approx(expected / 1e6)


def test_each_model_has_its_price_sheet_and_the_operators_prices_win() -> None:
    assert prices_for(M38, {})["response_audio"] == 12.0
    assert prices_for(f"models/{ET}", {"response_audio": 10.0})["response_audio"] == 10.0
    assert prices_for(M25, {}) == {}  # not found publicly: the operator's only
    assert prices_for(M25, {"prompt_audio": 2.0}) == {"prompt_audio": 2.0}


# ------------------------------------------------------ voice activity, transcription


def test_a_transcription_the_model_cannot_turn_off_stops_the_start() -> None:
    settings = test_settings(
        "k",
        gemini_model=M31,
        input_transcription=False,
        personas={"sales": {"gemini_model": M25}},  # 2.5 may go without
    )
    with pytest.raises(ConfigError) as caught:
        PersonaTable.from_settings(settings)
    assert str(caught.value) == (
        "invalid setting INPUT_TRANSCRIPTION: gemini-3.1-flash-live-preview transcribes the "
        "caller always"
    )
    with pytest.raises(ConfigError) as caught:
        PersonaTable.from_settings(test_settings("k", output_transcription=False))
    assert "gemini-3.8-live transcribes itself always" in str(caught.value)


def test_transcription_languages_are_checked_codes_and_need_a_transcription() -> None:
    quiet = {"input_transcription": False, "output_transcription": False}
    persona = {"gemini_model": M25, "transcription_languages": ["en-US"], **quiet}
    with pytest.raises(ConfigError) as caught:
        PersonaTable.from_settings(test_settings("k", personas={"sales": persona}))
    assert str(caught.value) == (
        "invalid setting personas.sales.transcription_languages: both transcriptions are off"
    )
    base = test_settings("k").model_dump()
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings, **{**base, "transcription_languages": ["en_US"]})
    assert str(caught.value) == (
        "invalid setting TRANSCRIPTION_LANGUAGES: not a BCP-47 language code such as en-US: 'en_US'"
    )


async def test_a_persona_without_barge_in_is_heard_out_and_its_vad_is_sent() -> None:
    async with test_bed(
        quick_emulator(reply_s=1.6),
        gemini_model=M25,
        barge_in=False,
        vad_start_sensitivity="low",
        vad_end_sensitivity="high",
        vad_prefix_padding_ms=40,
        vad_silence_ms=300,
        input_transcription=False,
    ) as bed:
        call = await bed.caller(speed=2.0).place_call()
        await call.speak_tone(320.0, 0.6)
        await await_reply(call, 1, min_s=0.2, limit_s=15.0)
        await call.speak_tone(360.0, 0.6)  # over the reply: it goes on
        await await_reply(call, 1, min_s=1.5, limit_s=15.0)
        await call.hangup()
    [conn] = bed.emulator.record.connections
    realtime = conn.setup["realtimeInputConfig"]
    assert list(realtime.values())[-1] == "NO_INTERRUPTION"
    [detection] = [v for v in realtime.values() if isinstance(v, dict)]
    assert sorted(map(str, detection.values())) == sorted(
        ["START_SENSITIVITY_LOW", "END_SENSITIVITY_HIGH", "40", "300"]
    )
    assert "inputAudioTranscription" not in conn.setup
    assert not [e for e in bed.emulator.record.events if e[1] == "interrupted"]


# ----------------------------------------------------------- 3.8's reported session cap


@pytest.mark.parametrize("refused", [False, True], ids=["resumed", "resume-refused"])
async def test_a_call_goes_on_across_3_8s_session_cap(refused: bool) -> None:
    """[D186392]: closed with 1011 "Deadline expired" (no goAway), and the resume after it
    accepted one day, refused with 1007 the next: the call goes on either way, on a briefed
    fresh session when refused."""
    config = quick_emulator(speed=2.0, handle_interval=0.4)
    invalid = (1007, "Request contains an invalid argument.")
    cap = replace(BEHAVIOURS[M38], session_cap_s=3.0, resume_after_cap=invalid if refused else None)
    config.behaviours = {**BEHAVIOURS, M38: cap}
    async with test_bed(config) as bed:
        call = await bed.caller(speed=2.0).place_call()

        def answered() -> int:  # replies heard in full (a fresh session numbers anew)
            return len({r.n for r in heard_replies(call.record) if r.sound_s > 0.7})

        for n in range(1, 6):
            await call.speak_tone(300.0 + 20 * n, 0.6)
            for _ in range(200):
                if answered() >= n:
                    break
                await call.silence(0.1)
            assert answered() >= n, heard_replies(call.record)
            await call.silence(0.3)
        await call.hangup()
    record = bed.emulator.record
    assert [c.close_code for c in record.connections if c.close_kind == "session_cap"] == [1011]
    sessions = list(record.sessions.values())
    assert len(sessions) == (2 if refused else 1)
    if refused:
        briefing = " ".join(text for _, text in sessions[1].history_text)
        assert "reply 1" in briefing, sessions[1].history_text


async def test_a_model_the_table_does_not_know_gets_the_cautious_setup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = quick_emulator()
    config.models = {**config.models, "gemini-9.9-live": MODELS[M38]}
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        async with test_bed(config, gemini_model="gemini-9.9-live", greeting="Hello.") as bed:
            call = await bed.caller(speed=2.0).place_call()
            await await_reply(call, 1, min_s=0.7, limit_s=15.0)
            await call.hangup()
    assert any(
        "GEMINI_MODEL gemini-9.9-live: not in the model table" in r.getMessage()
        for r in caplog.records
    )
    [conn] = bed.emulator.record.connections
    assert "historyConfig" in conn.setup  # initial history, then realtime text
    [session] = bed.emulator.record.sessions.values()
    assert session.history_text[0] == ("user", "Hello.")
