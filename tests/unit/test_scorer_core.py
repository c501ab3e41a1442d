"""The scorer's pure core, on the real vocadito_1 ground-truth contour (5.8 ms hop)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tests.unit.conftest import LYRICS_TXT
from voicejury_contracts.result import ScoreResult
from voicejury_scorer.align import DtwCosts, banded_dtw
from voicejury_scorer.core import Contour, ScoringConfig, Word, score_performance
from voicejury_scorer.lyrics import judge_lyrics, normalise_words


def score(
    reference: Contour,
    performance: Contour,
    *,
    config: ScoringConfig | None = None,
    reference_words: list[Word] | None = None,
    performance_words: list[Word] | None = None,
    lyrics: str | None = None,
) -> ScoreResult:
    return score_performance(
        reference,
        performance,
        reference_words=reference_words,
        performance_words=performance_words,
        lyrics=lyrics,
        language="tl",
        config=config or ScoringConfig(),
        performance_separated=True,
        reference_separated=True,
    )


def transposed(
    contour: Contour, cents: float, mask: npt.NDArray[np.bool_] | None = None
) -> Contour:
    factor = np.where(mask if mask is not None else True, 2.0 ** (cents / 1200.0), 1.0)
    return Contour(contour.time_s, contour.f0_hz * factor)


def timed_words(text: str, duration_s: float) -> list[Word]:
    """Words spread evenly over a take: timing is not what the lyrics score judges."""
    words = text.split()
    step = duration_s / max(len(words), 1)
    return [Word(w, k * step, (k + 1) * step) for k, w in enumerate(words)]


def test_identical_take_scores_high(reference: Contour) -> None:
    result = score(reference, reference)
    assert result.score > 90
    assert result.pitch.accuracy > 0.95
    assert result.rhythm.onset_recall > 0.95
    assert abs(result.rhythm.global_offset_ms) < 1
    assert result.lines


def test_whole_take_transposed_reports_key_and_keeps_score(reference: Contour) -> None:
    result = score(reference, transposed(reference, 200.0))
    assert result.pitch.key_offset_cents == pytest.approx(200.0, abs=15)
    assert not result.pitch.key_offset_counted
    assert result.pitch.score > 90


def test_transposition_counts_when_key_change_not_allowed(reference: Contour) -> None:
    strict = ScoringConfig(allow_key_change=False)
    result = score(reference, transposed(reference, 200.0), config=strict)
    assert result.pitch.key_offset_counted
    assert result.pitch.key_offset_cents == pytest.approx(200.0, abs=15)
    assert result.pitch.score < 20


def test_octave_lower_take_is_folded(reference: Contour) -> None:
    result = score(reference, transposed(reference, -1200.0))
    assert result.pitch.score > 90
    assert abs(result.pitch.key_offset_cents) < 15
    assert result.pitch.octave_switches == 0


def test_octave_slip_mid_song_is_folded_and_counted(reference: Contour) -> None:
    slip = (reference.time_s > 10.0) & (reference.time_s < 16.0)
    result = score(reference, transposed(reference, 1200.0, slip))
    assert result.pitch.score > 90
    assert result.pitch.octave_errors_folded > 100
    assert result.pitch.octave_switches >= 2


def test_detuned_segment_lowers_pitch_score_monotonically(reference: Contour) -> None:
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    scores = [
        score(reference, transposed(reference, cents, segment)).pitch.score
        for cents in (0.0, 50.0, 100.0, 200.0)
    ]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] - scores[-1] > 15


def test_detuned_segment_shows_in_its_lines(reference: Contour) -> None:
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    result = score(reference, transposed(reference, -60.0, segment))
    inside = [ln for ln in result.lines if ln.start_s > 8.5 and ln.end_s < 19.5]
    outside = [ln for ln in result.lines if ln.end_s < 7.5 or ln.start_s > 20.5]
    assert inside
    assert outside
    assert all(ln.mean_signed_cents is not None and ln.mean_signed_cents < -40 for ln in inside)
    assert all(
        ln.mean_signed_cents is not None and abs(ln.mean_signed_cents) < 10 for ln in outside
    )


def test_latency_is_reported_and_not_counted_as_bad_rhythm(reference: Contour) -> None:
    on_time = score(reference, reference)
    delayed = score(reference, Contour(reference.time_s + 0.3, reference.f0_hz))
    assert delayed.rhythm.global_offset_ms == pytest.approx(300.0, abs=20)
    assert delayed.rhythm.score == pytest.approx(on_time.rhythm.score, abs=5)
    assert delayed.score > 90


def test_silent_take_scores_zero_with_warning(reference: Contour) -> None:
    result = score(reference, Contour(reference.time_s, np.zeros_like(reference.f0_hz)))
    assert result.score == 0
    assert "no_vocals_detected" in {w.code for w in result.warnings}


def test_noise_take_scores_low_with_warning(reference: Contour) -> None:
    rng = np.random.default_rng(7)
    n = reference.time_s.size
    noise = np.where(rng.random(n) < 0.8, rng.uniform(100.0, 400.0, n), 0.0)
    result = score(reference, Contour(reference.time_s, noise))
    assert result.score < 35
    assert "erratic_pitch" in {w.code for w in result.warnings}


def test_mostly_unvoiced_take_scores_low_with_warning(reference: Contour) -> None:
    f0 = reference.f0_hz.copy()
    f0[(np.arange(f0.size) // 60) % 5 != 0] = 0.0  # sung 20 % of the time, in bursts
    result = score(reference, Contour(reference.time_s, f0))
    assert result.score < 45
    assert "low_voicing" in {w.code for w in result.warnings}


@pytest.mark.parametrize("kind", ["reversed", "shuffled"])
def test_different_melody_scores_clearly_lower(reference: Contour, kind: str) -> None:
    if kind == "reversed":
        f0 = reference.f0_hz[::-1]
    else:
        blocks = np.array_split(np.arange(reference.f0_hz.size), 33)
        np.random.default_rng(3).shuffle(blocks)
        f0 = reference.f0_hz[np.concatenate(blocks)]
    result = score(reference, Contour(reference.time_s, f0))
    assert result.score < 40
    assert "melody_mismatch" in {w.code for w in result.warnings}


def test_take_far_shorter_than_reference_scores_low(reference: Contour) -> None:
    quarter = reference.time_s.size // 4
    result = score(reference, Contour(reference.time_s[:quarter], reference.f0_hz[:quarter]))
    assert result.score < 40
    assert "performance_too_short" in {w.code for w in result.warnings}


@pytest.mark.parametrize(
    "contour",
    [
        Contour(np.zeros(0), np.zeros(0)),
        Contour(np.array([0.0]), np.array([220.0])),
        Contour(np.array([0.0, 0.01, 0.01, np.nan]), np.array([220.0, np.nan, -5.0, 0.0])),
    ],
    ids=["empty", "one-frame", "garbage"],
)
def test_degenerate_inputs_never_raise(reference: Contour, contour: Contour) -> None:
    as_performance = score(reference, contour)
    as_reference = score(contour, reference)
    assert as_performance.score < 10
    assert as_reference.score < 10
    assert as_reference.warnings


def test_lyrics_score_drops_with_dropped_words(reference: Contour) -> None:
    lyrics = LYRICS_TXT.read_text(encoding="utf-8")
    words = lyrics.split()
    full = score(reference, reference, lyrics=lyrics, performance_words=timed_words(lyrics, 33))
    dropped_text = " ".join(w for k, w in enumerate(words) if k % 4 != 0)
    dropped = score(
        reference, reference, lyrics=lyrics, performance_words=timed_words(dropped_text, 33)
    )
    assert full.lyrics is not None
    assert dropped.lyrics is not None
    assert full.lyrics.score == 100
    assert full.lyrics.against == "lyrics"
    assert dropped.lyrics.score < 85
    assert dropped.lyrics.words_missed == len(words[::4])
    assert dropped.score < full.score
    assert full.weights.lyrics == pytest.approx(0.3)


def test_lyrics_against_reference_transcript_feed_the_lines(reference: Contour) -> None:
    ref_words = [Word("Ako", 0.7, 1.0), Word("ay", 1.0, 1.3), Word("may", 1.3, 1.7)]
    sung = [Word("ako", 0.7, 1.0), Word("may", 1.3, 1.7)]
    result = score(reference, reference, reference_words=ref_words, performance_words=sung)
    assert result.lyrics is not None
    assert result.lyrics.against == "reference_transcript"
    assert result.lyrics.words_missed == 1
    assert result.lines[0].text == "Ako ay may"
    assert result.lines[0].words_missed == ("ay",)


def test_lyric_lines_are_placed_by_reference_timestamps(reference: Contour) -> None:
    lyrics = "Ako ay may lobo\nlumipad sa langit"
    ref_words = timed_words("ako ay may lobo lumipad sa langit", 6.0)
    result = score(
        reference,
        reference,
        lyrics=lyrics,
        reference_words=ref_words,
        performance_words=timed_words("ako ay may lobo lumipad langit", 6.0),
    )
    assert [ln.text for ln in result.lines] == ["Ako ay may lobo", "lumipad sa langit"]
    assert result.lines[0].end_s <= result.lines[1].start_s + 1e-6
    assert result.lines[1].words_missed == ("sa",)


def test_without_performance_words_lyrics_are_not_scored(reference: Contour) -> None:
    result = score(reference, reference, lyrics="ako ay may lobo")
    assert result.lyrics is None
    assert "lyrics_not_scored" in {w.code for w in result.warnings}
    assert result.weights.lyrics == 0
    assert result.weights.pitch == pytest.approx(0.4 / 0.7)
    assert result.weights.rhythm == pytest.approx(0.3 / 0.7)
    assert result.score > 90


def test_normalisation_unifies_case_accents_apostrophes_punctuation() -> None:
    assert normalise_words("Où est-ce qu’il  chante ?!") == ["ou", "est", "ce", "qu'il", "chante"]
    assert normalise_words("Qu’il chante", "fr") == ["qu", "il", "chante"]
    assert normalise_words("Don’t STOP, believin'") == ["don't", "stop", "believin"]


def test_alignment_of_18000_frames_completes() -> None:
    rng = np.random.default_rng(0)
    ref = 6000.0 + np.cumsum(rng.normal(0.0, 5.0, 18_000))
    ref[rng.random(ref.size) < 0.2] = np.nan
    perf = np.r_[np.full(40, np.nan), ref[:-40]] + 30.0
    alignment = banded_dtw(ref, perf, band=300, costs=DtwCosts())
    assert alignment.path_ref[0] == 0
    assert alignment.path_perf[0] == 0
    assert alignment.path_ref[-1] == ref.size - 1 or alignment.path_perf[-1] == perf.size - 1
    assert np.all(np.diff(alignment.path_ref) >= 0)
    assert np.all(np.diff(alignment.path_perf) >= 0)
    # Away from the edges the path follows the 40-frame delay.
    middle = alignment.path_ref.size // 2
    assert alignment.path_perf[middle] - alignment.path_ref[middle] == pytest.approx(40, abs=3)


def test_ligatures_and_rarer_apostrophes_are_normalised() -> None:
    assert normalise_words("cœur", "fr") == normalise_words("coeur", "fr") == ["coeur"]
    assert normalise_words("Œuvre æther") == ["oeuvre", "aether"]
    for apostrophe in ("\u2032", "\u02bb", "\u201b"):
        assert normalise_words(f"don{apostrophe}t") == ["don't"]


@pytest.mark.parametrize(
    ("start_s", "end_s"),
    [(float("nan"), 1.0), (0.5, float("inf")), (float("-inf"), 2.0), (-40.0, -39.0), (1e9, 1e9)],
    ids=["nan", "inf", "-inf", "negative", "far-past-the-end"],
)
def test_unusable_word_times_never_raise(reference: Contour, start_s: float, end_s: float) -> None:
    ref_words = timed_words("ako ay may lobo lumipad sa langit", 6.0)
    ref_words[0] = Word(ref_words[0].text, start_s, end_s)
    for lyrics in ("Ako ay may lobo\nlumipad sa langit", None):
        result = score(
            reference,
            reference,
            lyrics=lyrics,
            reference_words=ref_words,
            performance_words=timed_words("ako ay may lobo lumipad sa langit", 6.0),
        )
        starts = [ln.start_s for ln in result.lines]
        assert starts == sorted(starts)
        assert all(0.0 <= ln.start_s <= ln.end_s <= 34.0 for ln in result.lines)


def test_lines_follow_time_when_reference_timestamps_run_backwards(reference: Contour) -> None:
    words = timed_words("ako ay may lobo lumipad sa langit", 6.0)
    backwards = [Word(w.text, 6.0 - w.end_s, 6.0 - w.start_s) for w in words]
    result = score(
        reference,
        reference,
        lyrics="Ako ay may lobo\nlumipad sa langit",
        reference_words=backwards,
        performance_words=words,
    )
    starts = [ln.start_s for ln in result.lines]
    assert starts == sorted(starts)


def test_detuned_but_on_time_segment_keeps_line_timing_and_rhythm(reference: Contour) -> None:
    """Sung 300 cents off over 8-20 s with the reference's own timing: the note path slid
    by up to a second there (borrowing notes at the detuned pitch); line timing and onset
    matching follow the interval-driven path, which stays on time."""
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    identical = score(reference, reference)
    detuned = score(reference, transposed(reference, 300.0, segment))
    offsets = [ln.timing_offset_ms for ln in detuned.lines if ln.timing_offset_ms is not None]
    assert offsets
    assert max(abs(o) for o in offsets) <= 60.0
    assert detuned.rhythm.score == pytest.approx(identical.rhythm.score, abs=3.0)
    assert detuned.pitch.score < identical.pitch.score - 25


def test_phrase_sung_a_fifth_off_is_not_an_octave_switch(reference: Contour) -> None:
    segment = (reference.time_s > 8.0) & (reference.time_s < 20.0)
    for cents in (700.0, -700.0, 650.0):
        result = score(reference, transposed(reference, cents, segment))
        assert result.pitch.octave_switches == 0
        assert result.pitch.octave_errors_folded == 0
    octave = score(reference, transposed(reference, 1200.0, segment))
    assert octave.pitch.octave_switches == 2
    assert octave.pitch.octave_errors_folded > 100


@pytest.mark.parametrize("delay_s", [2.5, 4.0, -2.5])
def test_latency_beyond_the_searched_range_is_reported_with_a_warning(
    reference: Contour, delay_s: float
) -> None:
    t, f = reference.time_s + delay_s, reference.f0_hz
    keep = t >= 0
    result = score(reference, Contour(t[keep], f[keep]))
    assert result.rhythm.global_offset_ms == pytest.approx(1000.0 * delay_s, abs=60)
    assert "latency_out_of_range" in {w.code for w in result.warnings}


def test_latency_within_the_searched_range_has_no_warning(reference: Contour) -> None:
    result = score(reference, Contour(reference.time_s + 1.5, reference.f0_hz))
    assert result.rhythm.global_offset_ms == pytest.approx(1500.0, abs=20)
    assert "latency_out_of_range" not in {w.code for w in result.warnings}


def concatenated(*contours: Contour) -> Contour:
    times, f0s, offset = [], [], 0.0
    for c in contours:
        times.append(c.time_s + offset)
        f0s.append(c.f0_hz)
        offset = float(times[-1][-1]) + 0.01
    return Contour(np.concatenate(times), np.concatenate(f0s))


def test_take_singing_far_more_than_the_song_is_capped_with_a_warning(
    reference: Contour,
) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(0.0, 150.0, 0.01)
    other = Contour(t, 220.0 * 2.0 ** (rng.integers(-5, 8, t.size // 40).repeat(40) / 12.0))
    for take in (concatenated(*[reference] * 5), concatenated(reference, other)):
        result = score(reference, take)
        assert "performance_too_long" in {w.code for w in result.warnings}
        assert result.score <= 25
    ad_lib = concatenated(reference, Contour(t[:100], np.full(100, 220.0)))
    assert "performance_too_long" not in {w.code for w in score(reference, ad_lib).warnings}


def test_random_notes_against_a_short_melody_are_a_mismatch(reference: Contour) -> None:
    t, f = reference.time_s, reference.f0_hz
    first = float(t[np.argmax(f > 0)])
    short = Contour(t, np.where((t >= first) & (t < first + 3.0), f, 0.0))
    rng = np.random.default_rng(10)
    notes = 180.0 * 2.0 ** (rng.integers(-5, 8, t.size // 40 + 1).repeat(40)[: t.size] / 12.0)
    result = score(short, Contour(t, notes))
    assert "melody_mismatch" in {w.code for w in result.warnings}
    assert result.score <= 30


def test_a_stray_frame_hours_late_is_dropped_not_allocated(reference: Contour) -> None:
    take = Contour(np.r_[reference.time_s, 1e7], np.r_[reference.f0_hz, 220.0])
    result = score(reference, take)
    assert result.score > 90
    assert "contour_too_long" in {w.code for w in result.warnings}


def test_periodicity_of_another_length_is_ignored_not_truncating(reference: Contour) -> None:
    take = Contour(reference.time_s, reference.f0_hz, periodicity=np.ones(10))
    result = score(reference, take)
    assert result.score > 90
    assert result.pitch.accuracy > 0.95


def test_no_recognised_words_is_said(reference: Contour) -> None:
    result = score(reference, reference, lyrics="ako ay may lobo", performance_words=[])
    assert result.lyrics is not None
    assert result.lyrics.score == 0
    assert "no_words_recognised" in {w.code for w in result.warnings}


def test_settings_reject_non_finite_weights() -> None:
    from pydantic import ValidationError

    from voicejury_scorer.settings import ScorerSettings

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValidationError):
            ScorerSettings(scorer_weights=(bad, 0.3, 0.3))


@pytest.mark.parametrize(
    ("lyrics", "sung", "language"),
    [
        ("I got ninety-nine problems", "I got 99 problems", "en"),
        ("a walk of one thousand miles", "a walk of 1,000 miles", "en"),
        ("in nineteen eighty-four", "in 1984", "en"),
        ("the twenty-first night", "the 21st night", "en"),
        ("J'ai vingt-deux ans", "j’ai 22 ans", "fr"),
        ("quatre-vingt-dix-neuf fois", "99 fois", "fr"),
        ("l'an deux mille", "L’an 2000", "fr"),
        ("C'est la première fois", "c'est la 1re fois", "fr"),
        ("mille et une nuits", "1 000 et une nuits", "fr"),
        ("trois virgule cinq", "3,5", "fr"),
    ],
)
def test_digits_and_spelled_numbers_are_the_same_words(
    lyrics: str, sung: str, language: str
) -> None:
    """ASR writes "99" where the lyrics spell "ninety-nine" (and the other way round):
    both sides are spelled out in the language, hyphens and elisions split as usual."""
    outcome = judge_lyrics(normalise_words(lyrics, language), normalise_words(sung, language))
    assert outcome is not None
    assert outcome.wer == 0.0, (normalise_words(lyrics, language), normalise_words(sung, language))


def test_numbers_stay_digits_without_a_language_num2words_knows() -> None:
    assert normalise_words("99 red balloons", None) == ["99", "red", "balloons"]
    assert normalise_words("99 red balloons", "tl") == ["99", "red", "balloons"]
    assert normalise_words("the 80s, mp3", "en") == ["the", "80s", "mp3"]


def test_a_faster_take_reports_its_start_not_a_compromise_latency(reference: Contour) -> None:
    """Sung 20 % faster, so starting 134 ms early: the cross-correlation's best lag over
    the whole take was -490 ms, and the first line then read 120 ms *late* for a singer
    who was early throughout. The latency is now where the alignment puts the first note,
    and every line of a steadily faster take is on time or early."""
    first_s = float(reference.time_s[np.argmax(reference.f0_hz > 0)])
    result = score(reference, Contour(reference.time_s * 0.8, reference.f0_hz))
    assert result.rhythm.global_offset_ms == pytest.approx(1000.0 * (0.8 - 1.0) * first_s, abs=40)
    timings = [ln.timing_offset_ms for ln in result.lines if ln.timing_offset_ms is not None]
    assert timings
    assert max(timings) <= 40.0
    assert timings[-1] < timings[0]
    assert result.pitch.score > 95


@pytest.mark.parametrize("band_s", [0.0, 0.005, 0.02, 0.05])
def test_a_band_too_narrow_to_follow_the_take_never_zeroes_the_pitch(
    reference: Contour, band_s: float
) -> None:
    """A near-perfect take 5 % slower: with a band of a few frames the path could not
    reach the end and paired the origin alone (pitch 0, no warning)."""
    take = Contour(reference.time_s * 1.05 + 0.2, reference.f0_hz)
    result = score(reference, take, config=ScoringConfig(dtw_band_s=band_s))
    assert result.pitch.score > 95
    assert result.rhythm.score > 90


def test_a_band_that_cannot_reach_the_end_is_widened_not_collapsed() -> None:
    """A course that jumps (a coarse course interpolated between its 100 ms nodes does,
    by a few frames) faster than the slope limit can follow inside a band of one frame."""
    rng = np.random.default_rng(4)
    ref = np.repeat(rng.integers(5500, 6500, 60).astype(np.float64), 20)  # 12 s of notes
    perf = np.r_[ref[:600], np.full(10, np.nan), ref[600:]]  # a 100 ms pause mid-song
    frames = np.arange(ref.size, dtype=np.int64)
    course = frames + 10 * (frames >= 600)
    narrow = banded_dtw(ref, perf, band=1, costs=DtwCosts(), centre=course)
    assert narrow.band > 1
    assert np.isfinite(narrow.cost)
    assert narrow.path_ref[-1] == ref.size - 1 or narrow.path_perf[-1] == perf.size - 1
    assert narrow.path_ref.size > ref.size // 2


def test_settings_reject_a_band_too_narrow_or_not_finite() -> None:
    from pydantic import ValidationError

    from voicejury_scorer.settings import ScorerSettings

    for bad in (0.0, 0.05, float("inf"), float("nan"), 1000.0):
        with pytest.raises(ValidationError):
            ScorerSettings(scorer_dtw_band_s=bad)
    assert ScorerSettings(scorer_dtw_band_s=0.2).scorer_dtw_band_s == 0.2
