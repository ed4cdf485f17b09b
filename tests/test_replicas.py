"""Two real gateway replicas sharing one real Redis: what one knows of a call, the other does.

A load balancer may send any request to any replica: the voice webhook to one, the stream
to another, an answering-machine callback to a third. These tests put the requests where
a single replica's memory would not see them.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import ClientSession
from twilio.request_validator import RequestValidator

from gateway.server import STATE, start_draining
from gateway.store import RedisStore
from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.harness import AUTH_TOKEN, PUBLIC_URL, TestBed, quick_emulator
from gateway.testing.live_emulator import LiveEmulator
from gateway.testing.peers import closed_with, new_sid, say_and_hear, start_message, voice_params
from gateway.testing.replicas import processes, replicas
from gateway.testing.tls import make_tls
from gateway.testing.twilio_rest import RestRequest, TwilioRestStandIn
from gateway.testing.twilio_sim import CallRecord, SimulatedCall, TwilioCallerSimulator
from gateway.twilio.rest import TwilioRest

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

SIGNER = RequestValidator(AUTH_TOKEN)
STREAM_URL = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"


async def post_signed(bed: TestBed, path: str, params: dict[str, str]) -> tuple[int, str]:
    """A webhook as Twilio signs it, to this replica."""
    signature = SIGNER.compute_signature(PUBLIC_URL + path, params)
    async with bed.http.post(
        bed.gateway_url + path, data=params, headers={"X-Twilio-Signature": signature}
    ) as resp:
        return resp.status, await resp.text()


async def replay_start(bed: TestBed, http: ClientSession, start: str) -> tuple[int | None, str]:
    """Open a signed stream to this replica, send ``start``, read how it closes."""
    ws = await http.ws_connect(
        bed.gateway_url + "/twilio/media",
        headers={"X-Twilio-Signature": SIGNER.compute_signature(STREAM_URL, {})},
    )
    try:
        await ws.send_str(start)
        return await closed_with(ws)
    finally:
        await ws.close()


def process_env(redis_url: str) -> dict[str, str]:
    """What the `python -m gateway` replicas of these tests share: the Redis, a greeting
    (a continued call must not say it again), the test bed's compressed timing."""
    return {
        "REDIS_URL": redis_url,
        "GREETING": "Greet the caller.",
        "GOAWAY_MARGIN_S": "0.2",
        "CALLER_AUDIO_RATE": "4",
    }


def stream_errors(bed: TestBed, reason: str) -> float:
    value = bed.metrics.registry.get_sample_value("gateway_stream_errors_total", {"reason": reason})
    return value or 0.0


async def test_a_stream_token_is_single_use_on_every_replica(redis_url: str) -> None:
    async with replicas(2, redis_url, quick_emulator()) as (one, two):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await say_and_hear(call, 1)
        record = call.record
        replay = start_message(
            record.call_sid,
            record.custom_parameters,
            stream_sid=record.stream_sid,
            account_sid=record.account_sid,
        )
        # The same start on the other replica, while the call runs and after it ended.
        assert await replay_start(two, one.http, replay) == (1008, "stream token reused")
        # A replayed voice webhook: the other replica issues no token for the call.
        status, twiml = await post_signed(
            two, "/twilio/voice", voice_params(record.call_sid, record.account_sid)
        )
        assert status == 200 and ET.fromstring(twiml).find("./Reject") is not None
        await call.hangup()
        assert await replay_start(two, one.http, replay) == (1008, "stream token reused")
        assert stream_errors(two, "stream_token_reused") == 2
        assert len(one.emulator.record.connections) == 1  # one Live session, on replica one


