"""Plain-text rendering for a terminal: the live progress line and the final score card.

Both work from the JSON the REST API returns (dicts), not from the contract models, so the
demo client stays a client: it reads what any frontend would read, and a field it does
not know yet is simply not shown. Output is ASCII-safe and uses no colour.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from .sse import SSEEvent

JsonDict = Mapping[str, Any]


# ----------------------------------------------------------------------------- progress


def bar(fraction: float, width: int) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "-" * (width - filled)


class ProgressDisplay:
    """Shows job events: one redrawn line on a terminal, one line per change otherwise.

    On a TTY the bottom line is `[####------]  42%  pitch  message`; stage transitions are
    printed above it so the history stays visible. Without a TTY (CI logs, pipes) carriage
    returns would make a mess, so each stage change and each 10 % step gets its own line.
    """

    _SPINNER = "|/-\\"

    def __init__(self, out: TextIO, *, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.progress = 0.0
        self.stage = "queued"
        self.message = ""
        self._last_decile = -1
        self._ticks = 0
        self._line_shown = False

    def handle(self, event: SSEEvent) -> None:
        try:
            data: Any = json.loads(event.data) if event.data else {}
        except json.JSONDecodeError:
            data = {"message": event.data}
        if not isinstance(data, dict):
            data = {"message": str(data)}
        if event.event == "progress":
            self.stage = str(data.get("stage", self.stage))
            self.progress = max(self.progress, float(data.get("progress", self.progress)))
            self.message = str(data.get("message", ""))
            decile = int(self.progress * 10)
            if self.tty:
                self._redraw()
            elif decile != self._last_decile:
                self._last_decile = decile
                self._print(f"{self.progress:4.0%}  {self.stage}  {self.message}".rstrip())
        elif event.event == "stage":
            attempt = int(data.get("attempt", 1) or 1)
            retry = f" (attempt {attempt})" if attempt > 1 else ""
            status = str(data.get("status", "?"))
            self.stage = str(data.get("stage", self.stage))
            self._print(f"  {_STATUS_MARK.get(status, '*')} {self.stage:<10} {status}{retry}")
        elif event.event == "completed":
            self.progress = 1.0
            self.message = "done"
            self._print(f"  job completed  [{bar(1.0, 30)}] 100%")
        elif event.event == "failed":
            where = f" in {data['stage']}" if data.get("stage") else ""
            self._print(
                f"  job FAILED{where}: {data.get('code', 'error')}: {data.get('message', '')}"
            )
        elif event.event == "cancelled":
            self._print("  job cancelled")

    def keepalive(self) -> None:
        """A keep-alive comment arrived: the job is alive, just slow (a model is loading)."""
        self._ticks += 1
        if self.tty:
            self._redraw()

    def close(self) -> None:
        if self.tty and self._line_shown:
            self.out.write("\r" + " " * _width() + "\r")
            self.out.flush()
            self._line_shown = False

    def _redraw(self) -> None:
        width = _width()
        spin = self._SPINNER[self._ticks % len(self._SPINNER)]
        line = (
            f"[{bar(self.progress, 30)}] {self.progress:4.0%} {spin} {self.stage}  {self.message}"
        )
        self.out.write("\r" + line[: width - 1].ljust(width - 1))
        self.out.flush()
        self._line_shown = True

    def _print(self, line: str) -> None:
        if self.tty and self._line_shown:
            self.out.write("\r" + " " * (_width() - 1) + "\r")
        self.out.write(line + "\n")
        self.out.flush()
        if self.tty:
            self._redraw()


_STATUS_MARK = {"running": ">", "completed": "+", "failed": "x", "skipped": "~"}


def _width() -> int:
    return max(40, min(120, shutil.get_terminal_size((100, 24)).columns))


# ----------------------------------------------------------------------------- score card


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def mmss(seconds: float) -> str:
    # Truncated like a player's clock (and the jury's citations), never rounded up.
    whole = max(0, int(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def cents_text(cents: float | None) -> str:
    """Signed cents as words, so nobody has to remember that negative means flat."""
    if cents is None:
        return "-"
    if abs(cents) < 5:
        return "in tune"
    return f"{abs(cents):.0f} c {'flat' if cents < 0 else 'sharp'}"


def timing_text(offset_ms: float | None) -> str:
    if offset_ms is None:
        return "-"
    if abs(offset_ms) < 20:
        return "on time"
    return f"{abs(offset_ms):.0f} ms {'early' if offset_ms < 0 else 'late'}"


def register_text(octaves: Any) -> str | None:
    """`1 octave below`, `2 octaves above`; None when sung in the reference's register."""
    if not isinstance(octaves, int) or isinstance(octaves, bool) or octaves == 0:
        return None
    unit = "octave" if abs(octaves) == 1 else "octaves"
    # The scorer's sign: performance minus reference, so negative is below.
    return f"{abs(octaves)} {unit} {'below' if octaves < 0 else 'above'}"


def _pct(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.0%}"


