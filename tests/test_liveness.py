"""Liveness of the Live connection: judged from anything received, never from a pong in time.

Real gateway, real google-genai SDK over TLS, the Live emulator playing a stalled service and
late pongs (`pong_delay`), the Twilio simulator calling.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.live import sdk
from gateway.server import live_http
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import quick_emulator, test_bed, test_settings
from gateway.testing.peers import say_and_hear
from gateway.testing.twilio_sim import SimulatedCall

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

SPEED = 2.0


def replies_heard(call: SimulatedCall) -> list[int]:
    total: dict[int, float] = {}
    for reply in heard_replies(call.record):
        total[reply.n] = total.get(reply.n, 0.0) + reply.duration_s
    return [n for n, heard_s in total.items() if heard_s >= 0.7]


def test_the_sdk_hands_the_keepalive_setting_to_websockets() -> None:
    args = live_http(test_settings("key")).async_client_args
    assert args == {"ping_interval": None, "compression": None}
    assert sdk.passes_socket_args(args)


async def test_a_connection_that_sends_nothing_more_is_resumed_after_the_stall_limit(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with test_bed(quick_emulator(SPEED), live_stall_s=1.0) as bed:
        emulator = bed.emulator
        call = await bed.caller(speed=SPEED).place_call()
        await say_and_hear(call, 1)
        [stalled] = emulator.open_connections()
        assert emulator.stall(stalled)
        since = time.monotonic()
        await eventually(lambda: stalled not in emulator.open_connections(), limit_s=5)
        noticed_s = time.monotonic() - since
        await say_and_hear(call, 2, freq=380.0)
        await call.hangup()

        assert replies_heard(call) == [1, 2]
        assert noticed_s >= 1.0  # not before the limit: a pong or a message was due
        assert logs.messages("gateway.live.session", "live: connection lost (nothing received")
        resumed = bed.metrics.registry.get_sample_value(
            "gateway_live_resumptions_total", {"cause": "abrupt"}
        )
        assert resumed == 1
        logs.assert_quiet()