async def test_a_token_issued_by_one_replica_opens_the_stream_on_another(
    redis_url: str, eventually: Eventually
) -> None:
    """The webhook on one, the stream on the other: the call goes on as usual."""
    async with replicas(2, redis_url, quick_emulator()) as (one, two):
        call_sid = new_sid("CA")
        status, twiml = await post_signed(one, "/twilio/voice", voice_params(call_sid))
        assert status == 200
        stream = ET.fromstring(twiml).find("./Connect/Stream")
        assert stream is not None
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.iter("Parameter")}
        start = start_message(call_sid, parameters)
        ws = await one.http.ws_connect(
            two.gateway_url + "/twilio/media",
            headers={"X-Twilio-Signature": SIGNER.compute_signature(STREAM_URL, {})},
        )
        try:
            await ws.send_str(start)
            await eventually(lambda: bool(two.app[STATE].calls))
            # Now a replay of the same start on replica one is refused.
            assert await replay_start(one, one.http, start) == (1008, "stream token reused")
        finally:
            await ws.close()


async def test_an_answering_machine_result_reaches_the_replica_holding_the_call(
    redis_url: str, eventually: Eventually
) -> None:
    async with replicas(2, redis_url, quick_emulator()) as (one, two):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        async with await caller.place_call() as call:
            await say_and_hear(call, 1)
            params = {
                "CallSid": call.record.call_sid,
                "AccountSid": call.record.account_sid,
                "AnsweredBy": "human",
                "MachineDetectionDuration": "2210",
            }
            assert await post_signed(two, "/twilio/amd", params) == (204, "")
            labels = {"persona": "default", "answered_by": "human"}
            await eventually(
                lambda: one.metrics.registry.get_sample_value("gateway_answered_by_total", labels)
            )
            assert two.metrics.registry.get_sample_value("gateway_answered_by_total", labels) in (
                None,
                0.0,
            )


async def test_a_caller_spread_over_replicas_is_served(redis_url: str) -> None:
    """Through a load balancer: the webhook on one replica, the stream on the other."""
    async with replicas(2, redis_url, quick_emulator()) as (one, two):
        bases = [one.gateway_url, two.gateway_url]
        caller = TwilioCallerSimulator(one.http, bases, PUBLIC_URL, AUTH_TOKEN, speed=2)
        async with await caller.place_call() as call:
            await say_and_hear(call, 1)
            assert len(two.app[STATE].calls) == 1 and not one.app[STATE].calls