def _score_line(label: str, score: Any, weight: Any, detail: str) -> list[str]:
    number = _num(score)
    weight_number = _num(weight)
    weight_text = f"weight {weight_number:.0%}" if weight_number is not None else ""
    if number is None:
        head = f"  {label:<8} {'not scored':>10}  {'':<32} {weight_text}"
    else:
        head = f"  {label:<8} {number:5.1f} /100  [{bar(number / 100, 30)}] {weight_text}"
    return [head.rstrip(), f"{'':13}{detail}"]


def _section(title: str) -> list[str]:
    return ["", title, "-" * len(title)]


def render_score_card(
    result: JsonDict,
    *,
    elapsed_s: float | None = None,
    inputs_note: str | None = None,
    width: int = 96,
) -> str:
    """The result of `GET /v1/jobs/{id}/result` as a plain-text card.

    `elapsed_s` is the client-measured time from submission to the terminal event;
    `inputs_note` says what was submitted (shown so the numbers can be judged honestly).
    Missing or null fields are shown as such, never guessed.
    """
    out: list[str] = []
    rule = "=" * width
    total = _num(result.get("score"))
    out += [
        rule,
        f"VOICEJURY SCORE CARD   job {result.get('job_id', '?')}".center(width).rstrip(),
        rule,
    ]
    out.append(f"  TOTAL  {total:5.1f} / 100" if total is not None else "  TOTAL  - / 100")
    out.append(f"         [{bar((total or 0.0) / 100, 60)}]")
    if inputs_note:
        out += [
            "",
            *textwrap.wrap(inputs_note, width - 2, initial_indent="  ", subsequent_indent="  "),
        ]

    weights: JsonDict = result.get("weights") or {}
    pitch: JsonDict = result.get("pitch") or {}
    rhythm: JsonDict = result.get("rhythm") or {}
    lyrics: JsonDict | None = result.get("lyrics")
    out += _section("Components")
    pitch_detail = (
        f"{_pct(pitch.get('accuracy'))} of voiced frames within "
        f"+/-{_num(pitch.get('tolerance_cents')) or 0:.0f} c, "
        f"mean error {_num(pitch.get('mean_abs_error_cents')) or 0:.0f} c"
    )
    out += _score_line("Pitch", pitch.get("score"), weights.get("pitch"), pitch_detail)
    rhythm_detail = (
        f"onsets P {_pct(rhythm.get('onset_precision'))} / R {_pct(rhythm.get('onset_recall'))}, "
        f"mean timing error {_num(rhythm.get('mean_abs_timing_ms')) or 0:.0f} ms"
    )
    out += _score_line("Rhythm", rhythm.get("score"), weights.get("rhythm"), rhythm_detail)
    if lyrics:
        lyrics_detail = (
            f"WER {_num(lyrics.get('wer')) or 0:.2f} vs {lyrics.get('against', '?')}: "
            f"{lyrics.get('words_missed', 0)} missed, {lyrics.get('words_wrong', 0)} wrong, "
            f"{lyrics.get('words_extra', 0)} extra of {lyrics.get('words_expected', 0)}"
        )
        out += _score_line("Lyrics", lyrics.get("score"), weights.get("lyrics"), lyrics_detail)
    else:
        out += _score_line("Lyrics", None, weights.get("lyrics"), "(weights renormalised)")

    out += _section("Reported apart (not counted as errors)")
    key = _num(pitch.get("key_offset_cents"))
    counted = pitch.get("key_offset_counted")
    key_text = "-" if key is None else f"{key:+.0f} cents ({key / 100:+.2f} semitones)"
    if counted is True:
        key_text += ", counted"
    out.append(f"  Key offset          {key_text}")
    register = register_text(pitch.get("register_offset_octaves"))
    if register is not None:
        out.append(f"  Register            {register} (not counted)")
    latency = _num(rhythm.get("global_offset_ms"))
    latency_text = "-" if latency is None else f"{latency:+.0f} ms"
    out.append(f"  Recording latency   {latency_text} (global offset, removed before timing)")
    tempo = _num(rhythm.get("tempo_ratio"))
    if tempo is not None:
        out.append(f"  Tempo ratio         {tempo:.3f} (performance / reference duration)")
    octave_folds, octave_switches = pitch.get("octave_errors_folded"), pitch.get("octave_switches")
    if octave_folds is not None or octave_switches is not None:
        out.append(
            f"  Octaves             {octave_folds or 0} frames an octave off (folded), "
            f"octave switches: {octave_switches or 0}"
        )
    separated = [
        role for role in ("performance", "reference") if result.get(f"{role}_separated") is True
    ]
    out.append(
        f"  Separated           {', '.join(separated) if separated else 'none (vocals given)'}"
    )

    out += _render_expression(result.get("expression"))
    out += _render_lines(result.get("lines") or (), width)
    out += _render_warnings(result.get("warnings") or ())
    out += _render_jury(result.get("jury"), width)
    out += _render_provenance(result.get("provenance") or (), elapsed_s)
    out.append(rule)
    return "\n".join(out) + "\n"


