"""Session survival in the corners where the Live service's behaviour is unknown or reported.

Each test is one call of ten turns across five or more connection resets, with the emulator
playing one reading of the service (see the emulator's module docstring for what each rests
on): setups answered in 0.2-1.5 s while handles keep coming every few hundred ms; a resume
beside an open connection that forks the session, takes it over or is refused; announced and
abrupt cuts of every kind at random moments; a reply cut off and then, after the resume,
either said again or held as answered. In every case the model's session must hold the
caller's audio within 2 %, every utterance once, and the caller must hear every reply once, in
order, and never be left waiting in silence.

Time is compressed (speed 2) like tests/test_survival.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from survival_helpers import SPEED, Outcome, run_call

from gateway.testing.chaos import Chaos, ChaosConfig
from gateway.testing.harness import TestBed, quick_emulator, test_bed
from gateway.testing.live_emulator import EmulatorConfig

TURNS = 8
RESETS = 5
SLOW_SETUP = (0.2, 1.5)
FREQUENT_HANDLES = (0.2, 0.4)


@pytest.fixture(autouse=True)
def session_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The session manager's account of each switch, printed with a failure."""
    caplog.set_level(logging.INFO, logger="gateway.live")


def corner_config(**overrides: object) -> EmulatorConfig:
    """The test calls' replies and pauses, with the service behaviour a test names."""
    return quick_emulator(**{"speed": SPEED, **overrides})


@asynccontextmanager
async def chaos(bed: TestBed, config: ChaosConfig) -> AsyncIterator[Chaos]:
    monkey = Chaos(bed.emulator, config)
    monkey.start()
    try:
        yield monkey
    finally:
        await monkey.stop()


def assert_survived(out: Outcome, resets: int, chaos: Chaos | None = None) -> None:
    """Nothing lost, nothing unanswered; on failure the schedule that led there: the
    emulator's events (and the disruptions) of the call."""
    problems = out.problems()
    schedule = "\n".join(out.events)
    if chaos is not None:
        schedule += "\ndisruptions: " + ", ".join(
            f"{d.at:.3f} {d.kind} conn={d.connection_id}" for d in chaos.done
        )
    assert not problems, f"{problems}; {out.figures()}\n{schedule}"
    assert resets >= RESETS, f"only {resets} resets; {out.figures()}"


def goaways(bed: TestBed) -> int:
    return len([e for e in bed.emulator.record.events if e[1] == "goaway"])


async def test_slow_setups_with_frequent_handles() -> None:
    """goAway switches while each new connection's setup takes up to 1.5 s and the old one
    keeps issuing handles: the new connection holds the state of the handle it was opened
    with, not of the newer ones."""
    config = corner_config(
        setup_latency=SLOW_SETUP,
        handle_interval=FREQUENT_HANDLES,
        lifetime=2.6,
        goaway_lead=1.6,
        concurrent_resume="fork",
        seed=11,
    )
    async with test_bed(config) as bed:
        out = await run_call(bed, TURNS)
        assert_survived(out, goaways(bed))


@pytest.mark.parametrize("mode", ["fork", "takeover", "refuse"])
async def test_resume_beside_an_open_connection(mode: str) -> None:
    """goAway switches, the service treating the second connection of a session as a fork,
    a takeover or a refusal (1011)."""
    config = corner_config(
        setup_latency=(0.2, 0.6),
        handle_interval=FREQUENT_HANDLES,
        lifetime=2.6,
        goaway_lead=1.6,
        concurrent_resume=mode,
        seed=12,
    )
    async with test_bed(config) as bed:
        out = await run_call(bed, TURNS)
        assert_survived(out, goaways(bed))


@pytest.mark.parametrize("mode", ["fork", "refuse"])
async def test_random_announced_and_abrupt_cuts_with_slow_setups(mode: str) -> None:
    """goAway with little or much time left, TCP resets, close codes 1000/1007/1008/1011, cuts
    during a setup, mid-reply, right after a handle, twice in a row, a refused handshake."""
    config = corner_config(
        setup_latency=SLOW_SETUP,
        handle_interval=FREQUENT_HANDLES,
        concurrent_resume=mode,
        seed=13,
    )
    async with test_bed(config) as bed, chaos(bed, ChaosConfig(every=(1.0, 2.0), seed=13)) as c:
        out = await run_call(bed, TURNS, chaos=c, until_disruptions=RESETS)
    assert_survived(out, len(c.done), c)


@pytest.mark.per_profile("gemini-3.1-flash-live-preview")
@pytest.mark.parametrize("after_cut_reply", ["repeat", "wait"])
async def test_replies_cut_off_then_resumed(after_cut_reply: str) -> None:
    """Replies cut off by a reset; resumed from a handle issued before each, the model says
    it again ("repeat") or holds the utterance as answered and waits ("wait"): the caller
    hears every reply in full either way."""
    config = corner_config(
        handle_interval=FREQUENT_HANDLES, after_cut_reply=after_cut_reply, seed=14
    )
    cuts = ChaosConfig(every=(0.5, 1.5), kinds=("mid-reply",), mid_reply_after=(0.05, 0.3))
    async with test_bed(config) as bed, chaos(bed, cuts) as c:
        out = await run_call(bed, TURNS, chaos=c, until_disruptions=RESETS)
    assert_survived(out, len(c.done), c)
