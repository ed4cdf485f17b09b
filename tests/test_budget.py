"""The daily cost limit (`max_day_usd`): the spend counter in both stores, the day it
counts for, the wrap-up of a call that passes it and the refusal of the next one."""

from __future__ import annotations

import asyncio
import logging
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from feature_helpers import (
    PERSONAS,
    PRICES,
    SALES,
    SPEED,
    SUPPORT,
    WRAP_UP,
    bed_with_rest,
    emulator_config,
    last_mark_echoed,
    limited,
    metric,
    scrape,
    until_hung_up,
    user_turns,
)

from gateway.budget import KEEP_AFTER_S, DayBudget, keep_s, utc_day
from gateway.personas import CallPolicy
from gateway.store import CallStore, MemoryStore, RedisStore
from gateway.testing.harness import AUTH_TOKEN, PUBLIC_URL, TestBed
from gateway.testing.replicas import replicas
from gateway.testing.twilio_sim import CallRejected, TwilioCallerSimulator
from gateway.watch import CallWatch, Move

pytestmark = pytest.mark.usefixtures("no_config_file")

# 2026-12-03 23:59:30 UTC, and 40 s later: the next day.
LATE = 1796342370.0
NEXT = LATE + 40.0


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], CallStore]]:
    """Stores of one kind; the Redis ones on one server (replicas sharing it)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    shared = MemoryStore()  # one process: its replicas are itself
    async with AsyncExitStack() as stack:

        def make() -> CallStore:
            if not url:
                return shared
            store = RedisStore(url)
            stack.push_async_callback(store.aclose)
            return store

        yield make


def test_the_day_is_the_utc_day_and_its_counter_outlives_it() -> None:
    assert (utc_day(LATE), utc_day(NEXT)) == ("2026-12-03", "2026-12-04")
    assert keep_s(LATE) == pytest.approx(30.0 + KEEP_AFTER_S)
    assert keep_s(NEXT) == pytest.approx(86400.0 - 10.0 + KEEP_AFTER_S)


async def test_spend_adds_up_across_replicas_per_persona_and_day(
    stores: Callable[[], CallStore],
) -> None:
    persona = "p" + secrets.token_hex(4)
    clock = [LATE]
    one, two = DayBudget(stores(), lambda: clock[0]), DayBudget(stores(), lambda: clock[0])
    assert not await one.over(persona, 0.01)
    assert await one.add(persona, 0.004) == pytest.approx(0.004)
    totals = await asyncio.gather(*(two.add(persona, 0.001) for _ in range(5)))
    assert max(totals) == pytest.approx(0.009)  # each increment counted once
    assert not await one.over(persona, 0.01)
    assert await two.add(persona, 0.002) == pytest.approx(0.011)
    assert await one.over(persona, 0.01) and await two.over(persona, 0.01)
    assert not await one.over(persona, 0.0)  # 0: no limit
    assert not await one.over("other" + persona, 0.01)  # per persona
    clock[0] = NEXT  # a new UTC day starts from nothing
    assert not await one.over(persona, 0.01)
    assert await two.add(persona, 0.001) == pytest.approx(0.001)


async def test_a_days_spend_expires_when_its_keep_runs_out(
    stores: Callable[[], CallStore],
) -> None:
    store, persona = stores(), "p" + secrets.token_hex(4)
    await store.add_spend(persona, "2026-12-03", 0.5, 0.2)
    assert await store.spent(persona, "2026-12-03") == pytest.approx(0.5)
    await asyncio.sleep(0.4)
    assert await store.spent(persona, "2026-12-03") == 0.0


def test_the_watch_wraps_up_once_when_the_days_total_passes_the_limit() -> None:
    watch = CallWatch(CallPolicy(max_day_usd=0.05), started_at=0.0)
    assert watch.day_cost(0.049) is None
    assert watch.day_cost(0.05) is Move.WRAP_UP_DAY_COST
    assert watch.day_cost(0.07) is None  # once
    off = CallWatch(CallPolicy(), started_at=0.0)
    assert off.day_cost(100.0) is None


def busy(twiml: str) -> bool:
    reject = ET.fromstring(twiml).find("Reject")
    return reject is not None and reject.get("reason") == "busy"


async def test_a_call_over_the_days_limit_wraps_up_and_the_next_is_turned_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.server")
    # The greeting's reply alone costs more than $0.0002 at PRICES (the emulator's bill).
    persona = {**limited(max_day_usd=0.0002, wrap_up=WRAP_UP), "support": PERSONAS["support"]}
    async with bed_with_rest(emulator_config(), persona, token_prices=PRICES) as (
        bed,
        rest,
    ):
        call = await bed.caller(speed=SPEED).place_call(to=SALES)
        await until_hung_up(rest, call)
        with pytest.raises(CallRejected) as refused:
            await bed.caller(speed=SPEED).place_call(to=SALES)
        other = await bed.caller(speed=SPEED).place_call(to=SUPPORT)  # its own budget
        await other.hangup()
        text = await scrape(bed)

    assert user_turns(bed)[:2] == [persona["sales"]["greeting"], WRAP_UP]
    (update,) = rest.record.updates()
    assert update.form == {"Status": "completed"}
    assert update.at >= last_mark_echoed(call)
    assert metric(text, "gateway_hangups_total", persona="sales", reason="max_day_cost") == 1
    assert busy(refused.value.body)
    refusals = [r.getMessage() for r in caplog.records if "day's limit" in r.getMessage()]
    assert refusals == ["turned a call away (persona sales over its day's limit of $0.0002)"]
    assert metric(text, "gateway_requests_rejected_total", reason="max_day_cost") == 1


def caller(bed: TestBed) -> TwilioCallerSimulator:
    return TwilioCallerSimulator(bed.http, [bed.gateway_url], PUBLIC_URL, AUTH_TOKEN, speed=SPEED)


async def test_a_persona_over_its_days_limit_on_one_replica_is_busy_on_the_other(
    redis_url: str,
) -> None:
    name = "sales" + secrets.token_hex(3)  # the day's counter outlives the test in Redis
    personas = {name: limited(max_day_usd=0.0002, wrap_up=WRAP_UP)["sales"]}
    store = RedisStore(redis_url)
    try:
        async with replicas(
            2, redis_url, emulator_config(), personas=personas, token_prices=PRICES
        ) as (one, two):
            call = await caller(one).place_call(to=SALES)
            async with asyncio.timeout(15):
                while not await DayBudget(store).over(name, 0.0002):  # counted on one
                    await call.silence(0.1)
            with pytest.raises(CallRejected) as refused:
                await caller(two).place_call(to=SALES)
            async with asyncio.timeout(15):
                while WRAP_UP not in user_turns(one):  # the call on one wraps up
                    await call.silence(0.1)
            await call.hangup()
            rejected = two.metrics.registry.get_sample_value(
                "gateway_requests_rejected_total", {"reason": "max_day_cost"}
            )
    finally:
        await store.aclose()
    assert busy(refused.value.body)
    assert rejected == 1