def _render_expression(expression: JsonDict | None) -> list[str]:
    if not expression:
        return []
    out = _section("Expression (for the jury; not scored)")
    held, with_vibrato = expression.get("held_notes", 0), expression.get("vibrato_notes", 0)
    rate, depth = (
        _num(expression.get("vibrato_rate_hz")),
        _num(expression.get("vibrato_extent_cents")),
    )
    vibrato = f"on {with_vibrato} of {held} long notes"
    if rate is not None and depth is not None:
        vibrato += f", {rate:.1f} Hz, +/-{depth:.0f} cents"
    out.append(f"  Vibrato             {vibrato}")
    steadiness = _num(expression.get("steadiness_cents"))
    if steadiness is not None:
        out.append(f"  Long notes          wobble {steadiness:.0f} cents (median, vibrato removed)")
    scoops = expression.get("scoops", 0)
    starts = ", ".join(mmss(_num(t) or 0.0) for t in (expression.get("scoop_starts_s") or ())[:4])
    out.append(f"  Scoops              {scoops}" + (f" (at {starts})" if starts else ""))
    return out


def _render_lines(lines: Sequence[JsonDict], width: int) -> list[str]:
    out = _section(f"Line by line ({len(lines)})")
    if not lines:
        return [*out, "  (no lines)"]
    out.append(f"  {'#':>2}  {'time':<11}  {'pitch':>5}  {'tuning':<12}  {'timing':<13}  text")
    indent = " " * 55  # where the text column starts
    for line in lines:
        start, end = _num(line.get("start_s")) or 0.0, _num(line.get("end_s")) or 0.0
        row = (
            f"  {line.get('index', '?'):>2}  {mmss(start)}-{mmss(end)}  "
            f"{_pct(line.get('pitch_accuracy')):>5}  "
            f"{cents_text(_num(line.get('mean_signed_cents'))):<12}  "
            f"{timing_text(_num(line.get('timing_offset_ms'))):<13}  "
        )
        text = [str(line.get("text") or "")]
        missed = [str(w) for w in line.get("words_missed") or ()]
        if missed and " ".join(missed).casefold() == " ".join(text[0].split()).casefold():
            text.append("(no word of this line recognised)")
        elif missed:
            text.append(f"missed: {' '.join(missed)}")
        if line.get("words_wrong"):
            text.append(f"wrong: {' '.join(line['words_wrong'])}")
        wrapped = [w for part in text for w in textwrap.wrap(part, max(20, width - len(indent)))]
        out.append((row + (wrapped[0] if wrapped else "")).rstrip())
        out += [indent + w for w in wrapped[1:]]
    return out


def _render_warnings(warnings: Sequence[JsonDict]) -> list[str]:
    if not warnings:
        return [*_section("Warnings"), "  none"]
    out = _section(f"Warnings ({len(warnings)})")
    for warning in warnings:
        out.append(f"  ! {warning.get('code', '?')}: {warning.get('message', '')}")
    return out


def _render_jury(jury: JsonDict | None, width: int) -> list[str]:
    out = _section("The jury")
    if not jury:
        return [*out, "  (no jury for this job)"]
    members: Sequence[JsonDict] = jury.get("members") or ()
    for member in members:
        vote = str(member.get("vote", "?")).upper()
        origin = str(member.get("source", "?"))
        if member.get("model"):
            origin += f", {member['model']}"
        latency = _num(member.get("latency_ms"))
        if latency is not None:
            origin += f", {latency:.0f} ms"
        out.append(f"  {member.get('name', member.get('persona', '?'))}  votes {vote}  ({origin})")
        comment = " ".join(str(member.get("comment", "")).split())
        out += textwrap.wrap(
            f'"{comment}"', width - 6, initial_indent="    ", subsequent_indent="     "
        )
        out.append("")
    yes = sum(1 for m in members if str(m.get("vote")) == "yes")
    verdict = str(jury.get("verdict", "?")).upper()
    out.append(f"  VERDICT: {verdict}  ({yes} of {len(members)} voted yes)")
    return out


def _render_provenance(runs: Sequence[JsonDict], elapsed_s: float | None) -> list[str]:
    out = _section("Stage timings")
    for run in runs:
        seconds = _num(run.get("seconds"))
        flags = [
            flag
            for flag, on in (
                ("skipped", run.get("skipped")),
                ("cached", run.get("cached")),
                (f"attempt {run.get('attempt')}", (run.get("attempt") or 1) > 1),
            )
            if on
        ]
        model = str(run.get("model") or "-")
        if run.get("device"):
            model += f" on {run['device']}"
        out.append(
            f"  {run.get('stage', '?'):<10} {'-' if seconds is None else f'{seconds:7.2f} s':>9}"
            f"  {model}{'  (' + ', '.join(flags) + ')' if flags else ''}"
        )
    if runs:
        total = sum(_num(r.get("seconds")) or 0.0 for r in runs)
        out.append(f"  {'sum':<10} {total:7.2f} s")
    if elapsed_s is not None:
        out.append(
            f"  {'end to end':<10} {elapsed_s:7.2f} s (submit -> completed, as the client saw it)"
        )
    return out
