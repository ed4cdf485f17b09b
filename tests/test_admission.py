"""Admission: every signed stream is taken while there is call capacity, however many come at
once; the webhook and the stream agree on capacity; streams that never start still go.

The bookkeeping (`gateway.admission`) on a clock of its own; then the real gateway on real
loopback sockets, against the Twilio simulator and the Live emulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import select
import socket
import time
import xml.etree.ElementTree as ET
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from gateway.admission import Admission
from gateway.server import STATE, listen_backlog
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import AUTH_TOKEN, PUBLIC_URL, TestBed, quick_emulator, test_bed
from gateway.testing.peers import (
    ACCOUNT_SID,
    closed_with,
    new_sid,
    say_and_hear,
    start_message,
    voice_params,
)
from gateway.testing.twilio_sim import CallRecord, SimulatedCall
from gateway.twilio.webhooks import StreamTokens

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

SPEED = 2.0
VOICE_URL = PUBLIC_URL + "/twilio/voice"
STATUS_URL = PUBLIC_URL + "/twilio/status"
STREAM_URL = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
SIGNER = RequestValidator(AUTH_TOKEN)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ bookkeeping


def test_reservations_fill_capacity_and_expire() -> None:
    clock = Clock()
    admission: Admission[str] = Admission(3, reservation_s=60.0, grace_s=1.0, clock=clock)
    assert admission.reserve("CA1", calls=1) and admission.reserve("CA2", calls=1)
    assert admission.full(calls=1) and not admission.reserve("CA3", calls=1)
    assert admission.reserve("CA2", calls=1)  # Twilio retried the webhook: the same slot
    assert admission.reserved == 2
    admission.release("CA1")  # Twilio: the call is over before its stream started
    assert admission.reserve("CA3", calls=1)
    clock.now += 60.0
    assert admission.reserved == 0 and not admission.full(calls=1)


def test_a_reserved_call_starts_whatever_started_meanwhile() -> None:
    admission: Admission[str] = Admission(2, reservation_s=60.0, grace_s=1.0, clock=Clock())
    assert admission.reserve("CA1", calls=0) and admission.reserve("CA2", calls=0)
    # A stream whose webhook went elsewhere (another replica): no slot is free here.
    assert not admission.start("CA9", calls=0)
    assert admission.start("CA1", calls=0)
    assert admission.start("CA2", calls=1)
    assert admission.reserved == 0 and not admission.start("CA9", calls=2)
    assert admission.start("CA9", calls=1)  # one call ended


def test_a_burst_waits_whole_and_only_streams_quiet_past_the_grace_make_room() -> None:
    clock = Clock()
    admission: Admission[str] = Admission(4, reservation_s=60.0, grace_s=1.0, clock=clock)
    # Eight at once while four could start: none quiet for the grace yet, all wait.
    assert [admission.wait(f"s{i}", calls=0) for i in range(8)] == [[]] * 8
    clock.now += 0.5
    assert admission.left("s0") == pytest.approx(0.5)  # started
    assert admission.left("s0") is None
    clock.now += 0.5
    # One call in progress, three could start: the oldest quiet for 1 s go (s1..s5), the
    # newcomer waits with s6 and s7.
    assert admission.wait("s8", calls=1) == ["s1", "s2", "s3", "s4", "s5"]
    assert list(admission.waiting) == ["s6", "s7", "s8"]
    assert admission.left("s1") is None  # evicted: its handler's own leave changes nothing
    assert admission.may_upgrade(calls=3) and not admission.may_upgrade(calls=4)


# ------------------------------------------------------------ real sockets


def replies_heard(call: SimulatedCall) -> list[int]:
    total: dict[int, float] = {}
    for reply in heard_replies(call.record):
        total[reply.n] = total.get(reply.n, 0.0) + reply.duration_s
    return [n for n, heard_s in total.items() if heard_s >= 0.7]


async def open_idle(bed: TestBed) -> aiohttp.ClientWebSocketResponse:
    """A signed upgrade (the same for every call) that never says anything."""
    signature = SIGNER.compute_signature(STREAM_URL, {})
    return await bed.http.ws_connect(
        bed.gateway_url + "/twilio/media", headers={"X-Twilio-Signature": signature}
    )


async def post_form(bed: TestBed, url: str, params: dict[str, str]) -> str:
    signature = SIGNER.compute_signature(url, params)
    path = url.removeprefix(PUBLIC_URL)
    async with bed.http.post(
        bed.gateway_url + path, data=params, headers={"X-Twilio-Signature": signature}
    ) as resp:
        assert resp.status in (200, 204), resp.status
        return await resp.text()


def busy(twiml: str) -> bool:
    reject = ET.fromstring(twiml).find("Reject")
    return reject is not None and reject.get("reason") == "busy"


async def test_a_burst_of_100_streams_all_complete_while_idle_upgrades_meet_their_deadline(
    logs: LogCapture,
) -> None:
    deadline_s = 2.0
    async with test_bed(quick_emulator(SPEED), max_calls=120, start_timeout_s=deadline_s) as bed:
        sim = bed.caller(speed=SPEED)
        answered: list[CallRecord] = await asyncio.gather(*(sim.answer() for _ in range(100)))
        # All 100 streams and 20 that never start, at the same moment: as many wait as could
        # start, so only the deadline closes the 20.
        opened = time.monotonic()
        both = await asyncio.gather(
            asyncio.gather(*(sim.open_stream(record) for record in answered)),
            asyncio.gather(*(open_idle(bed) for _ in range(20))),
        )
        calls: list[SimulatedCall] = both[0]
        idle: list[aiohttp.ClientWebSocketResponse] = both[1]
        idle_closed = asyncio.gather(*(closed_with(ws) for ws in idle))
        await asyncio.gather(*(say_and_hear(call, 1) for call in calls))
        await asyncio.gather(*(call.hangup() for call in calls))
        closes = await idle_closed
        idle_s = time.monotonic() - opened

        for call in calls:
            assert replies_heard(call) == [1], heard_replies(call.record)
            assert call.record.protocol_errors == []
            assert call.record.closed_by == "caller"
        assert closes == [(1008, "no start before the deadline")] * 20
        assert idle_s >= deadline_s
        assert len(bed.emulator.record.connections) == 100
        state = bed.app[STATE]
        started = bed.metrics.registry.get_sample_value("gateway_stream_start_wait_seconds_count")
        assert started == 100
        assert state.admission.waiting == {} and state.admission.reserved == 0
        closed = Counter(logs.messages("gateway.server", "stream closed: "))
        assert closed == {"stream closed: no start before the deadline": 20}
        logs.assert_quiet()


async def test_the_kernel_holds_a_whole_burst_while_the_event_loop_is_busy() -> None:
    """A burst's connections arrive while the event loop is busy (here: held by this test).
    The kernel completes each handshake itself and queues it up to the listen backlog; with
    the usual 128, ~170 of these 300 had their SYN dropped and sent again a second later."""
    count = 300
    async with test_bed(quick_emulator(SPEED), max_calls=count // 2) as bed:
        assert listen_backlog(count // 2) == count
        address = urlsplit(bed.gateway_url)
        peers = [socket.socket() for _ in range(count)]
        poller = select.poll()
        for peer in peers:
            peer.setblocking(False)
            peer.connect_ex((address.hostname, address.port))
            poller.register(peer, select.POLLOUT)
        pending = {peer.fileno() for peer in peers}
        until = time.monotonic() + 0.5  # half the SYN's retry: no connection waited for it
        while pending and time.monotonic() < until:
            for fd, _ in poller.poll(50):
                pending.discard(fd)
                poller.unregister(fd)
        assert len(pending) == 0, len(pending)
        assert [p.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for p in peers] == [0] * count
        for peer in peers:
            peer.close()


async def test_a_call_that_got_its_twiml_gets_its_stream(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with test_bed(quick_emulator(SPEED), max_calls=2) as bed:
        sim = bed.caller(speed=SPEED)
        first, second = await sim.answer(), await sim.answer()
        # Both slots are held for those streams: a third call is busy, readiness says so.
        assert busy(await post_form(bed, VOICE_URL, voice_params(new_sid("CA"))))
        async with bed.http.get(bed.gateway_url + "/readyz") as resp:
            assert resp.status == 503
        # A stream whose webhook another replica answered (a token for the same secret)
        # finds no slot free here: 1013, and nothing opened upstream.
        secret = hmac.new(AUTH_TOKEN.encode(), b"gateway-stream-token", hashlib.sha256).digest()
        elsewhere = new_sid("CA")
        token = StreamTokens(secret).issue(elsewhere, account_sid=ACCOUNT_SID, persona="default")
        stray = await open_idle(bed)
        await stray.send_str(start_message(elsewhere, {"token": token, "persona": "default"}))
        assert await closed_with(stray) == (1013, "at call limit")
        assert bed.emulator.record.connections == []

        calls = [await sim.open_stream(first), await sim.open_stream(second)]
        await asyncio.gather(*(say_and_hear(call, 1) for call in calls))
        await calls[0].hangup()
        await eventually(lambda: len(bed.app[STATE].calls) == 1)
        # A slot is free again: the next call gets its stream.
        third = await sim.place_call()
        await say_and_hear(third, 1)
        for call in (calls[1], third):
            await call.hangup()
        assert all(replies_heard(call) == [1] for call in (*calls, third))
        logs.assert_quiet()


async def test_a_reservation_ends_with_the_call_or_its_token(logs: LogCapture) -> None:
    async with test_bed(quick_emulator(SPEED), max_calls=1, stream_token_ttl_s=1.0) as bed:
        sim = bed.caller(speed=SPEED)
        answered = await sim.answer()
        assert busy(await post_form(bed, VOICE_URL, voice_params(new_sid("CA"))))
        # The caller hung up before the stream started: Twilio's final status frees the slot.
        await post_form(
            bed,
            STATUS_URL,
            {"CallSid": answered.call_sid, "CallStatus": "canceled", "AccountSid": ACCOUNT_SID},
        )
        unstreamed = await sim.answer()
        assert bed.app[STATE].admission.reserved == 1
        # No stream within the token's life: the slot is free again, and that token is dead.
        await asyncio.sleep(1.1)
        call = await sim.place_call()
        await say_and_hear(call, 1)
        await call.hangup()
        assert replies_heard(call) == [1]
        assert unstreamed.call_sid != call.record.call_sid
        logs.assert_quiet()
