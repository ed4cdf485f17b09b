"""What the survival tests share (tests/test_survival.py, tests/test_survival_corners.py): a
call of turns, and the checks of what the model's session holds and what the caller heard."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.live.events import Resumed
from gateway.live.session import LiveSession
from gateway.server import STATE
from gateway.testing.analysis import (
    HeardReply,
    await_reply,
    heard_playings,
    segments,
    timeline,
)
from gateway.testing.chaos import Chaos
from gateway.testing.harness import TestBed
from gateway.testing.live_emulator import ConnectionRecord, EmulatorRecord
from gateway.testing.twilio_sim import SimulatedCall

SPEED = 2.0
UTTERANCE_S = 0.6
CALLER_FREQS = (300.0, 340.0, 380.0, 420.0)
FULL_REPLY_S = 0.7  # of the test replies' 0.8 s: heard, the caller talks on
# Heard in full, for the check that a reply is not heard again after it: a reply cut in its
# last tenth and then said again by a resumed model was heard, but not whole.
WHOLE_REPLY_S = 0.76
# A replay may send the last piece of caller audio again (the service cannot say whether the
# handle covers it): the gateway's default pieces (CALLER_AUDIO_BATCH_MS) are this long, and
# an utterance is measured in 20-ms windows.
PIECE_S = 0.04
UTTERANCE_SLACK_S = PIECE_S + 0.02
# Input a reset may send twice, because the service cannot say what a handle covers (the
# session manager's guard: about 1.5 round trips); an utterance may be held that much longer.
OVERLAP_S = 0.1


def full_replies(record_replies: list[HeardReply]) -> list[int]:
    return [r.n for r in record_replies if r.sound_s > FULL_REPLY_S]


async def converse(call: SimulatedCall, turns: int, limit_s: float = 20.0, first: int = 1) -> None:
    """Say something, keep the line open until the reply to it was heard, repeat (turns
    ``first`` to ``turns``)."""
    for n in range(first, turns + 1):
        await call.speak_tone(CALLER_FREQS[n % len(CALLER_FREQS)], UTTERANCE_S)
        await await_reply(call, n, min_s=FULL_REPLY_S, limit_s=limit_s, read=heard_playings)
        await call.silence(0.2)


def cut_and_not_said_again(replies: list[HeardReply]) -> list[str]:
    """Each reply cut short and followed by another, where it should have been followed by
    its own repetition: not when the caller had it (or took it, FULL_REPLY_S) as heard.

    A reset that cuts a reply in its last fifth does that: the caller has heard enough and
    talks on, over the resumed model saying it again (a barge-in), and the answer to what
    they said comes next. Seen once on Python 3.12: reply 5 heard 0.72 s, then 0.30 s of it
    again from the top, then reply 6.
    """
    found: list[str] = []
    had: set[int] = set()
    for r, nxt in itertools.pairwise(replies):
        if r.sound_s > FULL_REPLY_S:
            had.add(r.n)
        elif nxt.n != r.n and r.n not in had:
            found.append(f"reply {r.n} cut at {r.sound_s:.2f} s, then {nxt.n}")
    return found


def assert_replies_once_in_order(replies: list[HeardReply], turns: int) -> None:
    """Every reply heard in full exactly once, in order; a reply cut by a reset may only
    be followed by its own full repetition, unless the caller had heard it already."""
    assert full_replies(replies) == list(range(1, turns + 1)), replies
    unsaid = cut_and_not_said_again(replies)
    assert not unsaid, (unsaid, replies)


# The caller's audio as the test counts it (mu-law bytes times 4, less the seconds withheld)
# and as the gateway resamples it may differ by a few samples.
ROUNDING_BYTES = 320


def reset_problems(
    record: EmulatorRecord,
    resumes: Sequence[Resumed],
    held: int,
    sent: int,
    twice: list[tuple[float, float]] | None = None,
) -> list[str]:
    """Each reset where the resumed session lacks some of the caller's audio, or holds some
    twice beyond what the gateway said it might (its ``overlap_s``); and whether the session
    holding ``held`` bytes at the end of a call of ``sent`` bytes holds every byte once
    but for what the resets sent twice. `twice` gets each reset's (seconds sent twice, or
    less than 0: missing; the gateway's ``overlap_s``).

    A connection carries one unbroken run of the caller's audio: its session holds ``a``
    bytes when it begins, and the gateway writes to it from byte ``b`` of the caller's audio
    on, so the session holds ``a - b`` bytes more than the caller's audio it has had, for
    the connection's life. A handle it issued holding ``h`` bytes holds the caller's audio
    up to byte ``h - (a - b)``; a resume from it replays from byte ``b'`` (the gateway's
    ``replayed_from``): a ``b'`` past that is audio lost, short of it audio sent twice.
    """
    by_handle: dict[str | None, list[Resumed]] = {}
    for resumed in resumes:
        by_handle.setdefault(resumed.handle, []).append(resumed)
    conns: dict[str | None, list[ConnectionRecord]] = {}
    for conn in record.connections[1:]:
        if conn.setup and not conn.refused:
            conns.setdefault(conn.resumed_from, []).append(conn)
    taken: list[tuple[ConnectionRecord, Resumed]] = []
    problems: list[str] = []
    for handle, resumed_list in by_handle.items():
        mine = conns.get(handle, [])
        if len(mine) != len(resumed_list):  # some were opened and dropped before taking over
            mine = [c for c in mine if c.audio_bytes_received or c.messages_received]
        if len(mine) != len(resumed_list):
            problems.append(f"{len(resumed_list)} resets from one handle, {len(mine)} resumes")
            continue
        taken += zip(mine, resumed_list, strict=True)
    surplus: dict[int, int] = {record.connections[0].id: 0}  # a - b, by connection
    for conn, resumed in sorted(taken, key=lambda pair: pair[0].id):
        if conn.resumed_holding is None:  # a fresh session (the handle refused): not resumed
            surplus[conn.id] = -resumed.replayed_from
            continue
        issuer, holds = conn.resumed_holding
        if issuer not in surplus:
            problems.append(f"connection {conn.id} resumed a handle of {issuer}, never used")
            continue
        upto = holds - surplus[issuer]  # the caller's audio its handle holds
        surplus[conn.id] = holds - resumed.replayed_from
        missing_s = (resumed.replayed_from - upto) / 32000
        if twice is not None:
            twice.append((-missing_s, resumed.overlap_s))
        if missing_s > 0:
            problems.append(f"reset to connection {conn.id}: {missing_s:.3f} s of audio missing")
        elif -missing_s > resumed.overlap_s + 1e-6:
            problems.append(
                f"reset to connection {conn.id}: {-missing_s:.3f} s of audio sent twice, "
                f"the gateway said at most {resumed.overlap_s:.3f} s"
            )
    last = max(surplus)
    if abs(held - sent - surplus[last]) > ROUNDING_BYTES:
        problems.append(
            f"the session holds {held} bytes of {sent} sent, {surplus[last]} of them twice "
            f"at resets: {(sent + surplus[last] - held) / 32000:.3f} s lost on a connection"
        )
    return problems


async def live_session(bed: TestBed) -> LiveSession:
    """The gateway's Live session of the one call in progress."""
    state = bed.app[STATE]
    for _ in range(100):
        if state.calls:
            (call,) = state.calls
            return call.live
        await asyncio.sleep(0.05)
    raise AssertionError("no call at the gateway")


