"""The caller's discontinuous transmission (gateway.dtx) on synthesized speech.

The speech is espeak-ng's ("Hi, I would like to change my order please.", "Sixty five, Fifth
street.", "Yes."), made once with ``espeak-ng -w p.wav TEXT``, resampled to 8 kHz (soxr),
trimmed and stored as μ-law in tests/fixtures/. A test call puts them between silences, at
a level and over line noise, through the μ-law codec of gateway.audio, and checks what the
model would have been sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.audio import pcm16_to_ulaw, speech_level, ulaw_to_pcm16
from gateway.dtx import FRAME_S, CallerDtx
from gateway.live.profiles import profile_for

FIXTURES = Path(__file__).parent / "fixtures"
RATE = 8000
FRAME = int(RATE * FRAME_S)
PHRASES = ("order", "street", "yes")


def phrase(name: str) -> npt.NDArray[np.float64]:
    pcm = ulaw_to_pcm16((FIXTURES / f"speech-{name}.ulaw").read_bytes())
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


@dataclass
class TestCall:
    """A caller's audio: μ-law frames, and which frames hold (clean) speech."""

    frames: list[bytes]
    speech: list[tuple[int, int]]  # frame ranges [start, end) of each phrase's audible part

    __test__ = False


def make_call(
    level_dbfs: float, noise_dbfs: float | None, gaps_s: tuple[float, ...], seed: int = 0
) -> TestCall:
    """Silence of gaps_s[0], a phrase, gaps_s[1], the next phrase, ...: each phrase scaled to
    an RMS of ``level_dbfs``, white line noise at ``noise_dbfs`` throughout (None: digital
    silence), the whole in μ-law."""
    rng = np.random.default_rng(seed)
    parts: list[npt.NDArray[np.float64]] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for i, gap in enumerate(gaps_s):
        n = round(gap * RATE / FRAME) * FRAME
        parts.append(np.zeros(n))
        at += n
        if i == len(gaps_s) - 1:
            break
        x = phrase(PHRASES[i % len(PHRASES)])
        x = x * 32768 * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(x**2))
        n = -(-len(x) // FRAME) * FRAME
        x = np.pad(x, (0, n - len(x)))
        # Audible: frames within 40 dB of the phrase's loudest (its weakest consonants).
        energy = np.sqrt(np.mean(x.reshape(-1, FRAME) ** 2, axis=1))
        loud = np.nonzero(energy > energy.max() * 10 ** (-40 / 20))[0]
        spans.append((at // FRAME + int(loud[0]), at // FRAME + int(loud[-1]) + 1))
        parts.append(x)
        at += n
    signal = np.concatenate(parts)
    if noise_dbfs is not None:
        signal += rng.normal(0.0, 32768 * 10 ** (noise_dbfs / 20), len(signal))
    pcm = np.clip(np.round(signal), -32768, 32767).astype("<i2").tobytes()
    ulaw = pcm16_to_ulaw(pcm)
    return TestCall([ulaw[i : i + FRAME] for i in range(0, len(ulaw), FRAME)], spans)


@dataclass
class Sent:
    frames: set[int]  # indices of the frames sent
    pauses: list[int]  # frames after which the stream paused
    withheld: int
    order_ok: bool  # frames went out in order, each once


def run(dtx: CallerDtx, call: TestCall) -> Sent:
    sent: list[int] = []
    pauses: list[int] = []
    for i, frame in enumerate(call.frames):
        out = dtx.feed(frame, speech_level(frame))
        # A burst is the pre-roll (the frames just before this one) and this one.
        assert out.frames[-1:] in ((), (frame,))
        sent += range(i - len(out.frames) + 1, i + 1)
        if out.pause:
            assert not out.frames
            pauses.append(i)
    withheld = dtx.withheld_frames + dtx.held_frames
    return Sent(set(sent), pauses, withheld, sent == sorted(set(sent)))


LEVELS = (-20.0, -30.0, -40.0)
NOISE = (None, -65.0, -55.0, -50.0)
GAPS = (2.0, 4.0, 0.6, 6.0, 3.0)  # silence, phrase, silence, phrase, ... (0.6: mid-turn)


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("level", LEVELS)
def test_every_word_goes_out_whole_with_audio_before_it(level: float, noise: float | None) -> None:
    if noise is not None and level - noise < 10:
        pytest.skip("speech under 10 dB above the line is not a call anyone can follow")
    call = make_call(level, noise, GAPS)
    sent = run(CallerDtx(), call)
    assert sent.order_ok
    for start, end in call.speech:
        missing = [i for i in range(start, end) if i not in sent.frames]
        assert not missing, (start, end, missing[:10])
        # The frames before the word went out too: its onset, and silence before it.
        assert all(i in sent.frames for i in range(start - 5, start)), (start, noise)
        # ... and 0.8 s after it (the silence that ends a turn, which the service waits for:
        # a second after the last frame loud enough to tell from the line, whose tail is
        # quieter still).
        assert all(i in sent.frames for i in range(end, min(end + 40, len(call.frames))))
    assert sent.withheld == len(call.frames) - len(sent.frames)
    # The stream paused in each long silence once the line was learnt (its first 8 s may
    # send noise louder than -54 dBFS), and most of that silence was withheld.
    learnt = round(8.0 / FRAME_S)
    silent = [i for i in range(learnt, len(call.frames)) if not in_speech(call, i)]
    withheld = [i for i in silent if i not in sent.frames]
    assert len(withheld) > 0.5 * len(silent), (len(withheld), len(silent))
    # A pause in each long silence after the line was learnt (the 6 s and the 3 s), none in
    # the 0.6 s inside a turn; on a quiet line also in the first two (2 s, 4 s).
    gaps = [(call.speech[i][1], call.speech[i + 1][0]) for i in range(len(call.speech) - 1)]
    gaps.append((call.speech[-1][1], len(call.frames)))
    paused_in = [sum(lo < p < hi for p in sent.pauses) for lo, hi in gaps]
    assert paused_in[1] == 0 and paused_in[2] >= 1 and paused_in[3] >= 1, sent.pauses
    if noise is None or noise < -60:
        assert paused_in == [1, 0, 1, 1] and len(sent.pauses) == 4, sent.pauses


def in_speech(call: TestCall, frame: int) -> bool:
    return any(start <= frame < end for start, end in call.speech)


def test_the_0_6_s_pause_inside_a_turn_is_sent_as_it_was() -> None:
    call = make_call(-30.0, -55.0, GAPS)
    sent = run(CallerDtx(), call)
    (_, street_end), (yes_start, _) = call.speech[1], call.speech[2]
    assert all(i in sent.frames for i in range(street_end, yes_start))


def test_a_caller_speaking_at_once_is_sent_from_the_first_frame() -> None:
    call = make_call(-40.0, -55.0, (0.0, 3.0))
    sent = run(CallerDtx(), call)
    _, end = call.speech[0]
    assert set(range(0, end)) <= sent.frames


def test_a_tone_from_the_first_frame_is_speech_and_so_is_a_line_before_it_is_learnt() -> None:
    dtx = CallerDtx()
    tone = pcm16_to_ulaw((np.sin(np.arange(FRAME) * 0.3) * 8000).astype("<i2").tobytes())
    assert all(dtx.feed(tone, speech_level(tone)).frames == (tone,) for _ in range(200))
    assert dtx.withheld_frames == 0 and not dtx.paused


def test_a_noisier_line_is_learnt_and_its_noise_withheld() -> None:
    # Digital silence, then the line turns noisy (-45 dBFS) for 12 s with no speech.
    quiet = make_call(-30.0, None, (1.0,))
    noisy = make_call(-30.0, -45.0, (12.0,), seed=1)
    call = TestCall(quiet.frames + noisy.frames, [])
    sent = run(CallerDtx(), call)
    last_sent = max(sent.frames)
    assert last_sent < len(quiet.frames) + 10 / FRAME_S  # learnt within the 8 s window
    assert sent.pauses


def test_a_pause_is_announced_once_and_a_resume_sends_the_pre_roll_first() -> None:
    dtx = CallerDtx(hangover_s=0.1, pre_roll_s=0.06)
    silence, loud = b"\xff" * FRAME, b"\x80" * FRAME
    outs = [dtx.feed(silence, 0.0) for _ in range(10)]
    assert [o.pause for o in outs].count(True) == 1 and dtx.paused
    assert sum(len(o.frames) for o in outs) == 5  # the hangover's frames only
    resumed = dtx.feed(loud, 8000.0)
    assert resumed.frames == (silence, silence, silence, loud) and not dtx.paused
    assert dtx.withheld_frames == 10 - 5 - 3 and dtx.held_frames == 0
    assert dtx.feed(loud, 8000.0).frames == (loud,)


def test_the_pause_is_sent_only_where_the_models_profile_takes_it() -> None:
    # live-models.md §9 row 36: accepted on the Gemini API; Vertex: "implicit" (no field).
    for model in ("gemini-3.8-live", "gemini-3.1-flash-live-preview", "gemini-new-live"):
        assert profile_for(model).audio_stream_end, model
    for model in ("gemini-3.8-live", "gemini-live-2.5-flash-native-audio", "gemini-new-live"):
        assert not profile_for(model, "vertex").audio_stream_end, model
