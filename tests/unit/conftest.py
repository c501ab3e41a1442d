"""Fixtures of the scorer's unit tests: real sung pitch from ../shared (vocadito_1)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import AUDIO
from voicejury_scorer.core import Contour, ScoringAnalysis, ScoringConfig, analyse_performance

F0_CSV = AUDIO / "vocadito_1_f0.csv"
NOTES_CSV = AUDIO / "vocadito_1_notesA1.csv"
LYRICS_TXT = AUDIO / "vocadito_1_lyrics.txt"


@pytest.fixture(scope="module")
def reference() -> Contour:
    """vocadito_1's ground-truth f0 (5.8 ms hop), the reference of the scorer tests."""
    data = np.loadtxt(F0_CSV, delimiter=",")
    return Contour(time_s=data[:, 0], f0_hz=data[:, 1])


def analyse(reference: Contour, performance: Contour) -> ScoringAnalysis:
    """Pitch contours only (no words, no lyrics), default settings."""
    return analyse_performance(
        reference,
        performance,
        reference_words=None,
        performance_words=None,
        lyrics=None,
        language=None,
        config=ScoringConfig(),
        performance_separated=False,
        reference_separated=False,
    )
