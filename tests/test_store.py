"""The call-state store: one contract, run against the in-process store and a real Redis."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest
import redis.asyncio as aioredis

from gateway.live.events import Usage
from gateway.personas import CallPolicy
from gateway.store import (
    TURNS_KEPT,
    CallState,
    CallStore,
    MemoryStore,
    RedisStore,
    StoreError,
    open_store,
)
from gateway.testing.redis_server import INSTALL_HINT, RedisMissing, RedisServer
from gateway.usage import CallUsage
from gateway.watch import CallWatch, Move

MakeStore = Callable[..., CallStore]


def new_call() -> str:
    return "CA" + secrets.token_hex(16)


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Stores of one kind; every Redis one on the same server (replicas sharing it)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    made: list[CallStore] = []

    def make(ttl_s: float = 60.0) -> CallStore:
        store = RedisStore(url, ttl_s) if url else MemoryStore(ttl_s)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.aclose()


async def wait_gone(check: Callable[[], Awaitable[object]], limit_s: float = 5.0) -> None:
    """Wait until an expiring key is gone (Redis expires it within a few ms of its PX)."""
    for _ in range(round(limit_s / 0.02)):
        if not await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the key never expired")


async def test_a_call_has_one_stream(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert not await store.stream_claimed(call)
    assert await store.claim_stream(call, "nonce-a", 60.0) is None
    assert await store.stream_claimed(call)
    assert await store.claim_stream(call, "nonce-a", 60.0) == "nonce-a"  # the same token
    assert await store.claim_stream(call, "nonce-b", 60.0) == "nonce-a"  # another one
    assert not await store.stream_claimed(new_call())


async def test_a_stream_is_remembered_for_its_memory_after_it_ended(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert await store.claim_stream(call, "nonce-a", 60.0) is None
    await store.stream_ended(call, 0.3)
    assert await store.claim_stream(call, "nonce-b", 60.0) == "nonce-a"
    await wait_gone(lambda: store.stream_claimed(call))
    assert await store.claim_stream(call, "nonce-b", 60.0) is None


async def test_a_claim_lapses_after_its_live_limit(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert await store.claim_stream(call, "nonce-a", 0.2) is None
    await wait_gone(lambda: store.stream_claimed(call))


async def test_ending_a_stream_that_never_was_claims_nothing(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    await store.stream_ended(call, 60.0)
    assert not await store.stream_claimed(call)
    assert await store.claim_stream(call, "nonce-a", 60.0) is None


async def test_a_stream_passed_on_opens_for_its_token_only(make_store: MakeStore) -> None:
    """A hand-off: the call's next stream is the one token's; the old one stays refused."""
    store, call = make_store(), new_call()
    assert await store.claim_stream(call, "first", 60.0) is None
    await store.pass_stream(call, "second", 60.0)
    assert await store.stream_claimed(call)
    assert await store.claim_stream(call, "first", 60.0) == "pass:second"
    assert await store.claim_stream(call, "other", 60.0) == "pass:second"
    assert await store.claim_stream(call, "second", 60.0) is None
    assert await store.claim_stream(call, "second", 60.0) == "second"  # used, like any


async def test_a_hand_off_is_taken_once(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert not await store.take_hand_off(call)
    await store.add_turn(call, "user", "from an older stream")
    state = CallState(persona="sales", greeted=True, handle="h-9", handle_replies=4)
    await store.hand_off(call, state, [("user", "hi"), ("model", "hello, how can I help?")])
    assert await store.load(call) == state
    assert await store.turns(call) == [("user", "hi"), ("model", "hello, how can I help?")]
    assert await store.take_hand_off(call)
    assert not await store.take_hand_off(call)


async def test_a_call_taken_over_refuses_what_its_old_stream_writes(
    make_store: MakeStore,
) -> None:
    """A replica taken for dead (its stream lost, the call recovered elsewhere) that is
    still alive: its checkpoints, hand-off and forget for the old stream change nothing;
    the next stream's hold."""
    store, call = make_store(), new_call()
    assert await store.claim_stream(call, "first", 60.0) is None
    mine = CallState(persona="p", handle="h-1", holder="a", stream="first")
    assert await store.checkpoint(call, mine, [("user", "hi")])
    assert await store.claim_recovery(call, "second", 60.0)
    assert not await store.claim_recovery(call, "third", 60.0)  # one taker
    later = CallState(persona="p", handle="h-2", holder="a", stream="first")
    assert not await store.checkpoint(call, later, [])
    assert not await store.hand_off(call, later, [])
    await store.forget(call, "first")
    assert await store.load(call) == mine and await store.turns(call) == [("user", "hi")]
    assert not await store.take_hand_off(call)
    assert await store.claim_stream(call, "first", 60.0) == "pass:second"
    assert await store.claim_stream(call, "second", 60.0) is None  # the recovery's token
    theirs = CallState(persona="p", handle="h-3", holder="b", stream="second")
    assert await store.checkpoint(call, theirs, [])
    assert await store.load(call) == theirs
    await store.forget(call, "second")
    assert await store.load(call) is None


