"""The deterministic jury: persona-specific comments written from the evidence alone.

Used when no model answers in time (or answers badly), so a job always gets a full jury.
Each persona looks at different evidence (the coach at her best line and one fix, the
showman at groove and tempo, the technician at the numbers) and a comment is assembled
from the sentences that evidence calls for. Where a persona has several phrasings for the
same sentence, the choice is seeded by a hash of the result: the same input always gives
the same text, and two different performances rarely read alike.

Every comment cites the evidence by the same check a model's answer must pass
(`citations.find_citations`): each persona always has a sentence that cites, and
shortening keeps one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from voicejury_contracts.result import Vote

from .citations import CitableFacts, citable_facts, find_citations
from .evidence import PLAYBACK_WARNING, Evidence, Moment, clock
from .personas import COACH, SHOWMAN, Persona

Phrases = Mapping[str, Sequence[str]]

# A held note wavering by less than this (RMS, cents) is called steady.
STEADY_CENTS = 12
# The shortest comment length the jury accepts (`max_comment_chars`): every persona's
# opener, shortest citing sentence and vote fit in it, so `truncate` never cuts a fallback
# comment into one that cites nothing or has lost its vote. The longest such trio is the
# coach's in French with a 4-digit cents figure, about 260 characters; a unit test runs the
# writer over many results at this length.
MIN_COMMENT_CHARS = 280

_COACH: dict[str, Phrases] = {
    "en": {
        "open_high": (
            "What a lovely performance: {score}/100, and you earned every point.",
            "{score}/100! You sang with real ease tonight.",
        ),
        "open_mid": (
            "{score}/100: there is a real singer in there, and I heard it.",
            "A solid {score}/100, and you gave us plenty to build on.",
        ),
        "open_low": (
            "{score}/100 tonight. I know that stings a little, but I heard good things.",
            "You scored {score}/100; let's look at what will move it up.",
        ),
        "open_floor": (
            "{score}/100 is a starting point, not a verdict on you.",
            "Tonight was {score}/100. Singing is a skill, and skills grow.",
        ),
        "best": (
            "Your line at {at}{lyric} was my favourite: {acc}% of the notes sat exactly "
            "where they belong.",
            "I loved {at}{lyric}: {acc}% of the notes in tune. That is the sound to chase.",
        ),
        "flat": (
            "At {at} you slipped {cents} cents flat; keep the breath moving and think of the "
            "note as slightly higher.",
            "Around {at} the pitch sagged {cents} cents under the note. Support from the "
            "belly will lift it.",
        ),
        "sharp": (
            "At {at} you pushed {cents} cents sharp; relax the throat and let the note come "
            "to you.",
            "Around {at} you were reaching, {cents} cents sharp. Less force, more air.",
        ),
        "in_tune": (
            "Your intonation stayed close to the melody all the way, only {mae} cents of "
            "drift on average.",
        ),
        "words": (
            "And keep the words with you: at {at}, “{word}” got away.",
            "One more thing: the lyrics slipped at {at} (“{word}”). Sing them aloud while "
            "you practise.",
        ),
        "vibrato": (
            "The long note at {at} had a lovely vibrato, {rate} Hz and ±{extent} cents.",
            "I loved the vibrato on your long note at {at}: {rate} Hz, ±{extent} cents.",
        ),
        "steady": ("You held the long note at {at} steady, within {steady} cents.",),
        "wobble": (
            "The long note at {at} wavered by about {steady} cents: give it more breath support.",
        ),
        "anchor": (
            "I was listening closely from {at} on.",
            "From {at}, I heard a voice worth working with.",
        ),
        "yes": ("You have my yes.", "It's a yes from me. Keep growing."),
        "no": (
            "It's not a yes from me tonight, but please come back.",
            "Not yet a yes. Work on that and you will get there.",
        ),
    },
    "fr": {
        "open_high": (
            "Quelle belle prestation : {score}/100, et chaque point est mérité.",
            "{score}/100 ! Tu as chanté avec une vraie aisance ce soir.",
        ),
        "open_mid": (
            "{score}/100 : il y a une vraie voix en toi, je l'ai entendue.",
            "Un beau {score}/100, et tu nous as donné de quoi construire.",
        ),
        "open_low": (
            "{score}/100 ce soir. Je sais que ça pique un peu, mais j'ai entendu de belles choses.",
            "Tu obtiens {score}/100 ; voyons ce qui le fera monter.",
        ),
        "open_floor": (
            "{score}/100, c'est un point de départ, pas un jugement sur toi.",
            "Ce soir, c'était {score}/100. Le chant, ça s'apprend, et ça progresse.",
        ),
        "best": (
            "Ta ligne à {at}{lyric} était ma préférée : {acc} % des notes exactement à leur place.",
            "J'ai adoré {at}{lyric} : {acc} % des notes justes. C'est ce son-là qu'il faut "
            "chercher.",
        ),
        "flat": (
            "À {at}, ta voix est passée {cents} cents sous la note ; garde le souffle en "
            "mouvement et pense la note un peu plus haut.",
            "Vers {at}, la justesse a baissé de {cents} cents. Un appui sur le ventre la "
            "fera remonter.",
        ),
        "sharp": (
            "À {at}, tu as poussé {cents} cents trop haut ; détends la gorge et laisse venir "
            "la note.",
            "Vers {at}, tu forçais : {cents} cents au-dessus. Moins de force, plus d'air.",
        ),
        "in_tune": (
            "Ta justesse est restée proche de la mélodie tout du long, à peine {mae} cents "
            "d'écart en moyenne.",
        ),
        "words": (
            "Et garde les paroles avec toi : à {at}, « {word} » t'a échappé.",
            "Encore une chose : les paroles ont flanché à {at} (« {word} »). Chante-les à "
            "voix haute en répétant.",
        ),
        "vibrato": (
            "La note tenue à {at} avait un joli vibrato, {rate} Hz et ±{extent} cents.",
            "J'ai adoré le vibrato de ta note tenue à {at} : {rate} Hz, ±{extent} cents.",
        ),
        "steady": ("Tu as tenu la note longue à {at} bien stable, à {steady} cents près.",),
        "wobble": (
            "La note tenue à {at} a vacillé d'environ {steady} cents : soutiens-la avec "
            "plus de souffle.",
        ),
        "anchor": (
            "Dès {at}, j'étais tout ouïe.",
            "Dès {at}, j'ai entendu une voix qui mérite d'être travaillée.",
        ),
        "yes": ("Tu as mon oui.", "C'est un oui pour moi. Continue de grandir."),
        "no": (
            "Ce n'est pas un oui ce soir, mais reviens, s'il te plaît.",
            "Pas encore un oui. Travaille ce point et tu y arriveras.",
        ),
    },
}

_SHOWMAN: dict[str, Phrases] = {
    "en": {
        "open_high": (
            "Now THAT is how you own a stage: {score}/100!",
            "Ladies and gentlemen, {score}/100! The room was yours.",
        ),
        "open_mid": (
            "{score}/100, and you had us with you for most of the ride.",
            "Good show: {score}/100, with moments where it really took off.",
        ),
        "open_low": (
            "{score}/100. There was a spark, but it didn't catch fire yet.",
            "I saw nerves tonight, {score}/100, but I also saw flashes.",
        ),
        "open_floor": (
            "{score}/100. The stage felt bigger than you tonight.",
            "{score}/100: the energy never quite arrived.",
        ),
        "rushing": (
            "You were racing the band, {pct}% faster than the track; let the song breathe.",
            "Slow down: {pct}% ahead of the tempo, the big moments need room.",
        ),
        "dragging": (
            "The tempo dragged, {pct}% slower than the track, and the energy sank with it.",
            "You fell {pct}% behind the tempo, and a show lives on momentum.",
        ),
        "groove": (
            "Your groove was locked in: rhythm {rhythm}/100.",
            "You rode that beat, rhythm {rhythm}/100, and that's what gets people moving.",
        ),
        "loose": (
            "Rhythm {rhythm}/100: the pulse wasn't always with you.",
            "Only {rhythm}/100 on rhythm. Feel the kick drum, move with it.",
        ),
        "late": (
            "At {at} you came in {ms} ms behind the beat: on stage you attack, you don't wait.",
            "{at}, {ms} ms late. Hit that entrance like you mean it!",
        ),
        "early": (
            "At {at} you jumped in {ms} ms early. Trust the band.",
            "{at}: {ms} ms ahead of the beat. Let the music lead you in.",
        ),
        "moment": (
            "The moment at {at}{lyric}? That's when the lights came up.",
            "{at}{lyric}: goosebumps. More of that!",
        ),
        "entrances": (
            "Your entrances landed {ms} ms off the beat on average: every one of them counts!",
            "On average you were {ms} ms away from the beat. The audience feels that!",
        ),
        "words": (
            "You lost the words at {at}; it happens to the best, but sell it anyway.",
            "The lyrics got away from you at {at}. Never let the audience see it.",
        ),
        "anchor": ("From {at} on, all eyes were on you.", "At {at} you stepped into the light."),
        "yes": ("I want to see you again: yes!", "Yes! Bring that energy to the next round!"),
        "no": (
            "For me it's a no. Come back with more fire.",
            "It's a no tonight; the show needs more from you.",
        ),
    },
    "fr": {
        "open_high": (
            "Ça, c'est ce qui s'appelle tenir une scène : {score}/100 !",
            "Mesdames et messieurs, {score}/100 ! La salle était à toi.",
        ),
        "open_mid": (
            "{score}/100, et tu nous as embarqués presque tout du long.",
            "Beau show : {score}/100, avec des moments où ça a vraiment décollé.",
        ),
        "open_low": (
            "{score}/100. Il y avait une étincelle, mais le feu n'a pas pris.",
            "J'ai vu du trac ce soir, {score}/100, mais aussi des éclairs.",
        ),
        "open_floor": (
            "{score}/100. La scène était plus grande que toi ce soir.",
            "{score}/100 : l'énergie n'est jamais vraiment arrivée.",
        ),
        "rushing": (
            "Tu faisais la course avec l'orchestre, {pct} % plus vite que la bande ; laisse "
            "respirer la chanson.",
            "Doucement : {pct} % d'avance sur le tempo, les grands moments ont besoin de place.",
        ),
        "dragging": (
            "Le tempo a traîné, {pct} % plus lent que la bande, et l'énergie est retombée avec.",
            "Tu as pris {pct} % de retard sur le tempo, et un show vit de son élan.",
        ),
        "groove": (
            "Ton groove était calé : rythme {rhythm}/100.",
            "Tu as surfé sur le beat, rythme {rhythm}/100, c'est ça qui fait bouger la salle.",
        ),
        "loose": (
            "Rythme {rhythm}/100 : la pulsation ne t'a pas toujours suivi.",
            "Seulement {rhythm}/100 en rythme. Sens la grosse caisse, bouge avec elle.",
        ),
        "late": (
            "À {at}, ton entrée est arrivée {ms} ms après le temps : sur scène, on attaque, "
            "on n'attend pas.",
            "{at}, {ms} ms de retard. Attaque cette entrée avec conviction !",
        ),
        "early": (
            "À {at}, ton départ est venu {ms} ms trop tôt. Fais confiance aux musiciens.",
            "{at} : {ms} ms d'avance sur le temps. Laisse la musique t'amener.",
        ),
        "moment": (
            "Le moment à {at}{lyric} ? Là, les projecteurs se sont allumés.",
            "{at}{lyric} : des frissons. Encore plus de ça !",
        ),
        "entrances": (
            "Tes entrées tombaient en moyenne à {ms} ms du temps : chacune compte !",
            "En moyenne, tu étais à {ms} ms du temps. Le public le sent !",
        ),
        "words": (
            "Tu as perdu les paroles à {at} ; ça arrive aux meilleurs, mais vends-le quand même.",
            "Les paroles t'ont échappé à {at}. Le public ne doit jamais le voir.",
        ),
        "anchor": (
            "Dès {at}, tous les regards étaient sur toi.",
            "À {at}, la lumière était sur toi.",
        ),
        "yes": ("Je veux te revoir : oui !", "Oui ! Apporte cette énergie au prochain tour !"),
        "no": (
            "Pour moi, c'est non. Reviens avec plus de feu.",
            "C'est non ce soir ; le show a besoin de plus.",
        ),
    },
}

_TECHNICIAN: dict[str, Phrases] = {
    "en": {
        "open": (
            "Overall {score}/100. Pitch {pitch}/100: {acc}% of voiced notes within ±{tol} "
            "cents, mean error {mae} cents.",
            "Score {score}/100. Intonation: {acc}% inside the ±{tol}-cent tolerance, {mae} "
            "cents mean absolute error (pitch {pitch}/100).",
        ),
        "key_counted": ("You sang {semi} {dir} the reference key, and it counted against you.",),
        "key_free": ("Transposed {semi} {dir}: allowed here, but noted.",),
        "octave": ("One octave jump mid-song: choose a register and stay in it.",),
        "octaves": ("{n} octave jumps mid-song: choose a register and stay in it.",),
        "worst": (
            "Weakest line: {at}, {cents} cents {dir} on average.",
            "The line at {at} averaged {cents} cents {dir}, the largest error of the song.",
        ),
        "timing": (
            "Timing: {mae_ms} ms mean deviation once the {lat} ms device latency is removed.",
            "Rhythm {rhythm}/100, {mae_ms} ms average timing error (device latency of {lat} "
            "ms not counted).",
        ),
        "lyrics": ("Lyrics: {wer}% word error rate, {missed} of {expected} words missed.",),
        "scoops": (
            "{n} notes were entered with a scoop from below, the first at {at}: land on the pitch.",
        ),
        "warning": ("Caveat: {what}.",),
        "anchor": ("First timed moment: {at}.",),
        "yes": ("Technically sound. Yes.", "The numbers hold up: yes."),
        "no": ("Not at this level yet: no.", "The intonation isn't there yet. No."),
        "flat": ("flat",),
        "sharp": ("sharp",),
        "up": ("above",),
        "down": ("below",),
        "semitone": ("semitone",),
        "semitones": ("semitones",),
    },
    "fr": {
        "open": (
            "Note globale {score}/100. Justesse {pitch}/100 : {acc} % des notes chantées à "
            "±{tol} cents, erreur moyenne {mae} cents.",
            "Score {score}/100. Intonation : {acc} % dans la tolérance de ±{tol} cents, "
            "{mae} cents d'erreur absolue moyenne (justesse {pitch}/100).",
        ),
        "key_counted": (
            "Tu as chanté {semi} {dir} de la tonalité de référence, et cela a été compté.",
        ),
        "key_free": ("Transposé de {semi} {dir} : autorisé ici, mais relevé.",),
        "octave": ("Un saut d'octave en cours de chanson : choisis un registre et tiens-le.",),
        "octaves": ("{n} sauts d'octave en cours de chanson : choisis un registre et tiens-le.",),
        "worst": (
            "Ligne la plus faible : {at}, {cents} cents {dir} en moyenne.",
            "La ligne à {at} était en moyenne à {cents} cents {dir}, la pire de la chanson.",
        ),
        "timing": (
            "Mise en place : {mae_ms} ms d'écart moyen, une fois retirés les {lat} ms de "
            "latence de l'appareil.",
            "Rythme {rhythm}/100, {mae_ms} ms d'erreur moyenne (latence de l'appareil de "
            "{lat} ms non comptée).",
        ),
        "lyrics": ("Paroles : {wer} % de taux d'erreur, {missed} mots manqués sur {expected}.",),
        "scoops": (
            "{n} notes attaquées en glissant par en dessous, la première à {at} : pose la "
            "note directement.",
        ),
        "warning": ("Réserve : {what}.",),
        "anchor": ("Premier moment repéré : {at}.",),
        "yes": ("Techniquement solide. Oui.", "Les chiffres tiennent : oui."),
        "no": ("Pas encore à ce niveau : non.", "La justesse n'y est pas encore. Non."),
        "flat": ("trop bas",),
        "sharp": ("trop haut",),
        "up": ("au-dessus",),
        "down": ("en dessous",),
        "semitone": ("demi-ton",),
        "semitones": ("demi-tons",),
    },
}


# What the scorer's warning codes (`ResultWarning.code`) mean, said to a singer. A code not
# listed here (a newer scorer's) gets the `""` entry: a code is never shown as it is.
_WARNINGS: dict[str, Mapping[str, str]] = {
    "en": {
        "unknown_difficulty": "the difficulty asked for was unknown, so it was scored as normal",
        "contour_too_long": "the end of a very long take was not analysed",
        "latency_out_of_range": "the recording's delay was unusual, so the first notes may "
        "be misjudged",
        "no_words_recognised": "no words were recognised",
        "lyrics_not_scored": "the lyrics were not scored",
        "reference_unusable": "the original had too little melody to judge against",
        "no_vocals_detected": "no singing was detected",
        "performance_too_short": "the take covers only part of the song",
        "low_voicing": "little singing was detected in the recording",
        "erratic_pitch": "the pitch jumped erratically, perhaps noise rather than singing",
        "performance_too_long": "part of the singing came after the song had ended",
        "melody_mismatch": "the melody may be another song's",
        "alignment_band_widened": "the take strayed far from the song's timing",
        "matches_reference_recording": "this sounds like the original recording played "
        "back, not sung",
        "": "the analysis flagged a problem with the recording",
    },
    "fr": {
        "unknown_difficulty": "la difficulté demandée était inconnue, la note est celle du "
        "niveau normal",
        "contour_too_long": "la fin d'une très longue prise n'a pas été analysée",
        "latency_out_of_range": "le décalage de l'enregistrement était inhabituel, les "
        "premières notes peuvent être mal jugées",
        "no_words_recognised": "aucun mot n'a été reconnu",
        "lyrics_not_scored": "les paroles n'ont pas été notées",
        "reference_unusable": "l'original avait trop peu de mélodie pour servir de mesure",
        "no_vocals_detected": "aucun chant n'a été détecté",
        "performance_too_short": "la prise ne couvre qu'une partie de la chanson",
        "low_voicing": "très peu de chant a été détecté dans l'enregistrement",
        "erratic_pitch": "la hauteur sautait de façon erratique, peut-être du bruit plutôt "
        "que du chant",
        "performance_too_long": "une partie du chant est venue après la fin de la chanson",
        "melody_mismatch": "la mélodie est peut-être celle d'une autre chanson",
        "alignment_band_widened": "la prise s'est beaucoup écartée du rythme de la chanson",
        "matches_reference_recording": "on dirait l'enregistrement original repassé, pas chanté",
        "": "l'analyse signale un problème dans l'enregistrement",
    },
}


# Every persona's opener for a take the scorer found to be the reference played back: the
# score's praise would contradict the "no" every judge gives it. No longer than the
# longest opener, so `MIN_COMMENT_CHARS` still holds.
_PLAYBACK_OPENER: Mapping[str, str] = {
    "en": "{score}/100, but that is the original played back, not sung: it cannot go through.",
    "fr": "{score}/100, mais c'est l'original repassé, pas chanté : ça ne peut pas passer.",
}


class _Writer:
    """Renders one persona's sentences in one language, picking phrasings by seed."""

    def __init__(self, phrases: Phrases, seed: str, language: str) -> None:
        self._phrases = phrases
        self._seed = seed
        self.language = language
        # (rank, text): rank 0 is always kept; higher ranks are dropped first when the
        # comment must be shortened, so the opener and the vote survive any length limit.
        self.sentences: list[tuple[int, str]] = []

    def pick(self, slot: str) -> str:
        options = self._phrases[slot]
        digest = hashlib.sha256(f"{self._seed}|{slot}".encode()).digest()
        return options[int.from_bytes(digest[:4], "big") % len(options)]

    def say(self, slot: str, *, rank: int = 0, **fields: Any) -> None:
        self.sentences.append((rank, self.pick(slot).format(**fields)))

    def lyric(self, m: Moment) -> str:
        if not m.text:
            return ""
        return f" (« {m.text} »)" if self.language == "fr" else f" (“{m.text}”)"

    def text(self, max_chars: int, facts: CitableFacts) -> str:
        kept = list(self.sentences)
        # One sentence that cites the evidence is kept like the opener and the vote (the
        # shortest, unless one of those already cites): without it the comment would fail
        # the check every model answer must pass.
        citing = [i for i, (_, t) in enumerate(kept) if find_citations(t, facts).verified]
        if citing and all(kept[i][0] for i in citing):
            anchor = min(citing, key=lambda i: len(kept[i][1]))
            kept[anchor] = (0, kept[anchor][1])
        while len(" ".join(t for _, t in kept)) > max_chars and any(r for r, _ in kept):
            # Drop the last sentence of the highest rank: least important, latest said.
            top = max(r for r, _ in kept)
            last = max(i for i, (r, _) in enumerate(kept) if r == top)
            del kept[last]
        return " ".join(t for _, t in kept)


