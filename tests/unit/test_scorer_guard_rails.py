"""Guard rails on real material: another melody (mastmelody-dev), an instrumental track,
and the scorer's warm-up before readiness."""

from __future__ import annotations

import asyncio
import csv

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import AUDIO
from tests.unit.conftest import analyse
from voicejury_contracts.result import ScoreResult
from voicejury_scorer.core import (
    Contour,
    ScoringConfig,
    score_performance,
)

MAST = AUDIO.parent / "mastmelody-dev"
F0_CSV = AUDIO / "vocadito_1_f0.csv"


def score(reference: Contour, performance: Contour) -> ScoreResult:
    return analyse(reference, performance).result


def codes(result: ScoreResult) -> set[str]:
    return {w.code for w in result.warnings}


@pytest.fixture(scope="module")
def mast() -> dict[str, Contour]:
    with np.load(MAST / "f0.npz") as npz:
        return {
            k: Contour(npz[k][:, 0].astype(np.float64), npz[k][:, 1].astype(np.float64))
            for k in npz.files
        }


@pytest.fixture(scope="module")
def first_reference() -> dict[str, str]:
    """The first reference of each melody in index.csv (the bench's choice too)."""
    out: dict[str, str] = {}
    with (MAST / "index.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["kind"] == "ref":
                out.setdefault(row["melody"], row["name"])
    return out


@pytest.mark.parametrize(
    ("take", "own_reference", "other_melody"),
    [
        ("52_mel1_per131658_pass", "52_mel1_ref131658", "61_mel2"),
        ("52_mel1_per142159_pass", "52_mel1_ref142159", "57_mel1"),
    ],
)
def test_a_pass_take_against_another_melody_warns_and_scores_low(
    mast: dict[str, Contour],
    first_reference: dict[str, str],
    take: str,
    own_reference: str,
    other_melody: str,
) -> None:
    own = score(mast[own_reference], mast[take])
    other = score(mast[first_reference[other_melody]], mast[take])
    assert own.score > 75
    assert "melody_mismatch" not in codes(own)
    assert "melody_mismatch" in codes(other)
    assert other.score <= 30


@pytest.mark.parametrize(
    "take",
    # Failed by the jurors (grade 3, minor mistakes; grade 2, major mistakes), but sung.
    ["52_mel1_per146759_fail", "57_mel1_per147858_fail"],
)
def test_a_mediocre_take_of_the_right_melody_is_not_a_mismatch(
    mast: dict[str, Contour], take: str
) -> None:
    reference = take.replace("_per", "_ref").rsplit("_", 1)[0]
    analysis = analyse(mast[reference], mast[take])
    result = analysis.result
    assert "melody_mismatch" not in codes(result)
    assert 50 < result.score < 90
    assert analysis.mismatch_evidence < ScoringConfig().max_mismatch_evidence


def test_the_evidence_rule_can_be_turned_off(
    mast: dict[str, Contour], first_reference: dict[str, str]
) -> None:
    off = score_performance(
        mast[first_reference["61_mel2"]],
        mast["52_mel1_per131658_pass"],
        reference_words=None,
        performance_words=None,
        lyrics=None,
        language=None,
        config=ScoringConfig(max_mismatch_evidence=float("inf")),
        performance_separated=False,
        reference_separated=False,
    )
    assert "melody_mismatch" not in codes(off)
    assert off.score > 30


def accompaniment(t: npt.NDArray[np.float64], seed: int) -> Contour:
    """A tracker on a backing track without voice: short low-confidence blips on chord
    tones across octaves, jumping between them, most frames under the voicing threshold."""
    rng = np.random.default_rng(seed)
    f0 = np.zeros(t.size)
    periodicity = rng.uniform(0.02, 0.2, t.size)
    chord = 110.0 * 2.0 ** (np.array([0, 4, 7, 12, 16, 19, 24, 28]) / 12.0)
    k = 0
    while True:
        k += int(rng.integers(10, 60))
        if k >= t.size:
            break
        n = min(int(rng.integers(4, 20)), t.size - k)
        f0[k : k + n] = rng.choice(chord) * 2.0 ** (rng.normal(0.0, 30.0, n) / 1200.0)
        periodicity[k : k + n] = rng.uniform(0.22, 0.5, n)
        k += n
    return Contour(t, f0, periodicity)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accompaniment_without_voice_scores_low_with_a_warning(seed: int) -> None:
    data = np.loadtxt(F0_CSV, delimiter=",")
    reference = Contour(data[:, 0], data[:, 1])
    result = score(reference, accompaniment(np.arange(0.0, 33.0, 0.01, dtype=np.float64), seed))
    assert result.score < 30
    assert codes(result) & {"melody_mismatch", "low_voicing", "erratic_pitch"}


def test_readiness_waits_for_the_warm_up() -> None:
    from voicejury_scorer.app import build

    service = build()
    checks = service._readiness
    assert checks, "the scorer registers a readiness check"
    assert any(check() is not None for check in checks)  # not ready before startup

    async def start() -> None:
        for hook in service._startup:
            await hook()

    asyncio.run(start())
    assert all(check() is None for check in checks)


def sung_line(
    semitones: list[int],
    *,
    seed: int,
    detune_cents: float = 0.0,
    vibrato_cents: float = 0.0,
    tempo: float = 1.0,
    jitter: float = 0.0,
) -> Contour:
    """A line sung on a 10 ms grid from 0.3 s: notes of 0.5 s x `tempo` (each stretched by
    a random share of sd `jitter`) over 220 Hz, 80 ms rests between, vibrato at 5.5 Hz."""
    rng = np.random.default_rng(seed)
    hop = 0.01
    times, f0s, now = [], [], 0.3
    for semitone in semitones:
        n = int(0.5 * tempo * (1.0 + jitter * rng.standard_normal()) / hop)
        t = now + np.arange(n) * hop
        cents = (
            100.0 * semitone + detune_cents + vibrato_cents * np.sin(2 * np.pi * 5.5 * (t - now))
        )
        rest = int(0.08 * tempo / hop)
        times += [t, now + (n + np.arange(rest)) * hop]
        f0s += [220.0 * 2.0 ** (cents / 1200.0), np.zeros(rest)]
        now += (n + rest) * hop
    return Contour(np.concatenate(times), np.concatenate(f0s))


_SCALE_UP = [0, 2, 4, 5, 7, 9, 11, 12]
_ARPEGGIO = [0, 4, 7, 12, 7, 4, 0]


@pytest.mark.parametrize(
    "melody",
    [_SCALE_UP + _SCALE_UP[-2::-1], _ARPEGGIO * 3, _ARPEGGIO * 2],
    ids=["scale up and down", "arpeggio x3", "arpeggio x2"],
)
def test_a_good_take_of_a_melody_that_reads_the_same_backwards_is_not_a_mismatch(
    melody: list[int],
) -> None:
    """Against its retrograde (the decoy of `mismatch_evidence`) a palindromic melody is
    itself: a good take (15 cents sharp, vibrato, 4 % slower, uneven notes) used to fit
    both alike and be capped at 30 as another song."""
    take = sung_line(melody, seed=1, detune_cents=15, vibrato_cents=30, tempo=1.04, jitter=0.05)
    analysis = analyse(sung_line(melody, seed=0), take)
    assert "melody_mismatch" not in codes(analysis.result)
    assert analysis.result.score > 90
    assert analysis.mismatch_evidence < 0.5


def test_another_melody_against_a_palindromic_reference_is_still_a_mismatch() -> None:
    reference = sung_line(_SCALE_UP + _SCALE_UP[-2::-1], seed=0)
    thirds = sung_line([0, 4, 7, 4] * 3 + [0, 4, 7], seed=2, vibrato_cents=20, jitter=0.05)
    analysis = analyse(reference, thirds)
    assert analysis.mismatch_evidence >= ScoringConfig().max_mismatch_evidence
    assert "melody_mismatch" in codes(analysis.result)
    assert analysis.result.score <= 30


def test_a_reference_of_one_repeated_note_has_no_decoy_and_no_evidence_rule() -> None:
    """Every reordering of one note repeated is the same line: the evidence cannot tell
    the song from another, so it is not applied (NaN) rather than applied wrongly."""
    drone = [0] * 12
    analysis = analyse(sung_line(drone, seed=0), sung_line(drone, seed=1, jitter=0.05))
    assert np.isnan(analysis.mismatch_evidence)
    assert "melody_mismatch" not in codes(analysis.result)


@pytest.mark.parametrize(
    ("sung_from", "sung_to"),
    [(0.55, 1.0), (0.0, 0.45), (None, None)],
    ids=["first half skipped", "second half skipped", "middle skipped"],
)
def test_a_take_skipping_half_the_song_is_warned_too_short(
    sung_from: float | None, sung_to: float | None
) -> None:
    """Coverage is what the take sang of the song, not how far it got: a take that starts
    at the second half reaches the end, and one that skips the middle does too."""
    data = np.loadtxt(F0_CSV, delimiter=",")
    reference = Contour(data[:, 0], data[:, 1])
    end = float(reference.time_s[-1])
    t = reference.time_s
    if sung_from is None or sung_to is None:
        sung = (t < 0.25 * end) | (t > 0.8 * end)
    else:
        sung = (t >= sung_from * end) & (t <= sung_to * end)
    result = score(reference, Contour(t, np.where(sung, reference.f0_hz, 0.0)))
    assert "performance_too_short" in codes(result)
    assert result.score <= 50


def test_a_full_slightly_sloppy_take_is_not_warned_too_short() -> None:
    """Sung throughout, 3 % slower, 20 cents of wobble and a 60 ms dropout every second
    (breaths, consonants): covered, whatever it misses note by note."""
    data = np.loadtxt(F0_CSV, delimiter=",")
    reference = Contour(data[:, 0], data[:, 1])
    t = reference.time_s
    rng = np.random.default_rng(3)
    f0 = reference.f0_hz * 2.0 ** (rng.normal(0.0, 20.0, t.size) / 1200.0)
    f0[(t % 1.0) < 0.06] = 0.0
    result = score(reference, Contour(t * 1.03, f0))
    assert not codes(result) & {"performance_too_short", "low_voicing", "melody_mismatch"}
    assert result.score > 80


def test_the_reference_recording_itself_as_the_take_is_flagged_not_marked_down(
    reference: Contour,
) -> None:
    """Played back (its contour tracked again, a few cents of tracker noise, a delay):
    closer to the reference than any live singer, so the take says so; the score still
    measures the match (the controlled degradations start from this identical take)."""
    rng = np.random.default_rng(7)
    jitter = 2.0 ** (rng.normal(0.0, 4.0, reference.f0_hz.size) / 1200.0)
    replayed = Contour(reference.time_s + 0.25, reference.f0_hz * jitter)
    result = score(reference, replayed)
    assert "matches_reference_recording" in codes(result)
    assert result.score > 90


def test_live_singing_is_never_taken_for_the_reference_played_back(
    mast: dict[str, Contour],
) -> None:
    """Every take the experts graded perfect (4) against its own reference in
    mastmelody-dev: the closest singing there is to a reference, and none flagged."""
    with (MAST / "index.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    references = {r["pair_id"]: r["name"] for r in rows if r["kind"] == "ref"}
    perfect = [
        (r["name"], references[r["pair_id"]])
        for r in rows
        if r["kind"] == "per" and r["majority_grade"] == "4.0" and r["pair_id"] in references
    ]
    assert len(perfect) > 50
    flagged = [
        take
        for take, own in perfect
        if "matches_reference_recording" in codes(score(mast[own], mast[take]))
    ]
    assert flagged == []