async def test_a_recovery_needs_the_calls_state(make_store: MakeStore) -> None:
    """Its replica forgot the call (it ended it) before the recovery: nothing to go on
    with, and the call's stream is not passed on."""
    store, call = make_store(), new_call()
    assert await store.claim_stream(call, "first", 60.0) is None
    assert not await store.claim_recovery(call, "second", 60.0)
    assert await store.claim_stream(call, "second", 60.0) == "first"


async def test_a_lost_stream_is_noted_until_the_call_is_recovered(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert not await store.was_lost(call)
    await store.stream_lost(call)
    assert await store.was_lost(call) and not await store.was_lost(new_call())
    assert await store.claim_stream(call, "first", 60.0) is None
    assert await store.checkpoint(call, CallState(stream="first"), [])
    assert await store.claim_recovery(call, "second", 60.0)
    assert not await store.was_lost(call)


async def test_state_round_trips_and_is_replaced(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert await store.load(call) is None
    first = CallState(persona="sales", greeted=True, handle="h-1", handle_replies=2)
    await store.save(call, first)
    assert await store.load(call) == first
    second = CallState(
        persona="sales",
        greeted=True,
        handle="h-2",
        handle_replies=3,
        handle_turns=5,
        answered_by="human",
        usage={"prompt_audio": 120, "response_audio": 80},
    )
    await store.save(call, second)
    assert await store.load(call) == second
    assert await store.load(new_call()) is None


async def test_state_and_turns_expire_after_the_ttl(make_store: MakeStore) -> None:
    store, call = make_store(ttl_s=0.3), new_call()
    await store.save(call, CallState(persona="p"))
    await store.add_turn(call, "user", "hello")
    assert await store.load(call) is not None
    await wait_gone(lambda: store.load(call))
    await wait_gone(lambda: store.turns(call))


async def test_turns_keep_their_order_and_the_last_ones(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    assert await store.turns(call) == []
    await store.add_turn(call, "user", "Hi, it's Ann — about my order ✓")
    await store.add_turn(call, "model", "Sure, which one?")
    assert await store.turns(call) == [
        ("user", "Hi, it's Ann — about my order ✓"),
        ("model", "Sure, which one?"),
    ]
    for n in range(TURNS_KEPT):
        await store.add_turn(call, "user", f"turn {n}")
    turns = await store.turns(call)
    assert len(turns) == TURNS_KEPT
    assert turns[0] == ("user", "turn 0") and turns[-1] == ("user", f"turn {TURNS_KEPT - 1}")


async def test_an_answer_is_announced_and_taken_once(make_store: MakeStore) -> None:
    store, call = make_store(), new_call()
    async with store.answer_feed() as feed:
        await store.post_answer(call, "machine_end_beep")
        async with asyncio.timeout(5):
            announced = await anext(feed)
    assert announced == call
    assert await store.take_answer(call) == "machine_end_beep"
    assert await store.take_answer(call) is None


async def test_an_answer_waits_for_its_call(make_store: MakeStore) -> None:
    """Posted before the call's stream started (no one listening): kept until taken."""
    store, call = make_store(), new_call()
    await store.post_answer(call, "human")
    assert await store.take_answer(new_call()) is None
    assert await store.take_answer(call) == "human"


async def test_open_store_picks_by_url(redis_url: str) -> None:
    assert isinstance(open_store(""), MemoryStore)
    store = open_store(redis_url)
    try:
        assert isinstance(store, RedisStore)
    finally:
        await store.aclose()


# ------------------------------------------------------------ Redis: replicas, failures


async def test_replicas_sharing_redis_see_one_another(redis_url: str) -> None:
    async with AsyncExitStack() as stack:
        one, two = RedisStore(redis_url), RedisStore(redis_url)
        stack.push_async_callback(one.aclose)
        stack.push_async_callback(two.aclose)
        call = new_call()
        assert await one.claim_stream(call, "nonce-a", 60.0) is None
        assert await two.claim_stream(call, "nonce-a", 60.0) == "nonce-a"
        await two.save(call, CallState(persona="sales", handle="h"))
        assert await one.load(call) == CallState(persona="sales", handle="h")
        feed = await stack.enter_async_context(one.answer_feed())
        await two.post_answer(call, "fax")
        async with asyncio.timeout(5):
            assert await anext(feed) == call
        assert await one.take_answer(call) == "fax"
        assert await two.take_answer(call) is None


async def test_replicas_say_when_they_take_calls(redis_url: str) -> None:
    memory = MemoryStore()
    await memory.replica_ready("a", True, 60.0)
    assert await memory.others_ready("b") == 0  # one process: no others, ever
    async with AsyncExitStack() as stack:
        one, two = RedisStore(redis_url), RedisStore(redis_url)
        stack.push_async_callback(one.aclose)
        stack.push_async_callback(two.aclose)
        a, b = new_call(), new_call()  # unique names: other tests share the server
        await one.replica_ready(a, True, 60.0)
        assert await one.others_ready(a) == 0
        await two.replica_ready(b, True, 0.3)
        assert await one.others_ready(a) == 1 and await two.others_ready(b) == 1
        await wait_gone(lambda: one.others_ready(a))  # b did not say it again
        await two.replica_ready(b, True, 60.0)
        await one.replica_ready(a, False, 0.0)
        assert await two.others_ready(b) == 0
        await two.replica_ready(b, False, 0.0)


async def test_feed_comes_back_after_losing_redis(redis_url: str) -> None:
    """The subscription's connection is killed: the feed says so (None), resubscribes and
    announces again."""
    store, admin = RedisStore(redis_url), aioredis.from_url(redis_url)
    try:
        async with store.answer_feed() as feed:
            await admin.client_kill_filter(_type="pubsub")
            call = new_call()
            async with asyncio.timeout(10):
                assert await anext(feed) is None
                await store.post_answer(call, "human")
                assert await anext(feed) == call
    finally:
        await store.aclose()
        await admin.aclose()


async def test_unreachable_redis_is_a_store_error_without_the_url() -> None:
    url = "redis://:s3cret-password@127.0.0.1:1/0"  # nothing listens on port 1
    store = RedisStore(url, timeout_s=0.5)
    try:
        with pytest.raises(StoreError) as caught:
            await store.claim_stream(new_call(), "nonce", 60.0)
        assert "s3cret" not in str(caught.value) and "Redis failed" in str(caught.value)
    finally:
        await store.aclose()


def test_bad_state_is_a_store_error() -> None:
    for text in ("{", "[]", '{"persona": 3}', '{"nope": 1}', '{"usage": {"a": "b"}}'):
        with pytest.raises(StoreError):
            CallState.from_json(text)


def test_without_redis_server_the_redis_tests_fail_saying_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a skip: a machine without redis-server must not pass the suite silently."""
    monkeypatch.setenv("REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisMissing, match="apt-get install redis-server"):
        RedisServer().start()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
         f"{__file__}::test_open_store_picks_by_url"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 error" in run.stdout and INSTALL_HINT.split(":")[0] in run.stdout


def test_a_calls_usage_carries_on_through_its_state() -> None:
    """What a hand-off stores of the usage, and the next replica starts from."""
    usage = CallUsage(prices={"prompt_audio": 3.0})
    usage.add(Usage(120, 30, 150, (("audio", 100),), (("audio", 30),)))
    usage.add(Usage(50, 10, 60, (), ()))
    state = CallState.from_json(CallState(usage=usage.counts()).to_json())
    carried = CallUsage(prices={"prompt_audio": 3.0})
    carried.carry_on(state.usage)
    assert carried.summary() == usage.summary() and carried.turns == usage.turns == 2


def test_a_calls_watch_keeps_its_schedule_through_its_state() -> None:
    """Handed off 100 s in (stored, then continued 2 s later on a replica whose clock reads
    otherwise): the caller silent for 15 s and checked on once, the bot quiet for 4 s, the
    wrap-up asked. There, the goodbye comes when it would have, and no second wrap-up."""
    policy = CallPolicy(max_call_s=300.0, wrap_up_at=0.3, silence_timeout_s=10.0)
    old = CallWatch(policy, started_at=0.0)
    old.caller_spoke(85.0)
    old.bot_speaking()
    old.bot_quiet(86.0)
    assert old.due(90.0) == (Move.WRAP_UP_DURATION, None)
    assert old.due(96.0) == (Move.CHECK_IN, None)
    state = CallState.from_json(CallState(watch=old.marks(100.0)).to_json())
    now = 5000.0
    fresh = CallWatch(policy, started_at=now - 102.0)  # the call's age carries on (call_factory)
    assert fresh.due(now + 1)[0] is Move.WRAP_UP_DURATION  # what carry_on keeps from happening
    new = CallWatch(policy, started_at=now - 102.0)
    new.carry_on(state.watch, now, since_s=2.0)
    assert new.due(now + 1) == (None, now + 4)  # 10 s after the bot went quiet
    assert new.due(now + 4) == (Move.SILENCE, None)  # the second silence: goodbye
    # A bot speaking when stored is quiet from the new stream on: a first check-in then.
    old.caller_spoke(100.0)
    old.bot_speaking()
    speaking = CallWatch(policy, started_at=now - 102.0)
    speaking.carry_on(old.marks(101.0), now, since_s=2.0)
    assert speaking.due(now + 9.9) == (None, now + 10)
    assert speaking.due(now + 10) == (Move.CHECK_IN, None)


async def test_a_task_being_cancelled_is_not_told_redis_failed() -> None:
    """redis-py may turn a cancellation that meets its read timeout into its TimeoutError;
    a loop that retries on store errors must still stop, so the store lets it be cancelled."""
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.5)  # nothing listens on port 1

    async def cancelled_then_redis_fails() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # as if a library had swallowed it: the task is still being cancelled
        await store.claim_stream(new_call(), "nonce", 60.0)

    task = asyncio.create_task(cancelled_then_redis_fails())
    await asyncio.sleep(0)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await store.aclose()