async def test_the_connect_action_ends_a_call_whose_stream_ended(redis_url: str) -> None:
    """The gateway closes the stream (its Live session failed for good): Twilio asks the
    action, on whichever replica, and gets an empty <Response/>: the call ends."""
    async with replicas(2, redis_url, quick_emulator(), reconnect_total_s=1.0) as (one, two):
        bases = [one.gateway_url, two.gateway_url]
        caller = TwilioCallerSimulator(one.http, bases, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await say_and_hear(call, 1)
        one.emulator.refuse_connections(until=time.monotonic() + 3600)
        await one.emulator.cut_all(abrupt=True)
        await call.wait_closed(timeout=15)
        record = call.record
        assert record.close_code == 1011 and len(record.streams) == 1
        (action,) = [c for c in record.callbacks if c[0] == "action"]
        assert action[1] == "/twilio/connect-action" and action[3] == 200
        assert action[2]["CallSid"] == record.call_sid
        assert "action_ended_call" in [kind for _, kind, _ in record.events]
        await call.hangup()


@pytest.mark.parametrize(
    ("path", "status"), [("/twilio/connect-action", 200), ("/twilio/stream-status", 204)]
)
async def test_the_connect_action_and_stream_status_are_signature_checked(
    redis_url: str, path: str, status: int
) -> None:
    """Signed: answered (a stream-error of a call no replica held: nothing to recover);
    forged: 403."""
    async with replicas(1, redis_url, quick_emulator()) as (one,):
        params = {**voice_params(new_sid("CA")), "StreamEvent": "stream-error"}
        assert (await post_signed(one, path, params))[0] == status
        async with one.http.post(
            one.gateway_url + path, data=params, headers={"X-Twilio-Signature": "forged"}
        ) as resp:
            assert resp.status == 403
        assert hand_offs(one, "recovered") == 0


# ------------------------------------------------------------------ hand-off on a drain


def hand_offs(bed: TestBed, outcome: str) -> float:
    value = bed.metrics.registry.get_sample_value("gateway_hand_offs_total", {"outcome": outcome})
    return value or 0.0


async def test_a_draining_replica_hands_its_call_to_another(
    redis_url: str, eventually: Eventually, logs: LogCapture
) -> None:
    """SIGTERM's drain with another replica ready: at the call's next pause the stream
    closes, Twilio asks the action (the load balancer no longer sends to the draining
    replica), and the call goes on there: same Live session, no second greeting, the model's
    replies numbered on from where they were; its answering-machine result and its
    duration (counted once, where the call ends) come along."""
    greeting = "Greet the caller."
    async with replicas(2, redis_url, quick_emulator(), greeting=greeting) as (one, two):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await await_reply(call, 1, limit_s=15)  # the greeting
        await say_and_hear(call, 2)
        (first,) = one.app[STATE].calls
        amd = {**voice_params(call.record.call_sid, call.record.account_sid), "AnsweredBy": "human"}
        assert await post_signed(one, "/twilio/amd", amd) == (204, "")
        assert first.stats.answered_by == "human"
        caller.set_bases(two.gateway_url)
        start_draining(one.app)
        await keep_talking_until(call, lambda: len(call.record.streams) == 2)
        await eventually(lambda: bool(two.app[STATE].calls))
        (second,) = two.app[STATE].calls
        # Its limits go on: the tokens so far and the call's age came along.
        assert second.usage.total_tokens >= first.usage.total_tokens > 0
        assert second.usage.by_kind.keys() >= first.usage.by_kind.keys()
        assert second.stats.started_at <= first.stats.started_at + 0.5
        assert second.stats.answered_by == "human"
        await say_and_hear(call, 3, freq=410.0)
        await call.hangup()
        await eventually(lambda: not one.app[STATE].calls and not two.app[STATE].calls)
        whole = time.monotonic() - first.stats.started_at

    def durations(bed: TestBed) -> tuple[float, float]:
        sample = bed.metrics.registry.get_sample_value
        name = "gateway_call_duration_seconds"
        return sample(f"{name}_count") or 0.0, sample(f"{name}_sum") or 0.0

    assert durations(one) == (0.0, 0.0)  # handed off: the call did not end there
    count, seconds = durations(two)
    assert count == 1 and whole - 1.0 < seconds <= whole, (seconds, whole)

    assert hand_offs(one, "handed_off") == 1 and hand_offs(two, "continued") == 1
    (session,) = one.emulator.record.sessions.values()  # resumed, never a fresh one
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.5][:3] == [1, 2, 3]
    resumed = [c for c in one.emulator.record.connections if c.resumed_from is not None]
    assert resumed, "the second replica resumed the session from the stored handle"
    actions = [c for c in call.record.callbacks if c[0] == "action"]
    assert [status for *_, status in actions] == [200]  # the hand-off; the caller hung up
    (gap,) = logs.messages("gateway.server", "call continued here")
    assert "after its state was stored" in gap
    assert logs.messages("gateway.server", "handed off") == ["handed off at a pause"]
    assert call.record.closed_by == "caller"