def _band(score: float) -> str:
    if score >= 80:
        return "open_high"
    if score >= 60:
        return "open_mid"
    if score >= 40:
        return "open_low"
    return "open_floor"


def _pct(value: float) -> int:
    return round(100 * value)


def _coach(w: _Writer, ev: Evidence) -> None:
    w.say(_band(ev.result.score), score=ev.score)
    best = ev.best
    if best is not None and (best.pitch_accuracy or 0.0) >= 0.6:
        accuracy = _pct(best.pitch_accuracy or 0.0)
        w.say("best", rank=2, at=best.clock, lyric=w.lyric(best), acc=accuracy)
    worst = ev.worst_pitch
    if worst is not None:
        w.say("flat" if worst.flat else "sharp", rank=1, at=worst.clock, cents=worst.cents)
    else:
        w.say("in_tune", rank=1, mae=round(ev.result.pitch.mean_abs_error_cents))
    if ev.lyric_slip is not None:
        w.say("words", rank=3, at=ev.lyric_slip.clock, word=ev.lyric_slip.lyric_slips[0])
    held = ev.held_note
    if held is not None:
        at = clock(held.start_s)
        if held.vibrato_rate_hz is not None and held.vibrato_extent_cents is not None:
            rate, extent = round(held.vibrato_rate_hz, 1), round(held.vibrato_extent_cents)
            w.say("vibrato", rank=4, at=at, rate=rate, extent=extent)
        else:
            steady = max(1, round(held.steadiness_cents))
            w.say("steady" if steady <= STEADY_CENTS else "wobble", rank=4, at=at, steady=steady)


