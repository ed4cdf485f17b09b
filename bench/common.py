"""Shared pieces of the benchmark: process counters, Prometheus histograms, the event loop."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from gateway.__main__ import event_loop_factory

PUBLIC_URL = "https://gateway.bench.test"
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"


def gateway_env(
    emulator_info: dict[str, Any], port: int, log_level: str = "WARNING"
) -> dict[str, str]:
    """A gateway's environment for a run against the emulator `bench.emulator_server` started
    (its first line: `emulator_info`), listening on loopback at `port`."""
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_URL": PUBLIC_URL,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "GEMINI_API_KEY": emulator_info["api_key"],
        "GOOGLE_GEMINI_BASE_URL": emulator_info["base_url"],
        "SSL_CERT_FILE": emulator_info["ca_pem"],
        "LOG_LEVEL": log_level,
        "MAX_CALLS": "100000",
        "GREETING": "",  # callers talk first: each turn is one measured reply
    }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], *, fast: bool = True) -> T:
    """asyncio.run, on uvloop when ``fast`` and installed (helpers, not what is measured)."""
    # The gateway's own choice of loop (uvloop when installed), for the helpers too.
    with asyncio.Runner(loop_factory=event_loop_factory() if fast else None) as runner:
        return runner.run(coro)


# --- process counters (Linux /proc) -------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of the process."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


# --- Prometheus histograms ----------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (upper bound -> count), as Prometheus exposes them."""

    buckets: tuple[tuple[float, float], ...]

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        """Observations made between ``earlier`` and this scrape."""
        before = dict(earlier.buckets)
        return Histogram(tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets))

    def top_bound(self) -> float:
        """The upper bound of the highest bucket anything fell in (nan if empty): the
        longest observation was at most this."""
        top, below = math.nan, 0.0
        for le, count in self.buckets:
            if count > below:
                top = le
            below = count
        return top

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
        total = self.count
        if total <= 0:
            return math.nan
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower_bound  # beyond the last finite bucket: its bound
                width = count - lower_count
                frac = (rank - lower_count) / width if width > 0 else 1.0
                return lower_bound + (le - lower_bound) * frac
            lower_bound, lower_count = le, count
        return lower_bound


def histograms(text: str, name: str, label: str) -> dict[str, Histogram]:
    """Every series of histogram ``name`` in a /metrics page, keyed by ``label``'s value."""
    found: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = sample.labels.get(label, "")
                found.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
    return {k: Histogram(tuple(sorted(v))) for k, v in found.items()}