async def test_a_stream_sent_back_to_the_draining_replica_is_handed_on(
    redis_url: str, eventually: Eventually
) -> None:
    """The load balancer has not caught up with the drain (HAND_OFF_DELAY_S 0): the
    hand-off's next stream comes back to the draining replica, which takes it and hands it
    on at its first pause; once the balancer sends elsewhere, the call lands there, still
    in its Live session, greeted once."""
    greeting = "Greet the caller."
    config = quick_emulator()
    async with replicas(2, redis_url, config, greeting=greeting, hand_off_delay_s=0.0) as (
        one,
        two,
    ):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await await_reply(call, 1, limit_s=15)  # the greeting
        await say_and_hear(call, 2)
        start_draining(one.app)
        await keep_talking_until(call, lambda: len(call.record.streams) == 2)
        caller.set_bases(two.gateway_url)  # the balancer caught up
        await keep_talking_until(call, lambda: len(call.record.streams) == 3)
        await eventually(lambda: bool(two.app[STATE].calls))
        await say_and_hear(call, 3, freq=410.0)
        await call.hangup()
        await eventually(lambda: not one.app[STATE].calls and not two.app[STATE].calls)

    assert hand_offs(one, "handed_off") == 2 and hand_offs(one, "continued") == 1
    assert hand_offs(two, "continued") == 1
    (session,) = one.emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.5][:3] == [1, 2, 3]


async def test_a_stream_lost_with_its_replica_alive_keeps_its_call(
    redis_url: str, eventually: Eventually
) -> None:
    """The line between Twilio and the replica breaks (an ingress restarts): both ends see
    the stream end with no close frame. The replica keeps the call as a hand-off of its
    newest state, and Twilio's action, on the other replica, goes on with it there: same
    Live session, greeted once."""
    greeting = "Greet the caller."
    async with replicas(2, redis_url, quick_emulator(), greeting=greeting) as (one, two):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await await_reply(call, 1, limit_s=15)  # the greeting
        await say_and_hear(call, 2)
        caller.set_bases(two.gateway_url)
        await call.lose_stream()
        await keep_talking_until(call, lambda: len(call.record.streams) == 2)
        await eventually(lambda: bool(two.app[STATE].calls))
        await say_and_hear(call, 3, freq=410.0)
        await call.hangup()
        await eventually(lambda: not one.app[STATE].calls and not two.app[STATE].calls)

    assert hand_offs(one, "stream_lost") == 1 and hand_offs(two, "continued") == 1
    assert hand_offs(two, "recovered") == 0  # its newest state, not a checkpoint
    (session,) = one.emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.5][:3] == [1, 2, 3]
    said = [(kind, form.get("StreamEvent")) for kind, _, form, _ in call.record.callbacks]
    assert ("status", "stream-error") in said and ("action", None) in said


async def keep_talking_until(call: SimulatedCall, done: Callable[[], bool]) -> None:
    """Keep the line open (silence, as Twilio streams it) until `done()` holds."""
    async with asyncio.timeout(20):
        while not done():
            await call.silence(0.1)


async def test_a_lone_replica_drains_as_before(redis_url: str, eventually: Eventually) -> None:
    """No other replica ready: the call stays and goes on."""
    async with replicas(1, redis_url, quick_emulator()) as (one,):
        caller = TwilioCallerSimulator(one.http, one.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=2)
        call = await caller.place_call()
        await say_and_hear(call, 1)
        start_draining(one.app)
        await say_and_hear(call, 2, freq=410.0)
        assert len(call.record.streams) == 1 and hand_offs(one, "handed_off") == 0
        await call.hangup()


# ------------------------------------------------------------ two `python -m gateway`