def _showman(w: _Writer, ev: Evidence) -> None:
    r = ev.result
    w.say(_band(r.score), score=ev.score)
    # tempo_ratio is performance duration / reference: below 1 the singer finished early.
    if r.rhythm.tempo_ratio < 0.97:
        w.say("rushing", rank=1, pct=_pct(1 / r.rhythm.tempo_ratio - 1))
    elif r.rhythm.tempo_ratio > 1.03:
        w.say("dragging", rank=1, pct=_pct(1 - 1 / r.rhythm.tempo_ratio))
    else:
        slot = "groove" if r.rhythm.score >= 70 else "loose"
        w.say(slot, rank=1, rhythm=round(r.rhythm.score))
    if ev.worst_timing is not None:
        m = ev.worst_timing
        w.say("late" if m.late else "early", rank=2, at=m.clock, ms=m.timing_ms)
    elif ev.best is not None:
        w.say("moment", rank=2, at=ev.best.clock, lyric=w.lyric(ev.best))
    else:
        # No line to point at (no lines, or none with a pitch measure): the song-wide timing
        # is the one measured figure left in the showman's territory.
        w.say("entrances", rank=2, ms=round(r.rhythm.mean_abs_timing_ms))
    slip = ev.lyric_slip
    # One remark per moment: a late entrance and lost words on the same line read as nagging.
    if (
        slip is not None
        and slip != ev.worst_timing
        and r.lyrics is not None
        and r.lyrics.score < 70
    ):
        w.say("words", rank=3, at=slip.clock)