def sent_bytes(bed: TestBed, call: SimulatedCall) -> int:
    """The caller's audio as 16 kHz PCM (4 bytes per mu-law byte), less the silence the
    gateway withheld from the model on purpose (SILENCE_SUPPRESSION, gateway.dtx)."""
    registry = bed.metrics.registry
    withheld = registry.get_sample_value("gateway_caller_audio_withheld_seconds_total") or 0.0
    return len(call.record.sent_ulaw) * 4 - round(withheld * 32000)


def assert_session_holds_caller_audio(
    bed: TestBed, call: SimulatedCall, utterances: int, live: LiveSession
) -> None:
    """At no reset is the caller's audio missing from the resumed session, nor sent twice
    beyond what the gateway reported (`reset_problems`); every utterance is held once,
    longer by at most what a reset sent twice (a piece, or the most the gateway reported:
    its guard is wider while the round trips it measured were slower)."""
    record = bed.emulator.record
    sessions = list(record.sessions.values())
    assert len(sessions) == 1, "a reconnect did not resume the session"
    session = sessions[0]
    sent = sent_bytes(bed, call)
    held = len(session.audio)
    problems = reset_problems(record, live.resumes, held, sent)
    assert not problems, (problems, held, sent)
    pcm = np.frombuffer(bytes(session.audio), dtype=np.int16)
    # A piece's length or less, apart from an utterance, is a piece sent again at a reset.
    twice_s = max((r.overlap_s for r in live.resumes), default=0.0)
    slack = max(UTTERANCE_SLACK_S, twice_s + 0.02)
    spoken = [s for s in segments(pcm, rate=16000) if s.duration_s > slack]
    found = [(round(s.start_s, 2), round(s.duration_s, 2)) for s in spoken]
    assert len(spoken) == utterances, found
    for seg in spoken:
        assert -UTTERANCE_SLACK_S <= seg.duration_s - UTTERANCE_S <= slack, (seg, slack)


