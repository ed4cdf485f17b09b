"""Prometheus metrics of the gateway, one registry per app.

Labels are low-cardinality by design: causes, outcomes, reasons and
directions, never a CallSid, StreamSid or phone number.

The three families touched for every 20 ms frame (caller frames, model audio seconds, added
latency) are plain numbers added to on the event loop's thread and read when /metrics is
scraped (on that same thread): prometheus_client's own Counter.inc and Histogram.observe take
a lock each time (0.6 and 2.2 us here, ~2% of the gateway's CPU at 100 calls, python -m bench),
against 0.1 and 0.2 us. They are exported under the same names, types and buckets.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The bucket bounds as prometheus_client spells them ("0.00025", "1.0", "+Inf").
_go_float = cast(Callable[[float], str], floatToGoString)

# Fine below 50 ms, so p50 / p99 of the added latency can be read off them (python -m bench).
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
GAP_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A collection holds the event loop, and every call's audio with it: from a fraction of a ms
# (the youngest generation) to tens of ms for a full one over a large heap.
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class LoopCounter:
    """A counter for the per-frame paths: no lock, so only the event loop's thread adds."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """A histogram for the per-frame paths: no lock, so only the event loop's thread observes."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i: value <= bounds[i]
        self.sum += value


class LoopHistogramFamily:
    """A labelled family of `LoopHistogram`s, with prometheus_client's ``labels`` call."""

    def __init__(self, label: str, bounds: Sequence[float]) -> None:
        self.label = label
        self.bounds = tuple(bounds)
        self.le = [_go_float(b) for b in (*self.bounds, float("inf"))]
        self.children: dict[str, LoopHistogram] = {}

    def labels(self, **value: str) -> LoopHistogram:
        (key,) = value.values()
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = LoopHistogram(self.bounds)
        return child


class _LoopCollector(Collector):
    """Exports the loop-only counters and histograms at scrape time."""

    def __init__(
        self,
        counters: dict[str, tuple[str, LoopCounter]],
        histograms: dict[str, tuple[str, LoopHistogramFamily]],
    ) -> None:
        self._counters = counters
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        for name, (doc, counter) in self._counters.items():
            yield CounterMetricFamily(name, doc, value=counter.value)
        for name, (doc, family) in self._histograms.items():
            metric = HistogramMetricFamily(name, doc, labels=[family.label])
            for key, child in sorted(family.children.items()):
                cumulative, buckets = 0, []
                for le, count in zip(family.le, child.counts, strict=True):
                    cumulative += count
                    buckets.append((le, float(cumulative)))
                metric.add_metric([key], buckets, child.sum)
            yield metric


class ReplicaMetrics:
    """The replica as a whole: whether it takes calls, its backend's answers, its Python's
    pauses and the calls it hands to or takes from other replicas. An operator's first
    look, and what a load balancer or a drain acts on."""

    def __init__(self, r: CollectorRegistry) -> None:
        # Read at each scrape from the app's state (the server sets their functions).
        self.ready = Gauge(
            "gateway_ready",
            "1 while /readyz answers 200, else 0 (draining, at MAX_CALLS, backend refusing)",
            registry=r,
        )
        self.draining = Gauge("gateway_draining", "1 once the replica drains (SIGTERM)", registry=r)
        self.backend_refusing = Gauge(
            "gateway_live_backend_refusing",
            "1 while the Live backend refuses the key or a model (its models API says so)",
            registry=r,
        )
        self.backend_checks = Counter(
            "gateway_live_backend_checks",
            "Answers of the backend's models API about the key and each model, by result",
            ["result"],
            registry=r,
        )
        self.sdk_path = Gauge(
            "gateway_sdk_fast_path",
            "1 for the google-genai path in use: fast (private names checked at start) or public",
            ["path"],
            registry=r,
        )
        self.gc_pause = Histogram(
            "gateway_gc_pause_seconds",
            "How long each garbage collection held the process (and its event loop), by generation",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=r,
        )
        self.hand_offs = Counter(
            "gateway_hand_offs",
            "Calls handed off to another replica on a drain (handed_off, here), continued "
            "from another replica's hand-off or checkpoint (continued), taken over from a "
            "replica that died (recovered), kept for its next stream when its stream was "
            "lost with this replica alive (stream_lost), or kept for a store failure (failed)",
            ["outcome"],
            registry=r,
        )


