"""What the feature tests share (tests/test_features.py, tests/test_budget.py,
tests/test_billing.py): the personas they configure, a test bed whose Twilio REST requests
go to a stand-in, and the caller's and the scrape's side of a call.

One definition of each, so a persona or a wait changes in one place for every test that
places a call to one of these numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.harness import AUTH_TOKEN, TestBed, quick_emulator, test_bed
from gateway.testing.live_emulator import EmulatorConfig
from gateway.testing.twilio_rest import RestRequest, TwilioRestStandIn
from gateway.testing.twilio_sim import SimulatedCall
from gateway.twilio.rest import TwilioRest

SPEED = 2.0
REPLY_S = 0.8
SALES = "+15550100011"
SUPPORT = "+15550100012"
GREETING = "Greet the caller and ask how you can help."
WRAP_UP = "Time is up: say goodbye."
PRICES = {"prompt_audio": 3.0, "prompt_text": 0.5, "response_audio": 12.0}
# Two numbers: sales greets and has both tools, support waits for the caller.
PERSONAS: dict[str, Any] = {
    "sales": {
        "numbers": [SALES],
        "system_instruction": "You sell things.",
        "voice": "Kore",
        "language": "en-US",
        "greeting": GREETING,
        "tools": ["end_call", "transfer_call"],
        "transfer_to": {"desk": "+15550100099", "pbx": "sip:desk@pbx.example.com"},
    },
    "support": {"numbers": [SUPPORT], "system_instruction": "You fix things."},
}


def limited(**keys: Any) -> dict[str, Any]:
    """The sales persona (it greets) with these keys, and no tools."""
    return {"sales": {**PERSONAS["sales"], "tools": [], **keys}}


def emulator_config(**overrides: Any) -> EmulatorConfig:
    return quick_emulator(
        **{"speed": SPEED, "reply_s": REPLY_S, "handle_interval": 0.3, **overrides}
    )


@asynccontextmanager
async def bed_with_rest(
    config: EmulatorConfig, personas: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[tuple[TestBed, TwilioRestStandIn]]:
    """A test bed with `personas` (PERSONAS unless given) whose REST requests go to a
    stand-in that, like Twilio, ends the media stream of a call it hangs up or redirects
    (any call the bed's callers placed, however soon after its start the request comes)."""
    beds: list[TestBed] = []
    ended: list[asyncio.Task[None]] = []

    async def twilio_ends_stream(request: RestRequest) -> None:
        call = beds[0].placed_call(request.call_sid) if beds else None
        if call is not None and (
            request.form.get("Status") == "completed" or "Twiml" in request.form
        ):
            ended.append(asyncio.create_task(call.hangup()))

    async with TwilioRestStandIn(AUTH_TOKEN) as rest:
        rest.on_request = twilio_ends_stream
        client = TwilioRest(AUTH_TOKEN, http_client=rest.http_client())
        try:
            table = PERSONAS if personas is None else personas
            async with test_bed(config, personas=table, rest=client, **settings) as bed:
                beds.append(bed)
                yield bed, rest
                await asyncio.gather(*ended)
        finally:
            await client.close()


async def keep_line_open(
    call: SimulatedCall, until: Callable[[], bool], limit_s: float = 20.0
) -> None:
    """Stream silence, as Twilio does, until `until()` holds."""
    deadline = time.monotonic() + limit_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        assert not call.closed, "call closed"
        await call.silence(0.1)


async def until_hung_up(rest: TwilioRestStandIn, call: SimulatedCall) -> None:
    """Keep the line open until the gateway ends `call` over REST (or its stream closes),
    then until the stream is closed (a call of `bed_with_rest`'s dict: Twilio closes it)."""
    await keep_line_open(call, lambda: bool(rest.record.updates()) or call.closed)
    await call.wait_closed(10)


def last_mark_echoed(call: SimulatedCall) -> float:
    """When the caller's side confirmed the last reply had played (Twilio's mark echo)."""
    return call.record.marks_echoed[-1][0]


def user_turns(bed: TestBed) -> list[str]:
    """The text turns the model got (greeting, instructions, keys), in order."""
    (session,) = bed.emulator.record.sessions.values()
    return [
        text for role, text in session.history_text if role == "user" and "utterance" not in text
    ]


async def scrape(bed: TestBed) -> str:
    """The gateway's /metrics page."""
    async with bed.http.get(bed.gateway_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def metric(text: str, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels` in a /metrics page; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
