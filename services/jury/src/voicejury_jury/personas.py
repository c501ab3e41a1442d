"""The three judges: who they are and what earns their yes.

A persona's voice lives in its prompt file (`prompts/<version>/<id>.md`) for the LLM path
and in `fallback.py` for the deterministic path; its voting rule lives here so the fallback
votes by the persona's own criteria instead of one shared threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .evidence import Evidence


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    votes_yes: Callable[[Evidence], bool]


def _coach_votes_yes(ev: Evidence) -> bool:
    # The coach rewards potential: a passable score, or a weaker one with a line that shows
    # the singer can already do it.
    best_accuracy = ev.best.pitch_accuracy if ev.best and ev.best.pitch_accuracy else 0.0
    return ev.result.score >= 55 or (ev.result.score >= 45 and best_accuracy >= 0.8)


def _showman_votes_yes(ev: Evidence) -> bool:
    # The showman forgives a few wrong notes, not a performance that loses the groove.
    r = ev.result
    in_tempo = 0.93 <= r.rhythm.tempo_ratio <= 1.07
    return r.score >= 75 or (r.score >= 55 and r.rhythm.score >= 60 and in_tempo)


def _technician_votes_yes(ev: Evidence) -> bool:
    # The technician wants intonation that holds up in numbers, whatever the charm.
    r = ev.result
    return r.score >= 65 and r.pitch.score >= 70 and r.pitch.mean_abs_error_cents <= 35


COACH = Persona(id="coach", name="Nina", votes_yes=_coach_votes_yes)
SHOWMAN = Persona(id="showman", name="Max", votes_yes=_showman_votes_yes)
TECHNICIAN = Persona(id="technician", name="Viktor", votes_yes=_technician_votes_yes)

PERSONAS: tuple[Persona, ...] = (COACH, SHOWMAN, TECHNICIAN)
