"""The emulator's bill (gateway.testing.billing) and the gateway's own accounting of it."""

from __future__ import annotations

from typing import Any

import pytest
from feature_helpers import keep_line_open, metric

from gateway.server import STATE
from gateway.testing import billing
from gateway.testing.billing import Bill, BillingProfile, Context, Turn, bill_turn
from gateway.testing.harness import quick_emulator, test_bed

SECOND = billing.BYTES_PER_SECOND
SETUP = {
    "model": "models/gemini-3.8-live",
    "systemInstruction": {"parts": [{"text": "x" * 400}]},  # 100 tokens
}


def turn(
    profile: BillingProfile, context: Context, seconds: float, reply_s: float = 1.0
) -> tuple[Context, dict[str, Any]]:
    """One model turn after `seconds` more of caller audio and no text."""
    audio = context.audio_bytes + int(seconds * SECOND)
    return bill_turn(
        profile,
        context,
        audio_bytes=audio,
        history=[],
        history_len=context.text_entries,
        reply_s=reply_s,
    )


def details(usage: dict[str, Any], key: str) -> dict[str, int]:
    return {d["modality"]: d["tokenCount"] for d in usage[key]}


def test_each_turn_bills_the_whole_context_again() -> None:
    profile = BillingProfile(audio_in_per_s=25.0, audio_out_per_s=25.0)
    context = billing.start(SETUP)
    assert context.system == 100
    context, first = turn(profile, context, 10.0)  # 250 tokens heard, a 25-token reply
    assert details(first, "promptTokensDetails") == {"AUDIO": 250, "TEXT": 100}
    assert first["responseTokenCount"] == 25
    context, second = turn(profile, context, 4.0)
    # The second snapshot re-reads the first turn's audio and reply [D140340][D173248].
    assert details(second, "promptTokensDetails") == {"AUDIO": 250 + 25 + 100, "TEXT": 100}
    assert second["totalTokenCount"] == 375 + 100 + 25
    assert context.tokens == 100 + 275 + 125


def test_the_other_reading_bills_only_each_turns_new_input() -> None:
    profile = BillingProfile(audio_in_per_s=25.0, rebill_context=False)
    context, first = turn(profile, billing.start(SETUP), 10.0)
    _, second = turn(profile, context, 4.0)
    assert details(first, "promptTokensDetails") == {"AUDIO": 250, "TEXT": 100}
    assert details(second, "promptTokensDetails") == {"AUDIO": 100, "TEXT": 0}


def test_audio_is_billed_by_its_duration_and_rounding_never_drifts() -> None:
    profile = BillingProfile(audio_in_per_s=1667 / 60)
    # 600 s in 70 turns of 8.57 s (a fraction of a token each), billed turn by turn, is
    # what 600 s is billed at once.
    context = billing.start({"model": "m"})
    for _ in range(70):
        context, _ = turn(profile, context, 600 / 70, reply_s=0.0)
    prompt_audio = sum(t.audio_in for t in context.turns)
    assert prompt_audio == profile.audio_in_tokens(600 * SECOND) == round(600 * 1667 / 60)
    for rate in (25.0, 32.0):
        assert BillingProfile(audio_in_per_s=rate).audio_in_tokens(60 * SECOND) == 60 * rate


def test_compression_drops_whole_turns_from_the_start_and_keeps_the_instruction() -> None:
    profile = BillingProfile(audio_in_per_s=25.0, audio_out_per_s=25.0)
    setup = {**SETUP, "contextWindowCompression": {"triggerTokens": 1000, "slidingWindow": {}}}
    context = billing.start(setup)
    assert context.compression == (1000, 500)  # the target defaults to half the trigger
    prompts = []
    for _ in range(12):
        context, usage = turn(profile, context, 4.0)  # 100 in + 25 out a turn
        prompts.append(usage["promptTokenCount"])
    assert max(prompts) <= 1000 + 100  # never past the trigger plus the turn being read
    assert context.system == 100 and context.trimmed > 0
    assert all(t == Turn(100, 0, 25) for t in context.turns)
    # Without compression the snapshot keeps growing.
    plain = billing.start(SETUP)
    for _ in range(12):
        plain, grown = turn(profile, plain, 4.0)
    assert grown["promptTokenCount"] == 100 + 11 * 125 + 100