async def test_sigterm_hands_a_call_to_the_other_process(redis_url: str) -> None:
    """Two real gateway processes sharing Redis: SIGTERM to the one holding a call; it
    hands the call off at a pause and exits, the other carries the same Live session on."""
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        config = quick_emulator(speed=2.0, handle_interval=0.3)
        async with (
            LiveEmulator(config, tls) as emulator,
            processes(
                2,
                emulator,
                tls.ca_pem_path,
                **process_env(redis_url),
            ) as (one, two),
            aiohttp.ClientSession() as http,
        ):
            store = RedisStore(redis_url)
            try:
                for _ in range(200):  # both have said they take calls
                    if await store.others_ready("the test") == 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await store.aclose()
            caller = TwilioCallerSimulator(http, one.url, PUBLIC_URL, AUTH_TOKEN, speed=2)
            call = await caller.place_call()
            await await_reply(call, 1, limit_s=15)  # the greeting
            await say_and_hear(call, 2)
            caller.set_bases(two.url)  # the load balancer: the draining one is out
            one.proc.send_signal(signal.SIGTERM)
            await keep_talking_until(call, lambda: len(call.record.streams) == 2)
            await say_and_hear(call, 3, freq=410.0)
            assert await one.exit_code(15.0) == 0  # in seconds: its call is elsewhere
            await call.hangup()
            two.proc.send_signal(signal.SIGTERM)
            assert await two.exit_code(15.0) == 0

    assert "handed off at a pause" in one.messages(), one.output[-3000:]
    continued = [m for m in two.messages() if m.startswith("call continued here")]
    assert len(continued) == 1, two.output[-3000:]
    (session,) = emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.5][:3] == [1, 2, 3]


@pytest.mark.parametrize("status_delay_s", [0.0, 6.0])
async def test_a_call_goes_on_after_its_process_is_killed(
    redis_url: str, status_delay_s: float
) -> None:
    """SIGKILL to the process holding a call: Twilio (the simulator, going on to the
    action after a lost stream) asks the other process, which continues the call from its
    last checkpoint: the same Live session, no second greeting. It goes on at once when
    the stream's stream-error came first; when the action comes first (the status callback
    6 s later), once the dead process is seen gone."""
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        config = quick_emulator(speed=2.0, handle_interval=0.3)
        async with (
            LiveEmulator(config, tls) as emulator,
            processes(
                2,
                emulator,
                tls.ca_pem_path,
                **process_env(redis_url),
            ) as (one, two),
            aiohttp.ClientSession() as http,
        ):
            caller = TwilioCallerSimulator(
                http, one.url, PUBLIC_URL, AUTH_TOKEN, speed=2, stream_status_delay_s=status_delay_s
            )
            call = await caller.place_call()
            await await_reply(call, 1, limit_s=15)  # the greeting
            await say_and_hear(call, 2)
            await call.silence(4.0)  # a checkpoint holds reply 2 (stored every second)
            caller.set_bases(two.url)
            one.proc.kill()
            await keep_talking_until(call, lambda: len(call.record.streams) == 2)
            await say_and_hear(call, 3, freq=410.0)
            await call.hangup()
            two.proc.send_signal(signal.SIGTERM)
            assert await two.exit_code(15.0) == 0

    recovered = [m for m in two.messages() if m.startswith("the call's replica is gone")]
    assert len(recovered) == 1, two.output[-3000:]
    said = [(kind, form.get("StreamEvent")) for kind, _, form, _ in call.record.callbacks]
    error_first = ("status", "stream-error") in said[: said.index(("action", None))]
    assert error_first == (status_delay_s == 0), said
    (session,) = emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    closed = [detail for _, kind, detail in call.record.events if kind == "stream_closed"]
    assert closed[0] in ("1006 gateway", "None gateway"), closed


@asynccontextmanager
async def redirecting_rest() -> AsyncIterator[
    tuple[TwilioRestStandIn, TwilioRest, list[TwilioCallerSimulator]]
]:
    """Twilio's REST API as a stand-in that, as Twilio does, moves a call it is told to
    redirect on to the new TwiML (a call of any caller simulator put in the yielded list)."""
    callers: list[TwilioCallerSimulator] = []
    redirects: list[asyncio.Task[None]] = []

    async def twilio_redirects(request: RestRequest) -> None:
        for caller in callers:
            call = caller.calls.get(request.call_sid or "")
            if call is not None and "Twiml" in request.form:
                redirects.append(asyncio.create_task(call.redirect(request.form["Twiml"])))

    async with TwilioRestStandIn(AUTH_TOKEN) as stand_in:
        stand_in.on_request = twilio_redirects
        rest = TwilioRest(AUTH_TOKEN, http_client=stand_in.http_client())
        try:
            yield stand_in, rest, callers
            await asyncio.gather(*redirects)
        finally:
            await rest.close()