def _technician(w: _Writer, ev: Evidence) -> None:
    r = ev.result
    p = r.pitch
    w.say(
        "open",
        score=ev.score,
        pitch=round(p.score),
        acc=_pct(p.accuracy),
        tol=round(p.tolerance_cents),
        mae=round(p.mean_abs_error_cents),
    )
    semis = round(abs(p.key_offset_cents) / 100)
    if semis >= 1:
        unit = w.pick("semitone" if semis == 1 else "semitones")
        direction = w.pick("up" if p.key_offset_cents > 0 else "down")
        w.say(
            "key_counted" if p.key_offset_counted else "key_free",
            rank=3,
            semi=f"{semis} {unit}",
            dir=direction,
        )
    if p.octave_switches:
        w.say("octave" if p.octave_switches == 1 else "octaves", rank=4, n=p.octave_switches)
    if ev.worst_pitch is not None:
        m = ev.worst_pitch
        direction = w.pick("flat" if m.flat else "sharp")
        w.say("worst", rank=1, at=m.clock, cents=m.cents, dir=direction)
    w.say(
        "timing",
        rank=2,
        mae_ms=round(r.rhythm.mean_abs_timing_ms),
        lat=round(r.rhythm.global_offset_ms),
        rhythm=round(r.rhythm.score),
    )
    if r.lyrics is not None and r.lyrics.words_expected:
        w.say(
            "lyrics",
            rank=3,
            wer=_pct(r.lyrics.wer),
            missed=r.lyrics.words_missed,
            expected=r.lyrics.words_expected,
        )
    if ev.scoops >= 2 and ev.first_scoop is not None:
        w.say("scoops", rank=4, n=ev.scoops, at=ev.first_scoop)
    if ev.warning_codes:
        words = _WARNINGS[w.language]
        # A playback is said in every persona's opener (`write_fallback`).
        if codes := [c for c in ev.warning_codes if c != PLAYBACK_WARNING]:
            w.say("warning", rank=1, what=words.get(codes[0], words[""]))


