"""Transcoding benchmark: CPU, band limits and latency of each resampler candidate.

Every candidate runs the full wire path of its direction (caller: 8 kHz mu-law -> 16 kHz PCM16,
model: 24 kHz PCM16 -> 8 kHz mu-law), streamed chunk by chunk as in a call:

- x RT: seconds of audio per CPU second on one core (process time; 60 s of audio in 20 ms
  frames for the caller, 40 ms and 100 ms chunks for the model). Noisy machines: compare
  rows of one run, not runs.
- image / alias dB, measured on the resampler's PCM output (mu-law's own harmonics of a 1 kHz
  tone land on 3 kHz at -39 dB whatever the resampler, so the model side is measured before
  encoding): caller 700 Hz tone (decoded from mu-law, 20 ms frames) -> image at 7.3 kHz;
  model 1 kHz + 5 kHz (chunks of varied, odd sample counts) -> alias at 3 kHz. Bar: -40 dB.
- 3.4k dB: gain at the top of the telephone band relative to 1 kHz.
- latency ms: audio held inside the resampler (input time minus output time after each chunk,
  mean and max) plus any misalignment of the output (impulse position).

Run: python -m bench.transcode
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import soxr

from gateway.audio import (
    MODEL_INPUT_RATE,
    MODEL_OUTPUT_RATE,
    TWILIO_RATE,
    CallerToModel,
    ModelToCaller,
    caller_resampler,
    model_resampler,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

Pcm = npt.NDArray[np.int16]
BAR_DB = -40.0
SECONDS = 60


class Stream(Protocol):
    """The converters' interface: wire bytes in, wire bytes out."""

    def convert(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class PcmResampler(Protocol):
    def process(self, x: Pcm) -> Pcm: ...

    def flush(self) -> Pcm: ...


class Ratecv:
    """audioop.ratecv, stateful across chunks: linear interpolation, no anti-alias filter."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.rates = (in_rate, out_rate)
        self.state: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def process(self, x: Pcm) -> Pcm:
        y, self.state = audioop.ratecv(x.tobytes(), 2, 1, *self.rates, self.state)
        return np.frombuffer(y, np.int16)

    def flush(self) -> Pcm:
        self.state = None
        return np.zeros(0, np.int16)


class Soxr:
    """soxr.ResampleStream at a given quality, int16 in and out."""

    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self.stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, x: Pcm) -> Pcm:
        y: Pcm = self.stream.resample_chunk(x)
        return y

    def flush(self) -> Pcm:
        y: Pcm = self.stream.resample_chunk(np.zeros(0, np.int16), last=True)
        self.stream.clear()
        return y


@dataclass
class CallerPath:
    """Caller wire path around a PCM resampler: mu-law in, PCM16 LE out."""

    resampler: PcmResampler

    def convert(self, data: bytes, /) -> bytes:
        x = np.frombuffer(ulaw_to_pcm16(data), "<i2")
        return self.resampler.process(x).astype("<i2").tobytes()

    def flush(self) -> bytes:
        return self.resampler.flush().astype("<i2").tobytes()


@dataclass
class ModelPath:
    """Model wire path around a PCM resampler: PCM16 LE in (even chunks), mu-law out."""

    resampler: PcmResampler

    def convert(self, data: bytes, /) -> bytes:
        x = np.frombuffer(data, "<i2")
        return pcm16_to_ulaw(self.resampler.process(x).astype("<i2").tobytes())

    def flush(self) -> bytes:
        return pcm16_to_ulaw(self.resampler.flush().astype("<i2").tobytes())


@dataclass(frozen=True)
class Candidate:
    """A resampler core per direction (for the dB figures, at PCM level) and the wire path
    built on it (for CPU and latency)."""

    name: str
    caller_core: Callable[[], PcmResampler]
    model_core: Callable[[], PcmResampler]
    caller: Callable[[], Stream]
    model: Callable[[], Stream]


def candidate(
    name: str, caller_core: Callable[[], PcmResampler], model_core: Callable[[], PcmResampler]
) -> Candidate:
    return Candidate(
        name,
        caller_core,
        model_core,
        lambda: CallerPath(caller_core()),
        lambda: ModelPath(model_core()),
    )


def candidates() -> list[Candidate]:
    def soxr_candidate(q: str) -> Candidate:
        return candidate(
            f"soxr {q}",
            lambda: Soxr(TWILIO_RATE, MODEL_INPUT_RATE, q),
            lambda: Soxr(MODEL_OUTPUT_RATE, TWILIO_RATE, q),
        )

    ratecv = candidate(
        "audioop.ratecv",
        lambda: Ratecv(TWILIO_RATE, MODEL_INPUT_RATE),
        lambda: Ratecv(MODEL_OUTPUT_RATE, TWILIO_RATE),
    )
    chosen = Candidate(
        "chosen: polyphase FIR", caller_resampler, model_resampler, CallerToModel, ModelToCaller
    )
    return [ratecv, *(soxr_candidate(q) for q in ("LQ", "MQ", "HQ", "VHQ")), chosen]


# --- signals and measurements ----------------------------------------------------------------


def tone(freq: float, rate: int, seconds: float, amp: float) -> npt.NDArray[np.float64]:
    t = np.arange(round(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def to_pcm(x: npt.NDArray[np.float64]) -> Pcm:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def level_db(x: npt.NDArray[np.generic], rate: int, freq: float) -> float:
    """Power at ``freq`` (Hann window, +-3 bins) in dB."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)))) ** 2
    k = round(freq * len(x) / rate)
    return float(10 * np.log10(spectrum[k - 3 : k + 4].sum() + 1e-30))


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def run(stream: Stream, data: bytes, size: int) -> bytes:
    return b"".join(stream.convert(c) for c in chunks(data, size)) + stream.flush()


def caller_wire(x: npt.NDArray[np.float64]) -> bytes:
    return pcm16_to_ulaw(to_pcm(x).tobytes())


def caller_out(data: bytes) -> Pcm:
    return np.frombuffer(data, "<i2")


def model_out(data: bytes) -> Pcm:
    return np.frombuffer(ulaw_to_pcm16(data), "<i2")


def steady(y: Pcm, rate: int) -> Pcm:
    return y[rate // 2 : rate // 2 + rate]


def resample(core: PcmResampler, x: Pcm, size: int) -> Pcm:
    out = [core.process(x[i : i + size]) for i in range(0, len(x), size)]
    return np.concatenate([*out, core.flush()])


def caller_image_db(make: Callable[[], PcmResampler]) -> float:
    """700 Hz through mu-law, 20 ms frames; image at 7.3 kHz relative to the tone."""
    x = caller_out(ulaw_to_pcm16(caller_wire(tone(700, 8000, 2, 16384))))
    y = steady(resample(make(), x, 160), 16000)
    return level_db(y, 16000, 7300) - level_db(y, 16000, 700)


def model_alias_db(make: Callable[[], PcmResampler]) -> float:
    """1 kHz + 5 kHz in varied chunks (odd sample counts too); alias at 3 kHz vs 1 kHz."""
    x = to_pcm(tone(1000, 24000, 2, 12000) + tone(5000, 24000, 2, 12000))
    core = make()
    sizes = np.resize([960, 721, 2400, 7, 1199, 1920], 200)
    parts = [core.process(c) for c in np.split(x, np.cumsum(sizes)) if len(c)]
    y = steady(np.concatenate([*parts, core.flush()]), 8000)
    return level_db(y, 8000, 3000) - level_db(y, 8000, 1000)


def band_edge_db(make: Callable[[], PcmResampler], in_rate: int, out_rate: int) -> float:
    def gain(f: float) -> float:
        y = steady(resample(make(), to_pcm(tone(f, in_rate, 2, 10000)), in_rate // 50), out_rate)
        return level_db(y, out_rate, f)

    return gain(3400) - gain(1000)


def test_audio(rate: int, seconds: float) -> Pcm:
    """Speech-band stand-in: a few tones plus noise, deterministic."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1500, round(rate * seconds))
    for f in (220, 730, 1480, 2900):
        x += tone(f, rate, seconds, 3000)
    return to_pcm(x)


def realtime_factor(make: Callable[[], Stream], data: bytes, size: int, seconds: float) -> float:
    stream = make()
    start = time.process_time()
    for c in chunks(data, size):
        stream.convert(c)
    stream.flush()
    return seconds / max(time.process_time() - start, 1e-9)


def latency_ms(
    make: Callable[[], Stream], data: bytes, size: int, in_bps: int, out_bps: int
) -> tuple[float, float]:
    """(mean, max) of audio held inside, in ms, plus output misalignment; bps = bytes/s."""
    stream = make()
    n_in = n_out = 0
    held = []
    for c in chunks(data, size):
        n_out += len(stream.convert(c))
        n_in += len(c)
        held.append(1000 * (n_in / in_bps - n_out / out_bps))
    # Misalignment: where a click comes out, versus where it went in.
    click = np.zeros(in_bps // 2, np.int16)
    click[len(click) // 2] = 30000
    if in_bps == TWILIO_RATE:  # caller wire is mu-law
        probe = pcm16_to_ulaw(click.tobytes())
        y = caller_out(run(make(), probe, size))
        offset = int(np.argmax(np.abs(y))) - len(y) // 2
        offset_ms = 1000 * offset / MODEL_INPUT_RATE
    else:
        y = model_out(run(make(), click.tobytes(), size))
        offset = int(np.argmax(np.abs(y))) - len(y) // 2
        offset_ms = 1000 * offset / TWILIO_RATE
    steady_held = np.array(held[len(held) // 10 :])
    return float(steady_held.mean()) + offset_ms, float(steady_held.max()) + offset_ms


@dataclass(frozen=True)
class Row:
    direction: str
    name: str
    xrt: tuple[float, ...]
    db: float
    edge_db: float
    latency: tuple[float, float]

    def format(self) -> str:
        xrt = " / ".join(f"{x:7.0f}" for x in self.xrt)
        verdict = "pass" if self.db <= BAR_DB else "FAIL"
        return (
            f"{self.direction:<7} {self.name:<22} {xrt:>17} {self.db:8.1f} {verdict:<4} "
            f"{self.edge_db:7.2f} {self.latency[0]:7.2f} {self.latency[1]:7.2f}"
        )


def measure() -> list[Row]:
    caller_audio = pcm16_to_ulaw(test_audio(TWILIO_RATE, SECONDS).tobytes())
    model_audio = test_audio(MODEL_OUTPUT_RATE, SECONDS).tobytes()
    rows = []
    for c in candidates():
        rows.append(
            Row(
                "caller",
                c.name,
                (realtime_factor(c.caller, caller_audio, 160, SECONDS),),
                caller_image_db(c.caller_core),
                band_edge_db(c.caller_core, TWILIO_RATE, MODEL_INPUT_RATE),
                latency_ms(c.caller, caller_audio[: 10 * 8000], 160, 8000, 32000),
            )
        )
    for c in candidates():
        rows.append(
            Row(
                "model",
                c.name,
                tuple(realtime_factor(c.model, model_audio, n, SECONDS) for n in (1920, 4800)),
                model_alias_db(c.model_core),
                band_edge_db(c.model_core, MODEL_OUTPUT_RATE, TWILIO_RATE),
                latency_ms(c.model, model_audio[: 10 * 48000], 1920, 48000, 8000),
            )
        )
    return rows


def main() -> None:
    print("caller: 8 kHz mu-law -> 16 kHz PCM16, 20 ms frames; dB = image of 700 Hz at 7.3 kHz")
    print("model: 24 kHz PCM16 -> 8 kHz mu-law, x RT at 40 ms / 100 ms chunks, latency at 40 ms;")
    print("       dB = alias of 5 kHz at 3 kHz, relative to a 1 kHz tone")
    print(f"bar: {BAR_DB:.0f} dB; x RT = audio seconds per CPU second, one core")
    print()
    header = (
        f"{'dir':<7} {'candidate':<22} {'x RT':>17} {'dB':>8} {'bar':<4} "
        f"{'3.4k dB':>7} {'lat ms':>7} {'max ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in measure():
        print(row.format())


if __name__ == "__main__":
    main()
