"""Call state shared by the gateway's replicas: one small async interface, two stores.

* :class:`MemoryStore` keeps it in this process: the default, and all one replica needs.
* :class:`RedisStore` keeps it in Redis (``REDIS_URL``, the ``redis.asyncio`` client), so
  that every replica sees every call: a stream token opens one stream per call on all of
  them, an answering-machine result reaches the replica that holds the call, and a replica
  can take a call over from another.

Per call (by CallSid) a store holds:

* the stream's single-use state: the nonce of the token that opened the call's stream,
  while it runs and for a while after (:meth:`CallStore.claim_stream`);
* :class:`CallState`: the newest trusted resumption handle and what it covers, the persona,
  whether the greeting was played, the answering-machine result, the usage so far;
* the conversation so far, as turns, to brief a fresh Live session when a handle is
  refused or has expired;
* an answering-machine result not yet delivered, and a feed telling every replica which
  call has one (:meth:`CallStore.answer_feed`): the replica holding the call takes it;
* whether it was handed off and waits for its next stream (:meth:`CallStore.hand_off`);
* whether Twilio reported its stream lost (:meth:`CallStore.stream_lost`).

A call's state is written for one stream of it (:attr:`CallState.stream`, the nonce of the
stream's token): once the call's claim has moved on to another stream (a hand-off, a
recovery), what a replica still writes or forgets for the old stream is refused. So a
replica taken for dead while it was not cannot overwrite or forget a call that another
replica took over from it.

And which replicas take calls (:meth:`CallStore.replica_ready`), so that a draining one
knows whether it can hand its calls off; and what each persona's calls cost per day
(:meth:`CallStore.add_spend`, for ``gateway.budget``).

Every key expires: a call's state and turns ``ttl_s`` after their last write, its stream
memory when :meth:`CallStore.stream_ended` says. Keys carry the CallSid in braces, so a
call's keys share one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = [
    "TURNS_KEPT",
    "CallState",
    "CallStore",
    "MemoryStore",
    "RedisStore",
    "StoreError",
    "open_store",
]

log = logging.getLogger(__name__)

#: Turns of conversation kept per call: a fresh session's brief needs the recent ones only.
TURNS_KEPT: Final = 64
#: How long Twilio keeps a call up by default (``timeLimit``, 4 hours): a call's state
#: outlives its last write by this much unless told otherwise.
DEFAULT_TTL_S: Final = 4 * 3600.0
#: Answering-machine results are announced on this channel (the message is the CallSid).
ANSWERS_CHANNEL: Final = "gw:answers"
#: A stream claim passed on to the next stream's token (a hand-off) holds this + its nonce.
PASSED: Final = "pass:"
#: Replicas that take calls: a sorted set, member the replica, score until when (epoch s).
REPLICAS_KEY: Final = "gw:replicas"
#: Replicas alive (ready or draining): member the replica, score until when (epoch s).
ALIVE_KEY: Final = "gw:alive"
#: A persona's spend on a day, in USD (a float counter): ``gw:spend:<persona>:<day>``.
SPEND_KEY: Final = "gw:spend:{}:{}"
#: A replica's subscription that lost Redis tries again after this long.
RESUBSCRIBE_S: Final = 1.0
#: How long a report of a lost stream is kept: Twilio asks the `<Connect action>` (or the
#: stream's status callback comes) within seconds of the stream's end.
LOST_S: Final = 60.0


#: ``async with store.answer_feed() as feed: async for call_sid in feed``: subscribed once
#: the block is entered. A ``None`` says announcements may have been missed (the
#: subscription was lost and is back): look at every call held.
AnswerFeed = AbstractAsyncContextManager[AsyncIterator[str | None]]


class StoreError(Exception):
    """The store could not be reached or answered badly; the message is safe to log."""


@dataclass
class CallState:
    """What another replica needs to take a call over (the conversation is kept apart)."""

    persona: str = ""
    greeted: bool = False  # the greeting was played: a continued call is not greeted again
    handle: str | None = None  # the newest trusted resumption handle
    handle_replies: int = 0  # model replies the handle's state holds
    handle_turns: int = 0  # stored turns the handle's state holds
    answered_by: str | None = None  # the answering-machine result, once delivered
    usage: dict[str, int] = field(default_factory=dict)  # tokens so far (totals and by kind)
    handed_off_at: float = 0.0  # wall-clock time of the hand-off (the caller's gap from it)
    age_s: float = 0.0  # how long the call had run then (its duration limit goes on from it)
    holder: str = ""  # the replica that holds the call's stream (checkpoints); "": none
    watch: dict[str, float] = field(default_factory=dict)  # gateway.watch.CallWatch.marks
    stream: str = ""  # the nonce of the stream it was written for ("": any)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CallState:
        """Parse what :meth:`to_json` wrote; :class:`StoreError` for anything else."""
        try:
            data = json.loads(text)
            state = cls(**data)
        except (ValueError, TypeError) as error:
            raise StoreError(f"unreadable call state: {type(error).__name__}") from None
        ok = (
            isinstance(state.persona, str)
            and isinstance(state.greeted, bool)
            and isinstance(state.handle, str | None)
            and isinstance(state.handle_replies, int)
            and isinstance(state.handle_turns, int)
            and isinstance(state.answered_by, str | None)
            and isinstance(state.usage, dict)
            and isinstance(state.handed_off_at, int | float)
            and isinstance(state.age_s, int | float)
            and isinstance(state.holder, str)
            and isinstance(state.stream, str)
            and all(isinstance(k, str) and isinstance(v, int) for k, v in state.usage.items())
            and isinstance(state.watch, dict)
            and all(
                isinstance(k, str) and isinstance(v, int | float) for k, v in state.watch.items()
            )
        )
        if not ok:
            raise StoreError("unreadable call state: wrong types")
        return state


class CallStore(Protocol):
    """Where the state of calls lives; every method may raise :class:`StoreError`."""

    async def claim_stream(self, call_sid: str, nonce: str, live_s: float) -> str | None:
        """Open the call's one stream for the token ``nonce``: None if it was free or passed
        on to ``nonce`` (it is now taken, for ``live_s`` at most), else what holds it: the
        nonce of the stream that has it ("" if unknown), or ``pass:<nonce>``."""
        ...

    async def pass_stream(self, call_sid: str, nonce: str, live_s: float) -> None:
        """The call's stream is over but the call goes on: its next stream is the token
        ``nonce``'s (and no other's), for ``live_s`` at most."""
        ...

    async def hand_off(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        """Save the call's state and conversation (replacing the turns) and mark it handed
        off, at once: the next `<Connect action>` continues it, once (:meth:`take_hand_off`).
        False (nothing written) if the call's stream is no longer ``state.stream``."""
        ...

    async def take_hand_off(self, call_sid: str) -> bool:
        """Whether the call was handed off and waits for its next stream (one taker wins)."""
        ...

    async def replica_ready(self, replica: str, ready: bool, for_s: float) -> None:
        """This replica is alive, and takes calls or not, for ``for_s`` unless said again
        (0: it is gone)."""
        ...

    async def others_ready(self, replica: str) -> int:
        """How many other replicas take calls now."""
        ...

    async def replica_alive(self, replica: str) -> bool:
        """Whether ``replica`` said it is alive within its last ``for_s``."""
        ...

    async def checkpoint(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        """Save the call's state and conversation (replacing the turns) while it runs, so
        that another replica can take it over if this one dies. False (nothing written)
        if the call's stream is no longer ``state.stream``."""
        ...

    async def forget(self, call_sid: str, stream: str = "") -> None:
        """The call is over: nothing of it is to be continued; unless ``stream`` is given
        and the call's stream is no longer that one (another replica took the call over)."""
        ...

    async def claim_recovery(self, call_sid: str, nonce: str, live_s: float) -> bool:
        """Continue a call whose stream was lost with its replica: True for one caller
        only, while the call's state is still there; the call's next stream is then the
        token ``nonce``'s (as :meth:`pass_stream`), and the old stream's writes are refused."""
        ...

    async def stream_lost(self, call_sid: str) -> None:
        """Twilio reported the call's stream lost (a `stream-error`): for :meth:`was_lost`."""
        ...

    async def was_lost(self, call_sid: str) -> bool:
        """Whether the call's stream was reported lost within :data:`LOST_S`."""
        ...

    async def stream_ended(self, call_sid: str, memory_s: float) -> None:
        """The call's stream closed: its claim is kept ``memory_s`` more, then forgotten."""
        ...

    async def stream_claimed(self, call_sid: str) -> bool:
        """Whether the call has (or recently had) its stream."""
        ...

    async def save(self, call_sid: str, state: CallState) -> None:
        """Store the call's state (replacing what was there)."""
        ...

    async def load(self, call_sid: str) -> CallState | None:
        """The call's state, or None if none was saved (or it expired)."""
        ...

    async def add_turn(self, call_sid: str, role: str, text: str) -> None:
        """Append a turn of the conversation (the last :data:`TURNS_KEPT` are kept)."""
        ...

    async def turns(self, call_sid: str) -> list[tuple[str, str]]:
        """The conversation so far, oldest first, as (role, text)."""
        ...

    async def post_answer(self, call_sid: str, answered_by: str) -> None:
        """An answering-machine result for the call: kept, and announced on the feed."""
        ...

    async def take_answer(self, call_sid: str) -> str | None:
        """The call's undelivered answering-machine result, removed (one taker wins)."""
        ...

    def answer_feed(self) -> AnswerFeed:
        """Announcements of answering-machine results, from every replica."""
        ...

    async def add_spend(self, persona: str, day: str, usd: float, keep_s: float) -> float:
        """Add ``usd`` to the persona's spend on ``day`` (kept ``keep_s`` from now, at
        once with the sum); returns the day's total so far, from every replica."""
        ...

    async def spent(self, persona: str, day: str) -> float:
        """The persona's spend on ``day`` so far (0 if none)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the state stays where it is."""
        ...


# ----------------------------------------------------------------------------- in process


class MemoryStore:
    """The store of one process: dictionaries with expiry (purged lazily, by a heap)."""

    def __init__(
        self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        self._ttl = ttl_s
        self._clock = clock
        self._values: dict[tuple[str, str], tuple[Any, float]] = {}  # (kind, sid) -> value
        self._expiry: list[tuple[float, tuple[str, str]]] = []  # heap of (expires at, key)
        self._feeds: set[asyncio.Queue[str | None]] = set()

    def _get(self, key: tuple[str, str]) -> Any:
        self._purge()
        found = self._values.get(key)
        return None if found is None else found[0]

    def _put(self, key: tuple[str, str], value: Any, keep_s: float) -> None:
        expires = self._clock() + keep_s
        self._values[key] = (value, expires)
        heapq.heappush(self._expiry, (expires, key))

    def _purge(self) -> None:
        now, heap = self._clock(), self._expiry
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            found = self._values.get(key)
            if found is not None and found[1] == expires:
                del self._values[key]

    @property
    def keys(self) -> int:
        """How many keys are held (expired ones go when next looked at)."""
        self._purge()
        return len(self._values)

    async def claim_stream(self, call_sid: str, nonce: str, live_s: float) -> str | None:
        held: str | None = self._get(("stream", call_sid))
        if held is not None and held != PASSED + nonce:
            return held
        self._put(("stream", call_sid), nonce, live_s)
        return None

    async def pass_stream(self, call_sid: str, nonce: str, live_s: float) -> None:
        self._put(("stream", call_sid), PASSED + nonce, live_s)

    async def hand_off(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        if not await self.checkpoint(call_sid, state, turns):
            return False
        self._put(("handoff", call_sid), True, self._ttl)
        return True

    def _holds(self, call_sid: str, stream: str) -> bool:
        """Whether ``stream`` ("": any) is the call's stream."""
        return not stream or self._get(("stream", call_sid)) == stream

    async def take_hand_off(self, call_sid: str) -> bool:
        taken = self._get(("handoff", call_sid)) is not None
        self._values.pop(("handoff", call_sid), None)
        return taken

    async def replica_ready(self, replica: str, ready: bool, for_s: float) -> None:
        pass  # one process: there are no others to tell

    async def others_ready(self, replica: str) -> int:
        return 0

    async def replica_alive(self, replica: str) -> bool:
        return True  # one process: every call's replica is this one

    async def checkpoint(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        if not self._holds(call_sid, state.stream):
            return False
        await self.save(call_sid, state)
        self._put(("turns", call_sid), list(turns)[-TURNS_KEPT:], self._ttl)
        return True

    async def forget(self, call_sid: str, stream: str = "") -> None:
        if self._holds(call_sid, stream):
            for kind in ("state", "turns", "handoff"):
                self._values.pop((kind, call_sid), None)

    async def claim_recovery(self, call_sid: str, nonce: str, live_s: float) -> bool:
        if self._get(("recovery", call_sid)) is not None or self._get(("state", call_sid)) is None:
            return False
        self._put(("recovery", call_sid), True, self._ttl)
        await self.pass_stream(call_sid, nonce, live_s)
        self._values.pop(("lost", call_sid), None)
        return True

    async def stream_lost(self, call_sid: str) -> None:
        self._put(("lost", call_sid), True, LOST_S)

    async def was_lost(self, call_sid: str) -> bool:
        return self._get(("lost", call_sid)) is not None

    async def stream_ended(self, call_sid: str, memory_s: float) -> None:
        held = self._get(("stream", call_sid))
        if held is not None:
            self._put(("stream", call_sid), held, memory_s)

    async def stream_claimed(self, call_sid: str) -> bool:
        return self._get(("stream", call_sid)) is not None

    async def save(self, call_sid: str, state: CallState) -> None:
        self._put(("state", call_sid), state.to_json(), self._ttl)

    async def load(self, call_sid: str) -> CallState | None:
        text = self._get(("state", call_sid))
        return None if text is None else CallState.from_json(text)

    async def add_turn(self, call_sid: str, role: str, text: str) -> None:
        turns: list[tuple[str, str]] = list(self._get(("turns", call_sid)) or ())
        turns.append((role, text))
        self._put(("turns", call_sid), turns[-TURNS_KEPT:], self._ttl)

    async def turns(self, call_sid: str) -> list[tuple[str, str]]:
        return list(self._get(("turns", call_sid)) or ())

    async def post_answer(self, call_sid: str, answered_by: str) -> None:
        self._put(("answer", call_sid), answered_by, self._ttl)
        for feed in self._feeds:
            feed.put_nowait(call_sid)

    async def take_answer(self, call_sid: str) -> str | None:
        answer: str | None = self._get(("answer", call_sid))
        if answer is not None:
            del self._values[("answer", call_sid)]
        return answer

    def answer_feed(self) -> AnswerFeed:
        return self._subscribe()

    @asynccontextmanager
    async def _subscribe(self) -> AsyncIterator[AsyncIterator[str | None]]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._feeds.add(queue)

        async def announcements() -> AsyncIterator[str | None]:
            while True:
                yield await queue.get()

        try:
            yield announcements()
        finally:
            self._feeds.discard(queue)

    async def add_spend(self, persona: str, day: str, usd: float, keep_s: float) -> float:
        key = ("spend", SPEND_KEY.format(persona, day))
        total = float(self._get(key) or 0.0) + usd
        self._put(key, total, keep_s)
        return total

    async def spent(self, persona: str, day: str) -> float:
        return float(self._get(("spend", SPEND_KEY.format(persona, day))) or 0.0)

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------------------------- Redis


def _text(value: bytes | str | None) -> str | None:
    """A reply of the client (which decodes them: ``decode_responses``) as str."""
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    """Seconds as Redis' PX milliseconds (at least 1: 0 would be refused or delete)."""
    return max(1, round(seconds * 1000))


#: Claim a stream atomically: taken if free or passed on to this nonce; else what holds it.
_CLAIM: Final = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


#: Store a call's state and turns (and mark it handed off) if the call's stream is still
#: the writer's. KEYS: stream, state, turns, handoff. ARGV: the writer's stream ("": any),
#: the state, the TTL in ms, "1" to mark it handed off, then the turns.
_STORE: Final = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
if #ARGV > 4 then redis.call('RPUSH', KEYS[3], unpack(ARGV, 5)) end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if ARGV[4] == '1' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[3]) end
return 1
"""

#: Forget a call (state, turns, hand-off) if its stream is still ARGV[1] ("": any).
#: KEYS: stream, state, turns, handoff.
_FORGET: Final = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
"""

#: Claim a recovery: once, while the state is there; the stream passed on to ARGV[1].
#: KEYS: recovery, stream, state, lost. ARGV: the pass value, its TTL, the claim's TTL (ms).
_RECOVER: Final = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
return 1
"""


class RedisStore:
    """The store in Redis: one string key per kind of state, a list for the turns, a
    pub/sub channel for answering-machine announcements."""

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, *, timeout_s: float = 2.0) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        self._ttl = ttl_s
        try:
            self._redis: aioredis.Redis = aioredis.from_url(
                url,
                decode_responses=True,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
        except ValueError as error:  # the URL: its text may hold a password, so not shown
            raise ValueError(f"REDIS_URL is not a Redis URL ({type(error).__name__})") from None
        self._claim = self._redis.register_script(_CLAIM)
        self._store = self._redis.register_script(_STORE)
        self._forget = self._redis.register_script(_FORGET)
        self._recover = self._redis.register_script(_RECOVER)

    @staticmethod
    def _key(call_sid: str, kind: str) -> str:
        return f"gw:{{{call_sid}}}:{kind}"

    async def claim_stream(self, call_sid: str, nonce: str, live_s: float) -> str | None:
        key = self._key(call_sid, "stream")
        async with _errors("claim a stream"):
            held = await self._claim(keys=[key], args=[nonce, _ms(live_s), PASSED + nonce])
        return None if held is None else (_text(held) or "")

    async def pass_stream(self, call_sid: str, nonce: str, live_s: float) -> None:
        key = self._key(call_sid, "stream")
        async with _errors("pass a stream on"):
            await self._redis.set(key, PASSED + nonce, px=_ms(live_s))

    async def hand_off(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        return await self._store_call(call_sid, state, turns, handed_off=True)

    async def checkpoint(
        self, call_sid: str, state: CallState, turns: Sequence[tuple[str, str]]
    ) -> bool:
        return await self._store_call(call_sid, state, turns, handed_off=False)

    async def _store_call(
        self,
        call_sid: str,
        state: CallState,
        turns: Sequence[tuple[str, str]],
        *,
        handed_off: bool,
    ) -> bool:
        keys = [self._key(call_sid, kind) for kind in ("stream", "state", "turns", "handoff")]
        items = [json.dumps([role, text]) for role, text in list(turns)[-TURNS_KEPT:]]
        args: list[str | int] = [state.stream, state.to_json(), _ms(self._ttl)]
        args += ["1" if handed_off else "", *items]
        async with _errors("store a call"):
            return bool(await self._store(keys=keys, args=args))

    async def forget(self, call_sid: str, stream: str = "") -> None:
        keys = [self._key(call_sid, kind) for kind in ("stream", "state", "turns", "handoff")]
        async with _errors("forget a call"):
            await self._forget(keys=keys, args=[stream])

    async def claim_recovery(self, call_sid: str, nonce: str, live_s: float) -> bool:
        keys = [self._key(call_sid, kind) for kind in ("recovery", "stream", "state", "lost")]
        args: list[str | int] = [PASSED + nonce, _ms(live_s), _ms(self._ttl)]
        async with _errors("claim a recovery"):
            return bool(await self._recover(keys=keys, args=args))

    async def stream_lost(self, call_sid: str) -> None:
        async with _errors("note a lost stream"):
            await self._redis.set(self._key(call_sid, "lost"), "1", px=_ms(LOST_S))

    async def was_lost(self, call_sid: str) -> bool:
        async with _errors("look a lost stream up"):
            return bool(await self._redis.exists(self._key(call_sid, "lost")))

    async def take_hand_off(self, call_sid: str) -> bool:
        async with _errors("take a hand-off"):
            return bool(await self._redis.getdel(self._key(call_sid, "handoff")))

    async def replica_ready(self, replica: str, ready: bool, for_s: float) -> None:
        until = time.time() + for_s
        async with _errors("say the replica is ready"), self._redis.pipeline() as pipe:
            pipe.zadd(ALIVE_KEY, {replica: until})
            if ready and for_s > 0:
                pipe.zadd(REPLICAS_KEY, {replica: until})
            else:
                pipe.zrem(REPLICAS_KEY, replica)
            pipe.zremrangebyscore(ALIVE_KEY, "-inf", time.time() - 3600)  # long gone
            await pipe.execute()

    async def replica_alive(self, replica: str) -> bool:
        async with _errors("look a replica up"):
            until = await self._redis.zscore(ALIVE_KEY, replica)
        return until is not None and until > time.time()

    async def others_ready(self, replica: str) -> int:
        now = time.time()
        async with _errors("count the replicas"), self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(REPLICAS_KEY, "-inf", now)
            pipe.zrangebyscore(REPLICAS_KEY, now, "+inf")
            _, members = await pipe.execute()
        return sum(1 for member in members if _text(member) != replica)

    async def stream_ended(self, call_sid: str, memory_s: float) -> None:
        async with _errors("end a stream"):
            await self._redis.pexpire(self._key(call_sid, "stream"), _ms(memory_s))

    async def stream_claimed(self, call_sid: str) -> bool:
        async with _errors("look a stream up"):
            return bool(await self._redis.exists(self._key(call_sid, "stream")))

    async def save(self, call_sid: str, state: CallState) -> None:
        async with _errors("save a call"):
            await self._redis.set(self._key(call_sid, "state"), state.to_json(), px=_ms(self._ttl))

    async def load(self, call_sid: str) -> CallState | None:
        async with _errors("load a call"):
            text = _text(await self._redis.get(self._key(call_sid, "state")))
        return None if text is None else CallState.from_json(text)

    async def add_turn(self, call_sid: str, role: str, text: str) -> None:
        key = self._key(call_sid, "turns")
        async with _errors("add a turn"), self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps([role, text]))
            pipe.ltrim(key, -TURNS_KEPT, -1)
            pipe.pexpire(key, _ms(self._ttl))
            await pipe.execute()

    async def turns(self, call_sid: str) -> list[tuple[str, str]]:
        async with _errors("read the turns"):
            items = await self._redis.lrange(self._key(call_sid, "turns"), 0, -1)
        out = []
        for item in items:
            try:
                role, text = json.loads(item)
            except (ValueError, TypeError):
                raise StoreError("unreadable turn") from None
            out.append((str(role), str(text)))
        return out

    async def post_answer(self, call_sid: str, answered_by: str) -> None:
        async with _errors("post an answer"), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(call_sid, "answer"), answered_by, px=_ms(self._ttl))
            pipe.publish(ANSWERS_CHANNEL, call_sid)
            await pipe.execute()

    async def take_answer(self, call_sid: str) -> str | None:
        async with _errors("take an answer"):
            return _text(await self._redis.getdel(self._key(call_sid, "answer")))

    def answer_feed(self) -> AnswerFeed:
        return self._subscribe()

    @asynccontextmanager
    async def _subscribe(self) -> AsyncIterator[AsyncIterator[str | None]]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with _errors("subscribe"):
                await pubsub.subscribe(ANSWERS_CHANNEL)
            yield self._announcements(pubsub)
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                pass

    async def _announcements(self, pubsub: Any) -> AsyncIterator[str | None]:
        """Messages as they come; on a lost connection, a warning, a pause, a new
        subscription and a ``None`` (what came meanwhile was missed)."""
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as error:
                _raise_if_cancelling()
                log.warning("answer feed lost Redis (%s): resubscribing", type(error).__name__)
                await asyncio.sleep(RESUBSCRIBE_S)
                try:
                    await pubsub.aclose()  # drops the connection; subscribe takes one
                    await pubsub.subscribe(ANSWERS_CHANNEL)
                except (RedisError, OSError):
                    continue
                yield None
                continue
            if message is not None and message.get("type") == "message":
                yield str(message["data"])

    async def add_spend(self, persona: str, day: str, usd: float, keep_s: float) -> float:
        key = SPEND_KEY.format(persona, day)
        async with _errors("add to a spend"), self._redis.pipeline(transaction=True) as pipe:
            pipe.incrbyfloat(key, usd)
            pipe.pexpire(key, _ms(keep_s))
            total, _ = await pipe.execute()
        return float(total)

    async def spent(self, persona: str, day: str) -> float:
        async with _errors("read a spend"):
            total = _text(await self._redis.get(SPEND_KEY.format(persona, day)))
        try:
            return float(total or 0.0)
        except ValueError:
            raise StoreError("unreadable spend") from None

    async def aclose(self) -> None:
        await self._redis.aclose()


@asynccontextmanager
async def _errors(doing: str) -> AsyncIterator[None]:
    """Redis' and the socket's errors as :class:`StoreError` (the URL and data unsaid)."""
    try:
        yield
    except (RedisError, OSError) as error:
        _raise_if_cancelling()
        raise StoreError(f"Redis failed to {doing}: {type(error).__name__}") from None


def _raise_if_cancelling() -> None:
    """A task cancelled while redis-py's read timed out can see its TimeoutError instead
    (the cancellation and the timeout race): the task is still being cancelled, so keep
    cancelling rather than take it for Redis failing (a loop that retries on Redis errors
    would otherwise never end)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def open_store(redis_url: str, ttl_s: float = DEFAULT_TTL_S) -> CallStore:
    """The Redis store when ``redis_url`` is set, else the store of this process."""
    return RedisStore(redis_url, ttl_s) if redis_url else MemoryStore(ttl_s)
