"""What compression drops, carried in the system instruction where the model takes it: the
pure estimate against the emulator's billing model, and calls on Vertex AI's 3.8 (which
takes a mid-session system instruction [VSESS]) and the Gemini API's (not known to: none is
sent), through the real gateway, SDK and emulator."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.genai import errors
from test_profiles import live

from gateway.live.essentials import ESSENTIALS_MAX_CHARS, HEADING, Essentials, section
from gateway.live.history import History
from gateway.live.profiles import profile_for
from gateway.testing import billing
from gateway.testing.analysis import await_reply
from gateway.testing.harness import BackendKind, quick_emulator, test_bed

INSTRUCTION = "You take pizza orders."


def billed(
    history: History, turns: int, *, turn_s: float = 2.0, reply_s: float = 0.8
) -> list[tuple[dict[str, Any], billing.Context, int]]:
    """A call of `turns` alike turns as the emulator bills them, compressed past 400 tokens
    down to 200: after each, its usage report, the context the model holds and the turns
    begun in `history`."""
    setup = {
        "systemInstruction": {"parts": [{"text": INSTRUCTION}]},
        "contextWindowCompression": {
            "triggerTokens": 400,
            "slidingWindow": {"targetTokens": 200},
        },
    }
    context = billing.start(setup)
    out = []
    for n in range(1, turns + 1):
        history.add("user", f"caller utterance {n}")
        history.add("model", f"reply {n}")
        context, usage = billing.bill_turn(
            billing.DEFAULT_PROFILE,
            context,
            audio_bytes=int(n * turn_s * billing.BYTES_PER_SECOND),
            history=[],
            history_len=0,
            reply_s=reply_s,
        )
        out.append((usage, context, history.added))
    return out


def test_the_turns_compression_dropped_are_read_from_the_usage_reports() -> None:
    essentials = Essentials(INSTRUCTION)
    compressed = 0
    for n, (usage, context, added) in enumerate(billed(History(), 12), start=1):
        essentials.report(usage["promptTokenCount"], usage["responseTokenCount"], added)
        dropped = n - len(context.turns)  # reports whose turns the model no longer holds
        assert essentials.lost == 2 * dropped, n  # a caller's turn and a reply per report
        compressed += context.trimmed > 0
    assert compressed  # the call was long enough


def test_an_update_carries_what_was_dropped_once() -> None:
    essentials = Essentials(INSTRUCTION)
    sent: list[tuple[int, str]] = []
    history = History()
    for n, (usage, _context, added) in enumerate(billed(history, 12), 1):
        essentials.report(usage["promptTokenCount"], usage["responseTokenCount"], added)
        instruction = essentials.due(history)
        if instruction is not None:
            sent.append((n, instruction))
        assert essentials.due(history) is None  # nothing more dropped since
    assert len(sent) >= 2
    for _n, instruction in sent:
        assert instruction.startswith(f"{INSTRUCTION}\n\n{HEADING}\nCaller: caller utterance 1\n")
    first_n, first = sent[0]
    assert "reply 1" in first and f"caller utterance {first_n}" not in first
    # Each later update carries more (the model lost more), never what it still holds.
    assert [len(i) for _, i in sent] == sorted(len(i) for _, i in sent)


def test_the_section_keeps_the_newest_dropped_turns_within_its_bound() -> None:
    turns = [("user" if n % 2 else "model", f"turn {n} " + "x" * 300) for n in range(1, 21)]
    text = section(turns)
    assert len(text) <= ESSENTIALS_MAX_CHARS
    assert text.endswith(turns[-1][1].strip()) and "turn 1 " not in text
    lines = text.splitlines()
    assert lines[0].startswith("Caller: turn 15") and lines[-1].startswith("You: turn 20")
    assert section([("user", "y" * 5000)], limit=100) == ("Caller: " + "y" * 5000)[-100:]


def test_a_fresh_session_starts_over_and_the_history_numbers_its_turns() -> None:
    essentials = Essentials(INSTRUCTION)
    history = History()
    for usage, _context, added in billed(history, 8):
        essentials.report(usage["promptTokenCount"], usage["responseTokenCount"], added)
    assert essentials.due(history) is not None and essentials.carried > 0
    essentials.fresh()  # its setup has the persona's own instruction again
    assert essentials.carried == 0 and essentials.lost == 0
    assert history.since(1, 3) == [("model", "reply 1"), ("user", "caller utterance 2")]


# ------------------------------------------------------------------ through the gateway


def test_only_vertex_3_8_takes_a_context_update() -> None:
    assert profile_for("gemini-3.8-live", "vertex").context_update
    assert not profile_for("gemini-3.8-live", "gemini").context_update
    assert not profile_for("gemini-live-2.5-flash-native-audio", "vertex").context_update
    assert not profile_for("gemini-4-live", "vertex").context_update  # unknown: not sent


@pytest.mark.parametrize(
    ("backend", "resets"), [("vertex", False), ("vertex", True), ("gemini", False)]
)
async def test_a_long_call_carries_its_first_turns_where_the_model_takes_it(
    backend: BackendKind, resets: bool
) -> None:
    """Billed at ten times the audio rate, a call of a few turns passes a small trigger;
    on Vertex AI's 3.8 the session's system instruction then holds the caller's first turn
    (the emulator keeps it through compression, and a resumed state keeps it: the call
    switches connections on goAway every 1.8 s); on the Gemini API none is sent."""
    rates = billing.BillingProfile(audio_in_per_s=280.0, audio_out_per_s=250.0)
    knobs: dict[str, Any] = {"lifetime": 1.8, "goaway_lead": 0.9} if resets else {}
    config = quick_emulator(billing_profiles={"gemini-3.8-live": rates}, **knobs)
    async with test_bed(
        config,
        backend=backend,
        compression_trigger_tokens=1500,
        compression_target_tokens=800,
    ) as bed:
        call = await bed.caller(speed=2.0).place_call()
        for n in range(1, 7):
            await call.speak_tone(300.0 + 40 * (n % 4), 0.6)
            await await_reply(call, n, min_s=0.7, limit_s=15.0)
            await call.silence(0.2)
        await call.hangup()
        await asyncio.sleep(0.1)
    record = bed.emulator.record
    (session,) = record.sessions.values()
    assert resets == (len(record.connections) > 2)
    assert session.state.context.trimmed > 0  # compressed
    updates = [detail for _, kind, detail in record.events if kind == "context_update"]
    if backend == "gemini":
        assert not updates
        assert HEADING not in session.state.instruction
        return
    assert updates
    assert all(not c.refused and c.close_kind in ("client", "goaway") for c in record.connections)
    held = session.state.instruction
    assert held.startswith(bed.settings.system_instruction)
    assert f"{HEADING}\nCaller: caller utterance 1\nYou: reply 1" in held


async def test_the_emulator_refuses_a_context_update_the_model_does_not_take() -> None:
    async with live() as (emu, client):
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model="gemini-3.8-live") as session:
                await session.send_context_update(system_instruction="Be brief.")
                async for _ in session.receive():
                    pass
        assert caught.value.code == 1007
        assert not [e for e in emu.record.events if e[1] == "context_update"]