def assert_redirected_once(stand_in: TwilioRestStandIn, record: CallRecord) -> None:
    """The call went on by one REST redirect to a new stream, never by the action."""
    assert [kind for _, kind, _ in record.events].count("awaiting_redirect") == 1
    assert not [c for c in record.callbacks if c[0] == "action"]  # no action was asked
    (redirect,) = stand_in.record.updates(record.call_sid)
    assert "<Stream" in redirect.form["Twiml"]


async def test_a_lost_stream_goes_on_by_a_rest_redirect(redis_url: str) -> None:
    """Twilio does not ask the action after a lost stream (the simulator's knob: the call
    stays up with no stream): the stream's status callback reports stream-error, and the
    replica that gets it, once the killed process is seen gone, redirects the call through
    the REST API to a new stream, which goes on with the same Live session."""
    config = quick_emulator(speed=2.0, handle_interval=0.3)
    async with redirecting_rest() as (stand_in, rest, callers):
        async with (
            replicas(1, redis_url, config, rest=rest, greeting="Greet the caller.") as (two,),
            processes(
                1,
                two.emulator,
                two.emulator.tls.ca_pem_path if two.emulator.tls else "",
                **process_env(redis_url),
            ) as (one,),
        ):
            caller = TwilioCallerSimulator(
                two.http,
                one.url,
                PUBLIC_URL,
                AUTH_TOKEN,
                speed=2,
                action_after_abnormal_close=False,
            )
            callers.append(caller)
            call = await caller.place_call()
            await await_reply(call, 1, limit_s=15)  # the greeting
            await say_and_hear(call, 2)
            await call.silence(4.0)  # a checkpoint holds reply 2 (stored every second)
            caller.set_bases(two.gateway_url)
            one.proc.kill()
            await keep_talking_until(call, lambda: len(call.record.streams) == 2)
            await say_and_hear(call, 3, freq=410.0)
            await call.hangup()

    record = call.record
    assert_redirected_once(stand_in, record)
    assert hand_offs(two, "recovered") == 1 and hand_offs(two, "continued") == 1
    (session,) = two.emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting


async def test_a_stream_lost_with_its_replica_alive_goes_on_by_a_rest_redirect(
    redis_url: str,
) -> None:
    """The line breaks and Twilio does not ask the action (the call stays up with no
    stream): the replica kept the call as a hand-off, and the one that gets the stream's
    stream-error, once the action had its time, redirects the call to a new stream, which
    goes on from that newest state."""
    async with redirecting_rest() as (stand_in, rest, callers):
        async with replicas(
            2, redis_url, quick_emulator(), rest=rest, greeting="Greet the caller."
        ) as (one, two):
            caller = TwilioCallerSimulator(
                one.http,
                one.gateway_url,
                PUBLIC_URL,
                AUTH_TOKEN,
                speed=2,
                action_after_abnormal_close=False,
            )
            callers.append(caller)
            call = await caller.place_call()
            await await_reply(call, 1, limit_s=15)  # the greeting
            await say_and_hear(call, 2)
            caller.set_bases(two.gateway_url)
            await call.lose_stream()
            await keep_talking_until(call, lambda: len(call.record.streams) == 2)
            await say_and_hear(call, 3, freq=410.0)
            await call.hangup()

    record = call.record
    assert_redirected_once(stand_in, record)
    assert hand_offs(one, "stream_lost") == 1 and hand_offs(two, "continued") == 1
    assert hand_offs(two, "recovered") == 0
    (session,) = one.emulator.record.sessions.values()
    assert [t.trigger for t in session.turns].count("text") == 1  # one greeting
    assert [r.n for r in heard_replies(record) if r.duration_s > 0.5][:3] == [1, 2, 3]