class AdmissionMetrics:
    """The front door, before a call runs: what any peer can do to the listening socket
    (before a signature is checked), the requests and streams refused, and the streams
    and slots waiting for a start."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.connections_open = Gauge(
            "gateway_connections_open",
            "Client connections open (HTTP and media streams)",
            registry=r,
        )
        self.connections_closed = Counter(
            "gateway_connections_closed",
            "Connections closed for holding a socket without a request, by reason",
            ["reason"],
            registry=r,
        )
        self.peer_errors = Counter(
            "gateway_peer_errors",
            "Requests aiohttp refused as malformed, or cut off by the peer, by kind",
            ["reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "gateway_accept_errors",
            "Connections the listening socket could not accept, by errno",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "gateway_requests_rejected", "Requests refused, by reason", ["reason"], registry=r
        )
        self.stream_errors = Counter(
            "gateway_stream_errors",
            "Streams closed for bad input, by reason",
            ["reason"],
            registry=r,
        )
        self.streams_waiting = Gauge(
            "gateway_streams_waiting", "Media streams upgraded but not started yet", registry=r
        )
        self.calls_reserved = Gauge(
            "gateway_calls_reserved",
            "Calls answered with a stream whose stream has not started: slots held for them",
            registry=r,
        )
        self.stream_start_wait = Histogram(
            "gateway_stream_start_wait_seconds",
            "From a media stream's upgrade to its start read (genuine starts only)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )


class CallMetrics:
    """Calls from start to end: how many run, how they ended and how long they lasted, and
    what the gateway did in them on its own or for the model (hang-ups, transfers, the
    answering machine, the REST requests that failed). Per persona where it says so: a
    persona is a configured name, never a number or SID."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.active = Gauge("gateway_calls_active", "Calls in progress", registry=r)
        self.ended = Counter("gateway_calls", "Calls ended, by outcome", ["outcome"], registry=r)
        self.duration = Histogram(
            "gateway_call_duration_seconds",
            "Call duration",
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
            registry=r,
        )
        self.barge_ins = Counter("gateway_barge_ins", "Caller interrupted the model", registry=r)
        self.hangups = Counter(
            "gateway_hangups",
            "Calls the gateway ended, by persona and reason (end_call, transfer_call, silence, "
            "max_duration, max_tokens, max_cost, voicemail, machine, fax, ...)",
            ["persona", "reason"],
            registry=r,
        )
        self.answered_by = Counter(
            "gateway_answered_by",
            "Answering-machine detection results of outbound calls (human, machine, fax, unknown)",
            ["persona", "answered_by"],
            registry=r,
        )
        self.rest_errors = Counter(
            "gateway_twilio_rest_errors",
            "Twilio REST requests that failed, by action",
            ["action"],
            registry=r,
        )


class LiveMetrics:
    """Each call's Live session: the connections it opened, the resets it lived through
    and what they cost the caller (the wait, the audio replayed, a repeat not played), and
    the sessions that failed."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.connections = Counter(
            "gateway_live_connections",
            "Live connections opened, by kind (fresh, resumed, fallback)",
            ["kind"],
            registry=r,
        )
        self.resumptions = Counter(
            "gateway_live_resumptions",
            "Live connection switches, by cause (goaway, abrupt, refused)",
            ["cause"],
            registry=r,
        )
        self.goaway = Counter("gateway_live_goaway", "goAway messages received", registry=r)
        self.switches = Counter(
            "gateway_live_switches",
            "goAway switches, by mode (make_before_break, break_before_make)",
            ["mode"],
            registry=r,
        )
        self.repeats_skipped = Counter(
            "gateway_live_repeats_skipped",
            "Replies a resumed model began again after the caller had heard them in full, "
            "not played",
            registry=r,
        )
        self.reset_gap = Histogram(
            "gateway_live_reset_gap_seconds",
            "How long caller audio waited for a Live connection at a reset",
            ["cause"],
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.replayed_audio = Histogram(
            "gateway_live_replayed_audio_seconds",
            "Caller audio replayed into a resumed session",
            ["cause"],
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "gateway_live_errors", "Live sessions that failed, by reason", ["reason"], registry=r
        )


class AudioMetrics:
    """The audio itself, both ways: what came and went, what the caller's audio lost or
    was spared on its way to the model, and the time audio spends inside the gateway. The
    per-frame ones are loop-only numbers (see the module's docstring)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.caller_frames = LoopCounter()
        self.model_audio = LoopCounter()
        self.added_latency = LoopHistogramFamily("direction", LATENCY_BUCKETS)
        r.register(
            _LoopCollector(
                {
                    "gateway_caller_audio_frames": (
                        "Caller audio frames received",
                        self.caller_frames,
                    ),
                    "gateway_model_audio_seconds": (
                        "Model audio sent to callers",
                        self.model_audio,
                    ),
                },
                {
                    "gateway_added_latency_seconds": (
                        "Time audio spends inside the gateway, by direction",
                        self.added_latency,
                    )
                },
            )
        )
        self.caller_dropped = Counter(
            "gateway_caller_audio_dropped_seconds",
            "Caller audio that could not be delivered to the model, by reason",
            ["reason"],
            registry=r,
        )
        self.caller_withheld = Counter(
            "gateway_caller_audio_withheld_seconds",
            "Caller silence not sent to the model (SILENCE_SUPPRESSION)",
            registry=r,
        )
        self.caller_backlog = Histogram(
            "gateway_caller_send_backlog_seconds",
            "Most audio a call ever had queued for its caller's socket (CALLER_SEND_BUFFER_S cuts)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
            registry=r,
        )


class CostMetrics:
    """What the model counted and what it cost, per persona: the bill an operator
    watches, apart from how the calls went."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.tokens = Counter(
            "gateway_live_tokens",
            "Tokens the Live API counted, by persona, kind (prompt, response) and modality",
            ["persona", "kind", "modality"],
            registry=r,
        )
        self.usd = Counter(
            "gateway_live_cost_usd",
            "What the tokens cost at TOKEN_PRICES, by persona",
            ["persona"],
            registry=r,
        )


class Metrics:
    """Every metric family the gateway exports, in one registry per app, grouped by what
    they describe: the replica, its front door, the calls, their Live sessions, their audio
    and their cost."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.replica = ReplicaMetrics(r)
        self.admission = AdmissionMetrics(r)
        self.calls = CallMetrics(r)
        self.live = LiveMetrics(r)
        self.audio = AudioMetrics(r)
        self.cost = CostMetrics(r)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def watch_gc(pause: Histogram) -> Callable[[], None]:
    """Time every garbage collection into `pause` (by generation) from now on; returns the
    function that stops it. A collection runs on the thread that triggered it, mostly the
    event loop's, and stops it: a long one is a stall of every call's audio."""
    started: list[float] = []
    children = [pause.labels(generation=str(g)) for g in range(3)]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            children[min(info.get("generation", 2), 2)].observe(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)

    def stop() -> None:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)

    return stop