def _seed(ev: Evidence) -> str:
    payload = ev.result.model_dump_json() + "\x00" + (ev.title or "")
    return hashlib.sha256(payload.encode()).hexdigest()


def write_fallback(
    persona: Persona, ev: Evidence, language: str, *, max_chars: int = 600
) -> tuple[str, Vote]:
    """One persona's comment and vote, from the evidence alone.

    `language` must be a supported code (`en`, `fr`); the caller normalises it. Optional
    sentences are left out, least important first, to stay within `max_chars`; the
    opener, one sentence citing the evidence and the vote always remain; from
    `MIN_COMMENT_CHARS` on they always fit (below it the text can exceed `max_chars`).
    Deterministic: the same arguments give the same text.
    """
    if persona.id == COACH.id:
        books, body = _COACH, _coach
    elif persona.id == SHOWMAN.id:
        books, body = _SHOWMAN, _showman
    else:
        books, body = _TECHNICIAN, _technician
    writer = _Writer(books[language], f"{persona.id}|{_seed(ev)}", language)
    body(writer, ev)
    if ev.played_back:
        writer.sentences[0] = (0, _PLAYBACK_OPENER[language].format(score=ev.score))
    facts = citable_facts(ev)
    anchor = _first_moment(ev)
    if anchor is not None and not any(
        find_citations(t, facts).verified for _, t in writer.sentences
    ):
        # The persona's own evidence cited only song-wide figures (no line off key or off
        # the beat, lines without measures): point at a moment, as a model must.
        writer.say("anchor", rank=1, at=anchor)
    vote = Vote.YES if persona.votes_yes(ev) and not ev.played_back else Vote.NO
    writer.say(vote.value)
    return writer.text(max_chars, facts), vote


def _first_moment(ev: Evidence) -> str | None:
    """The time of the first line, else of the longest held note, else of the first scoop."""
    if ev.moments:
        return ev.moments[0].clock
    if ev.held_note is not None:
        return clock(ev.held_note.start_s)
    return ev.first_scoop