@dataclass
class Outcome:
    """A finished call read back, with the figures a failure report needs."""

    turns: int
    spoken: int  # utterances the caller said (fewer than turns if a reply never came)
    stalled: str | None  # why the conversation stopped early, if it did
    sessions: int
    sent_bytes: int  # caller audio, as 16 kHz PCM
    held_bytes: int  # what the model's session (its newest lineage) holds
    utterances: list[float]  # durations of the utterances the session holds
    replies: list[HeardReply]  # each playing of a reply (gateway.testing.analysis.playings)
    connections: int
    events: list[str] = field(default_factory=list)

    @property
    def held_share(self) -> float:
        return self.held_bytes / self.sent_bytes if self.sent_bytes else 0.0

    def problems(self) -> list[str]:
        """What does not hold: the session has the caller's audio within 2 %, every
        utterance once (whole, at most OVERLAP_S longer), every reply heard once and in
        order (a reply cut off may be followed only by its own repetition, heard apart or
        run together with it; none heard again after it was heard in full), no caller left
        waiting for a reply."""
        found: list[str] = []
        if self.stalled is not None:
            found.append(f"caller left waiting: {self.stalled}")
        if self.sessions != 1:
            found.append(f"{self.sessions} sessions (a reconnect did not resume)")
        if abs(self.held_bytes - self.sent_bytes) > 0.02 * self.sent_bytes:
            found.append(f"session holds {100 * self.held_share:.1f} % of the caller's audio")
        # A piece no longer than OVERLAP_S is input sent twice at a reset (an utterance's
        # tail, held again after it), not an utterance.
        pieces = [d for d in self.utterances if d > OVERLAP_S]
        whole = [d for d in pieces if -0.04 <= d - UTTERANCE_S <= OVERLAP_S]
        if len(whole) != self.spoken or len(pieces) != self.spoken:
            found.append(
                f"{len(whole)} of {self.spoken} utterances held whole, "
                f"{len(self.utterances)} pieces: {[round(d, 2) for d in self.utterances]}"
            )
        heard = full_replies(self.replies)
        if heard != list(range(1, self.turns + 1)):
            found.append(f"replies heard in full: {heard}")
        found += cut_and_not_said_again(self.replies)
        # Heard in full and then again. Playings, not runs: a reply that plays on after a
        # stall is one playing; one said again from its start is another (by its level).
        heard_in_full: set[int] = set()
        for playing in self.replies:
            n, seconds = playing.n, playing.sound_s
            if n in heard_in_full:
                found.append(f"reply {n} heard again ({seconds:.2f} s) after in full")
            elif seconds > WHOLE_REPLY_S:
                heard_in_full.add(n)
        return found

    def figures(self) -> str:
        return (
            f"held {100 * self.held_share:.1f} % of sent audio "
            f"({self.held_bytes} of {self.sent_bytes} bytes); {len(self.utterances)} "
            f"utterance pieces for {self.spoken} spoken; replies heard "
            f"{[(r.n, round(r.sound_s, 2)) for r in self.replies]}; "
            f"{self.connections} connections, {self.sessions} session(s)"
        )


def outcome(bed: TestBed, call: SimulatedCall, turns: int, stalled: str | None) -> Outcome:
    record = bed.emulator.record
    sessions = list(record.sessions.values())
    audio = bytes(sessions[-1].audio) if sessions else b""
    pcm = np.frombuffer(audio, dtype=np.int16)
    caller, _ = timeline(call.record)
    return Outcome(
        turns=turns,
        spoken=len(segments(caller)),
        stalled=stalled,
        sessions=len(sessions),
        sent_bytes=sent_bytes(bed, call),
        held_bytes=len(audio),
        utterances=[s.duration_s for s in segments(pcm, rate=16000)],
        replies=heard_playings(call.record),
        connections=len(record.connections),
        events=[f"{t:.3f} {kind} {detail}" for t, kind, detail in record.events],
    )


async def settle(bed: TestBed, call: SimulatedCall, limit_s: float = 15.0) -> None:
    """Let the service calm down, then keep the line open a moment: the session's newest
    lineage is then the connection carrying the call, not a replacement still being opened
    (whose replay a hang-up would cut short).

    No connection opened from now on ends on its own; wait until one connection is open,
    set up, with a long life ahead, and none is being set up."""
    emu = bed.emulator
    emu.config.lifetime, emu.config.abrupt_after = 3600.0, None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s

    def calm() -> bool:
        now = time.monotonic()
        open_ids = emu.open_connections()
        records = [c for c in emu.record.connections if c.id in open_ids]
        return (
            len(records) == 1
            and not emu.in_setup()
            and records[0].setup_completed_at is not None
            and (records[0].ends_at or 0.0) > now + 60
        )

    while not calm() and loop.time() < deadline and not call.closed:
        await call.silence(0.1)
    await call.silence(0.5)


async def run_call(
    bed: TestBed,
    turns: int,
    limit_s: float = 8.0,
    chaos: Chaos | None = None,
    until_disruptions: int = 0,
) -> Outcome:
    """One call of ``turns`` turns, and more (up to three times as many) until ``chaos`` has
    done ``until_disruptions``: its moments are drawn in wall-clock time and some find
    nothing to cut (no reply long enough left), more of them on a busy machine. A reply that
    never comes ends the call early (``stalled``). Then the disruptions stop, the line
    settles (:func:`settle`) and the caller hangs up."""
    call = await bed.caller(speed=SPEED).place_call()
    stalled = None
    most = 3 * turns
    try:
        await converse(call, turns, limit_s=limit_s)
        while chaos is not None and len(chaos.done) < until_disruptions and turns < most:
            turns += 1
            await converse(call, turns, limit_s=limit_s, first=turns)
    except TimeoutError as exc:
        stalled = str(exc)
    if chaos is not None:
        await chaos.stop()
    await settle(bed, call)
    await call.hangup()
    await asyncio.sleep(0.1)
    return outcome(bed, call, turns, stalled)
