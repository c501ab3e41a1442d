"""Expression features on synthetic notes whose vibrato, wobble, drift and scoops are known."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tests.unit.conftest import analyse
from voicejury_scorer.align import to_grid
from voicejury_scorer.core import Contour, ScoringConfig, score_performance
from voicejury_scorer.expression import EDGE_S, expression_features, held_note
from voicejury_scorer.rhythm import detect_onsets

HOP = 0.01
Cents = npt.NDArray[np.float64]


def note(seconds: float, pitch: float = 6000.0) -> Cents:
    return np.full(round(seconds / HOP), pitch)


def rest(seconds: float) -> Cents:
    return np.full(round(seconds / HOP), np.nan)


def vibrato(seconds: float, rate_hz: float, extent: float, pitch: float = 6000.0) -> Cents:
    t = np.arange(round(seconds / HOP)) * HOP
    out: Cents = pitch + extent * np.sin(2 * np.pi * rate_hz * t)
    return out


def test_vibrato_rate_and_depth_are_measured() -> None:
    take = np.r_[rest(0.5), vibrato(2.0, 5.5, 50.0), rest(0.5), vibrato(1.5, 6.5, 30.0, 6200.0)]
    expression = expression_features(take, hop_s=HOP)
    assert expression.held_notes == 2
    assert expression.vibrato_notes == 2
    first, second = expression.longest_notes
    assert first.vibrato_rate_hz == pytest.approx(5.5, abs=0.3)
    assert first.vibrato_extent_cents == pytest.approx(50.0, abs=8.0)
    assert second.vibrato_rate_hz == pytest.approx(6.5, abs=0.3)
    assert second.vibrato_extent_cents == pytest.approx(30.0, abs=6.0)
    assert first.start_s == pytest.approx(0.6, abs=0.05)
    assert first.steadiness_cents < 5.0


def test_a_steady_note_has_no_vibrato_and_a_wobbly_one_is_less_steady() -> None:
    rng = np.random.default_rng(0)
    steady = note(2.0) + rng.normal(0.0, 3.0, 200)
    # Slow, irregular wandering (below the vibrato band) of about ±30 cents.
    walk = np.convolve(rng.normal(0.0, 1.0, 260), np.ones(30) / 30, mode="valid")[:200]
    wobbly = note(2.0) + 30.0 * walk / np.abs(walk).max()
    calm = expression_features(np.r_[rest(0.3), steady, rest(0.3)], hop_s=HOP)
    shaky = expression_features(np.r_[rest(0.3), wobbly, rest(0.3)], hop_s=HOP)
    assert calm.vibrato_notes == 0
    assert calm.steadiness_cents is not None
    assert shaky.steadiness_cents is not None
    assert calm.steadiness_cents < 5.0
    assert shaky.steadiness_cents > 2 * calm.steadiness_cents


def test_drift_is_the_slow_change_over_a_note() -> None:
    sagging = note(2.0) - np.linspace(0.0, 60.0, 200)
    expression = expression_features(np.r_[rest(0.3), sagging, rest(0.3)], hop_s=HOP)
    (held,) = expression.longest_notes
    assert held.drift_cents == pytest.approx(-60.0 * 1.8 / 2.0, abs=8.0)
    assert held.vibrato_rate_hz is None


def test_scoops_are_counted_where_a_note_is_entered_from_below() -> None:
    glide = np.linspace(5850.0, 6000.0, 10)
    scooped = np.r_[glide, note(0.6)]
    clean = note(0.7, 6200.0)
    legato = np.r_[note(0.5, 5800.0), note(0.5)]  # a step up from a held note: no scoop
    take = np.r_[rest(0.5), scooped, rest(0.4), clean, rest(0.4), scooped, rest(0.4), legato]
    expression = expression_features(take, hop_s=HOP)
    assert expression.notes == 5
    assert expression.scoops == 2
    assert expression.scoop_starts_s[0] == pytest.approx(0.5, abs=0.03)


def test_silence_has_no_expression() -> None:
    expression = expression_features(rest(5.0), hop_s=HOP)
    assert expression.notes == expression.held_notes == expression.scoops == 0
    assert expression.vibrato_rate_hz is None
    assert expression.steadiness_cents is None
    assert expression.longest_notes == ()


def test_the_result_carries_the_take_s_expression() -> None:
    from voicejury_scorer.core import Contour

    t = np.arange(400) * HOP
    ref_f0 = np.where((t > 0.5) & (t < 3.5), 261.63, 0.0)
    take = ref_f0 * 2 ** (vibrato(4.0, 5.5, 40.0, 0.0) / 1200.0)
    result = score_performance(
        Contour(t, ref_f0),
        Contour(t, take),
        reference_words=None,
        performance_words=None,
        lyrics=None,
        language="en",
        config=ScoringConfig(),
        performance_separated=True,
        reference_separated=True,
    )
    assert result.expression is not None
    assert result.expression.vibrato_notes == 1
    assert result.expression.vibrato_rate_hz == pytest.approx(5.5, abs=0.3)


@pytest.mark.parametrize("hop_s", [0.001, 0.05, 0.1])
def test_any_grid_the_scorer_allows_gives_features_not_a_crash(hop_s: float) -> None:
    t = np.arange(round(3.0 / hop_s)) * hop_s
    take = np.where((t > 0.5) & (t < 2.5), 6000.0 + 40.0 * np.sin(2 * np.pi * 4.9 * t), np.nan)
    expression = expression_features(take, hop_s=hop_s)
    assert expression.notes >= 1
    assert expression.held_notes >= 1


def test_a_slow_wobble_is_not_vibrato() -> None:
    expression = expression_features(
        np.r_[rest(0.3), vibrato(2.0, 3.0, 40.0), rest(0.3)], hop_s=HOP
    )
    assert expression.held_notes == 1
    assert expression.vibrato_notes == 0
    assert expression.steadiness_cents is not None
    assert expression.steadiness_cents > 15.0


def two_component_note(
    frames: int,
    rates_hz: tuple[float, float],
    depths: tuple[float, float],
    phases: tuple[float, float],
) -> Cents:
    t = (np.arange(frames) - 10) * HOP
    out: Cents = 6000.0 + sum(
        (
            d * np.sin(2 * np.pi * f * t + p)
            for f, d, p in zip(rates_hz, depths, phases, strict=True)
        ),
        np.zeros(frames),
    )
    return out


def test_a_note_wobbling_at_two_rates_reports_a_rate_inside_the_band() -> None:
    """The audit's case: the band's strongest bin is its lower edge, on the flank of a
    3.6 Hz peak outside it; interpolating there gave a rate of -2.35 Hz (and a crash)."""
    wobble = two_component_note(
        210,
        (3.6484889274735517, 4.557542107110509),
        (20.979354348313496, 18.37586010350882),
        (4.760425929766533, 0.33508748793221654),
    )
    expression = expression_features(np.r_[rest(1.0), wobble, rest(1.0)], hop_s=HOP)
    for held in expression.longest_notes:
        assert held.vibrato_rate_hz is None or 4.0 <= held.vibrato_rate_hz <= 8.5


def test_random_two_component_notes_never_crash_and_keep_the_rate_in_band() -> None:
    rng = np.random.default_rng(20240607)
    for _ in range(400):
        frames = int(rng.integers(70, 400))
        wobble = two_component_note(
            frames,
            (float(rng.uniform(1.0, 12.0)), float(rng.uniform(1.0, 12.0))),
            (float(rng.uniform(0.0, 60.0)), float(rng.uniform(0.0, 60.0))),
            (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
        )
        held = held_note(wobble, HOP, 0.0)
        if held.vibrato_rate_hz is not None:
            assert 4.0 <= held.vibrato_rate_hz <= 8.5


def test_held_notes_and_scoops_are_placed_on_the_reference_timeline(reference: Contour) -> None:
    """A take 10 % slower holds its notes later and longer than the song does; the jury
    places them in the song's lines, so their times are mapped through the alignment.
    Each held note starts `EDGE_S` after one of the reference's note starts (vocadito_1's
    held notes at 1.36, 23.01 and 27.10 s were reported at 1.53, 25.35 and 29.85 s)."""
    slower = Contour(reference.time_s * 1.1, reference.f0_hz)
    result = analyse(reference, slower).result
    assert result.expression is not None
    held = result.expression.longest_notes
    assert len(held) >= 2
    grid = to_grid(reference.time_s, reference.f0_hz, None, min_periodicity=0.21, hop_s=HOP)
    onsets_s = detect_onsets(grid, hop_s=HOP) * HOP
    for note_ in held:
        assert np.min(np.abs(onsets_s + EDGE_S - note_.start_s)) <= 0.06, note_
        # Its span on the song, not as sung: about 1/1.1 of the take's.
        assert note_.end_s <= reference.time_s[-1] + 0.1
    song_end = float(reference.time_s[-1])
    assert all(0.0 <= s <= song_end for s in result.expression.scoop_starts_s)


def test_expression_times_follow_a_given_timeline() -> None:
    take = np.r_[rest(1.0), vibrato(2.0, 5.5, 40.0), rest(1.0)]
    # Sung twice as slowly as the song: performance frame j is reference frame j / 2.
    expression = expression_features(
        take, hop_s=HOP, reference_frames=np.arange(take.size, dtype=np.float64) / 2.0
    )
    (held,) = expression.longest_notes
    assert held.start_s == pytest.approx((1.0 + EDGE_S) / 2.0, abs=0.02)
    assert held.end_s == pytest.approx((3.0 - EDGE_S) / 2.0, abs=0.02)
