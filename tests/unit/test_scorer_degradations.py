"""The orderings a judge expects on controlled degradations of real singing (vocadito_1)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tests.unit.conftest import LYRICS_TXT, NOTES_CSV
from voicejury_contracts.result import ScoreResult
from voicejury_scorer.core import Contour, ScoringConfig, Word, score_performance


def score(
    reference: Contour,
    performance: Contour,
    *,
    difficulty: str = "normal",
    lyrics: str | None = None,
    sung: str | None = None,
) -> ScoreResult:
    words = None
    if sung is not None:
        step = 33.0 / max(len(sung.split()), 1)
        words = [Word(w, k * step, (k + 1) * step) for k, w in enumerate(sung.split())]
    return score_performance(
        reference,
        performance,
        reference_words=None,
        performance_words=words,
        lyrics=lyrics,
        language="tl",
        config=ScoringConfig(difficulty=difficulty),
        performance_separated=True,
        reference_separated=True,
    )


def shifted(contour: Contour, cents: float, mask: npt.NDArray[np.bool_] | None = None) -> Contour:
    factor = np.where(mask if mask is not None else True, 2.0 ** (cents / 1200.0), 1.0)
    return Contour(contour.time_s, contour.f0_hz * factor)


def codes(result: ScoreResult) -> set[str]:
    return {w.code for w in result.warnings}


@pytest.mark.parametrize("difficulty", ["normal", "hard"])
def test_more_detune_never_scores_higher(reference: Contour, difficulty: str) -> None:
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    results = [
        score(reference, shifted(reference, c, segment), difficulty=difficulty)
        for c in (0.0, 25.0, 50.0, 100.0, 200.0)
    ]
    pitch = [r.pitch.score for r in results]
    assert pitch == sorted(pitch, reverse=True)
    assert pitch[0] - pitch[3] > 10
    assert pitch[0] - pitch[4] > 15
    assert results[3].score < results[0].score
    assert results[4].score <= results[3].score
    # At hard difficulty a quarter-tone already costs; at normal it is within tolerance.
    if difficulty == "hard":
        assert pitch[2] < pitch[0]
    else:
        assert pitch[4] < pitch[3]


def test_whole_tone_detune_is_judged_worse_than_a_semitone_at_hard(reference: Contour) -> None:
    """Past hard's zero-credit point (100 cents) both earn nothing on the segment, so the
    scores may tie; the error reported on the segment's lines must still tell them apart.
    The alignment pitch is judged on cannot pair the detuned notes with neighbouring
    reference notes a tone away (it follows the melody's intervals, not its pitches)."""
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    semitone = score(reference, shifted(reference, 100.0, segment), difficulty="hard")
    tone = score(reference, shifted(reference, 200.0, segment), difficulty="hard")
    assert tone.pitch.score <= semitone.pitch.score
    assert tone.pitch.mean_abs_error_cents > semitone.pitch.mean_abs_error_cents + 20
    inside = [
        (s, t)
        for s, t in zip(semitone.lines, tone.lines, strict=True)
        if s.start_s > 9.0 and s.end_s < 19.0 and s.mean_signed_cents is not None
    ]
    assert inside
    for s, t in inside:
        assert s.mean_signed_cents == pytest.approx(100.0, abs=25)
        assert t.mean_signed_cents == pytest.approx(200.0, abs=25)


def test_delay_changes_the_offset_not_the_rhythm(reference: Contour) -> None:
    on_time = score(reference, reference)
    delayed = score(reference, Contour(reference.time_s + 0.3, reference.f0_hz))
    assert delayed.rhythm.global_offset_ms == pytest.approx(300.0, abs=20)
    assert delayed.rhythm.score == pytest.approx(on_time.rhythm.score, abs=2)
    assert delayed.pitch.score == pytest.approx(on_time.pitch.score, abs=2)


@pytest.mark.parametrize("octaves", [1, -1])
def test_octave_is_reported_and_does_not_zero_pitch(reference: Contour, octaves: int) -> None:
    result = score(reference, shifted(reference, 1200.0 * octaves))
    assert result.pitch.register_offset_octaves == octaves
    assert abs(result.pitch.key_offset_cents) < 15
    assert result.pitch.score > 90
    assert result.score > 90


def test_transposition_is_reported_as_key_offset(reference: Contour) -> None:
    result = score(reference, shifted(reference, 200.0))
    assert result.pitch.key_offset_cents == pytest.approx(200.0, abs=15)
    assert result.pitch.register_offset_octaves == 0
    assert result.pitch.score > 90


def test_slower_tempo_is_not_a_pitch_fault(reference: Contour) -> None:
    result = score(reference, Contour(reference.time_s * 1.1, reference.f0_hz))
    assert result.rhythm.tempo_ratio == pytest.approx(1.1, abs=0.03)
    assert result.pitch.score > 90
    assert result.score > 85


def test_a_long_take_drifting_far_past_the_band_is_still_followed(reference: Contour) -> None:
    """Five verses (2:45) sung 10 % slower end 16 s behind the reference's clock, far
    beyond the ±3 s band: the band follows the take's course, not the diagonal."""
    verses = 5
    span = float(reference.time_s[-1]) + 1.0
    time_s = np.concatenate([reference.time_s + k * span for k in range(verses)])
    song = Contour(time_s, np.tile(reference.f0_hz, verses))
    result = score(song, Contour(song.time_s * 1.1, song.f0_hz))
    assert result.rhythm.tempo_ratio == pytest.approx(1.1, abs=0.03)
    assert result.pitch.score > 90
    assert not codes(result) & {"melody_mismatch", "performance_too_short"}
    assert all(line.pitch_accuracy is None or line.pitch_accuracy > 0.8 for line in result.lines)


def test_notes_shuffled_within_phrases_score_low(reference: Contour) -> None:
    notes = np.loadtxt(NOTES_CSV, delimiter=",", ndmin=2)
    onsets, durations = notes[:, 0], notes[:, 2]
    gaps = onsets[1:] - (onsets[:-1] + durations[:-1])
    phrase = np.r_[0, np.cumsum(gaps >= 0.3)]
    t, f = reference.time_s, reference.f0_hz
    out = f.copy()
    rng = np.random.default_rng(0)
    for ph in np.unique(phrase):
        members = np.flatnonzero(phrase == ph)
        if members.size < 2:
            continue
        order = np.roll(members, 1 + int(rng.integers(members.size - 1)))
        for slot, source in zip(members, order, strict=True):
            inside = np.flatnonzero((t >= onsets[slot]) & (t < onsets[slot] + durations[slot]))
            u = (t[inside] - onsets[slot]) / durations[slot]
            src = np.clip(np.searchsorted(t, onsets[source] + u * durations[source]), 0, t.size - 1)
            out[inside] = np.where(f[inside] > 0, f[src], 0.0)
    faithful = score(reference, reference)
    shuffled = score(reference, Contour(t, out))
    assert shuffled.pitch.score < faithful.pitch.score - 30
    assert shuffled.score < 50


def test_silence_noise_and_other_melody_score_low_with_warnings(reference: Contour) -> None:
    t = reference.time_s
    rng = np.random.default_rng(7)
    noise = np.where(rng.random(t.size) < 0.8, rng.uniform(100.0, 400.0, t.size), 0.0)
    silence = score(reference, Contour(t, np.zeros_like(t)))
    noisy = score(reference, Contour(t, noise))
    other = score(reference, Contour(t, reference.f0_hz[::-1]))
    assert silence.score == 0
    assert "no_vocals_detected" in codes(silence)
    assert noisy.score < 35
    assert "erratic_pitch" in codes(noisy)
    assert other.score < 40
    assert "melody_mismatch" in codes(other)


def test_fewer_words_lower_the_lyrics_score(reference: Contour) -> None:
    lyrics = LYRICS_TXT.read_text(encoding="utf-8")
    words = lyrics.split()
    kept = [
        " ".join(words),
        " ".join(w for k, w in enumerate(words) if k % 4),
        " ".join(words[::2]),
        " ".join(words[::4]),
    ]
    results = [score(reference, reference, lyrics=lyrics, sung=text) for text in kept]
    lyric_scores = [r.lyrics.score for r in results if r.lyrics is not None]
    assert len(lyric_scores) == 4
    assert lyric_scores == sorted(lyric_scores, reverse=True)
    assert len(set(lyric_scores)) == 4
    totals = [r.score for r in results]
    assert totals == sorted(totals, reverse=True)
