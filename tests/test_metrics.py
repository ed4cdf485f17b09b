"""The per-frame metrics (no lock, read at scrape time) export exactly what prometheus_client's
own Counter and Histogram would: same names, types, labels, cumulative buckets, count, sum."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import LATENCY_BUCKETS, Metrics, watch_gc

LATENCIES = (0.0, 0.00025, 0.0003, 0.0012, 0.02, 0.7, 1.0, 3.0)  # bounds, between, above


def samples(text: str, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix) and not s.name.endswith("_created"):
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_loop_metrics_render_like_prometheus_client() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    frames = Counter("gateway_caller_audio_frames", "x", registry=reference)
    audio = Counter("gateway_model_audio_seconds", "x", registry=reference)
    latency = Histogram(
        "gateway_added_latency_seconds",
        "x",
        ["direction"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for _ in range(7):
        metrics.audio.caller_frames.inc()
        frames.inc()
    for amount in (0.04, 0.02, 0.5):
        metrics.audio.model_audio.inc(amount)
        audio.inc(amount)
    for direction in ("caller_to_model", "model_to_caller"):
        ours = metrics.audio.added_latency.labels(direction=direction)
        theirs = latency.labels(direction=direction)
        for value in LATENCIES:
            ours.observe(value)
            theirs.observe(value)

    text = metrics.render().decode()
    expected = generate_latest(reference).decode()
    for prefix in ("gateway_caller_audio_frames", "gateway_model_audio", "gateway_added_latency"):
        assert samples(text, prefix) == samples(expected, prefix), prefix
    assert "# TYPE gateway_added_latency_seconds histogram" in text
    assert "# TYPE gateway_caller_audio_frames_total counter" in text
    sample = metrics.registry.get_sample_value
    assert sample("gateway_added_latency_seconds_count", {"direction": "caller_to_model"}) == 8
    assert sample("gateway_caller_audio_frames_total") == 7


def test_a_direction_never_observed_is_not_exported() -> None:
    metrics = Metrics()
    metrics.audio.added_latency.labels(direction="model_to_caller").observe(0.001)
    text = metrics.render().decode()
    assert 'direction="model_to_caller"' in text
    assert 'direction="caller_to_model"' not in text


def gc_counts(metrics: Metrics) -> dict[str, float]:
    """Collections timed so far, by generation."""
    text = generate_latest(metrics.registry).decode()
    found = samples(text, "gateway_gc_pause_seconds_count")
    return {dict(labels)["generation"]: value for (_, labels), value in found.items()}


def test_every_collection_is_timed_by_generation_until_stopped() -> None:
    metrics = Metrics()
    stop = watch_gc(metrics.replica.gc_pause)
    try:
        gc.collect(0)
        gc.collect()
    finally:
        stop()
    counts = gc_counts(metrics)
    assert counts["0"] >= 1 and counts["2"] >= 1, counts
    gc.collect()  # after stop(): not timed
    assert gc_counts(metrics) == counts