def test_the_default_target_is_half_a_default_trigger() -> None:
    context = billing.start({"contextWindowCompression": {}})
    trigger = int(0.8 * billing.CONTEXT_WINDOW)
    assert context.compression == (trigger, trigger // 2)


def test_text_turns_are_read_as_text_once_added() -> None:
    profile = BillingProfile()
    context, usage = bill_turn(
        profile,
        billing.start(SETUP),
        audio_bytes=0,
        history=["Hello there."],
        history_len=1,
        reply_s=0.8,
    )
    assert details(usage, "promptTokensDetails") == {"AUDIO": 0, "TEXT": 100 + 3}
    assert context.text_entries == 1 and context.turns == (Turn(0, 3, 20),)


def test_profiles_by_model_and_the_bill_in_either_backends_shape() -> None:
    assert billing.profile_for("models/gemini-3.8-live").prices["response_audio"] == 12.0
    vertex = "projects/p/locations/us-central1/publishers/google/models/"
    assert billing.profile_for(vertex + "gemini-live-2.5-flash-native-audio").audio_in_per_s == 32
    assert billing.profile_for("models/unknown") is billing.DEFAULT_PROFILE
    bill = Bill(billing.DEFAULT_PROFILE)
    _, usage = turn(billing.DEFAULT_PROFILE, billing.start(SETUP), 60.0)
    bill.add(usage)
    renamed = {k.replace("response", "candidates"): v for k, v in usage.items()}
    bill.add(renamed)  # Vertex names the output tokens `candidates*`
    assert bill.reports == 2
    assert bill.tokens == {
        "prompt_audio": 2 * 1667,
        "prompt_text": 2 * 100,
        "response_audio": 2 * 25,
    }
    assert bill.cost_usd == pytest.approx((2 * 1667 * 3 + 200 * 0.75 + 50 * 12) / 1e6)


# ------------------------------------------------------------------ the gateway agrees


async def test_the_gateways_usage_and_metrics_agree_with_the_emulators_bill_across_a_reset() -> (
    None
):
    profile = billing.DEFAULT_PROFILE
    config = quick_emulator(reply_s=0.8)
    async with test_bed(config, token_prices=dict(profile.prices)) as bed:
        call = await bed.caller(speed=2.0).place_call()
        emulator = bed.emulator

        def replies() -> int:
            return sum(s.bill.reports for s in emulator.record.sessions.values())

        for n in range(1, 4):
            await call.speak_tone(400.0, 0.6)
            await keep_line_open(call, lambda n=n: replies() >= n)
            if n == 1:  # an announced reset between the turns: the session resumes
                (cid,) = emulator.open_connections()
                assert emulator.go_away(cid, 0.3)
                await keep_line_open(call, lambda: len(emulator.record.connections) >= 2)
        (live,) = bed.app[STATE].calls
        await keep_line_open(call, lambda: live.usage.turns == 3)
        usage = live.usage
        await call.hangup()
        await keep_line_open(call, lambda: not bed.app[STATE].calls)
        async with bed.http.get(bed.gateway_url + "/metrics") as resp:
            text = await resp.text()
        (session,) = emulator.record.sessions.values()

    assert len(session.connection_ids) == 2  # one session, resumed once
    assert session.bill.reports == usage.turns == 3
    assert usage.by_kind == session.bill.tokens
    assert usage.prices == profile.prices  # the call prices its tokens itself
    assert usage.cost_usd() == pytest.approx(session.bill.cost_usd)
    persona = {"persona": "default"}
    assert metric(text, "gateway_live_cost_usd_total", **persona) == pytest.approx(
        session.bill.cost_usd
    )
    for kind, tokens in session.bill.tokens.items():
        side, modality = kind.split("_")
        labels = {**persona, "kind": side, "modality": modality}
        assert metric(text, "gateway_live_tokens_total", **labels) == tokens
    # The third snapshot re-read the first two turns: more than either alone.
    assert session.bill.tokens["prompt_audio"] > 3 * profile.audio_in_tokens(int(0.6 * SECOND))
