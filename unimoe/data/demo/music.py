"""Procedural music: compose a short piece from (mood, key, tempo, instruments), write it as
MIDI with mido, render it with fluidsynth and a General-MIDI soundfont, and caption it.

The caption is derived from the very parameters that shaped the audio (tempo, key, mode,
instruments, drums, metre), so text-to-music has a learnable text -> sound mapping.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mido
import numpy as np
import soundfile as sf
import torch

from unimoe.atomic import atomic_path
from unimoe.audio import save_audio
from unimoe.data.demo.speech import ToolMissingError, require_tool

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)

INSTRUMENTS: dict[int, str] = {
    0: "piano", 8: "celesta", 9: "glockenspiel", 10: "music box", 11: "vibraphone", 12: "marimba",
    13: "xylophone", 21: "accordion", 24: "nylon-string guitar", 25: "steel-string guitar",
    29: "overdriven guitar", 30: "distorted guitar", 32: "acoustic bass", 33: "electric bass",
    38: "synth bass", 40: "violin", 42: "cello", 46: "harp", 48: "strings", 50: "synth strings",
    52: "choir", 56: "trumpet", 61: "brass section", 68: "oboe", 71: "clarinet", 73: "flute",
    75: "pan flute", 80: "square-wave synth lead", 81: "sawtooth synth lead", 88: "new age pad",
    89: "warm pad", 94: "halo pad",
}


@dataclass(frozen=True)
class Mood:
    tempo: tuple[int, int]
    modes: tuple[str, ...]
    melody: tuple[int, ...]
    accompaniment: tuple[int, ...]
    bass: int | None
    drums: str | None
    """None, "light" or "driving"."""
    velocity: tuple[int, int]
    words: tuple[str, ...]
    rhythms: tuple[tuple[float, ...], ...]
    """Melody rhythm cells, in beats, each summing to one or two beats."""


SLOW_CELLS = ((1.0,), (1.0,), (2.0,), (0.5, 0.5), (1.5, 0.5))
FAST_CELLS = ((0.5, 0.5), (1.0,), (0.25, 0.25, 0.5), (0.75, 0.25), (0.5, 0.25, 0.25))

MOODS: dict[str, Mood] = {
    "calm": Mood((60, 84), ("major", "minor"), (0, 24, 73, 46, 11), (48, 89, 0), 32, None, (50, 70),
                 ("calm", "peaceful", "gentle", "relaxing"), SLOW_CELLS),
    "happy": Mood((108, 132), ("major",), (12, 25, 71, 0, 13), (0, 25, 21), 33, "light", (75, 95),
                  ("happy", "cheerful", "playful", "upbeat"), FAST_CELLS),
    "sad": Mood((56, 76), ("minor",), (42, 40, 68, 0), (48, 0, 52), 32, None, (45, 70),
                ("sad", "melancholic", "sorrowful", "wistful"), SLOW_CELLS),
    "energetic": Mood((132, 160), ("minor", "major"), (29, 80, 81, 56), (30, 50, 61), 38, "driving", (95, 120),
                      ("energetic", "driving", "intense", "powerful"), FAST_CELLS),
    "mysterious": Mood((68, 92), ("minor",), (8, 10, 75, 9), (88, 52, 94), 32, None, (50, 75),
                       ("mysterious", "dark", "eerie", "haunting"), SLOW_CELLS),
}

NOTE_NAMES = ["C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B"]
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (0, 3, 0, 4), (3, 4, 0, 0)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 5, 4)),
}
SUSTAINED = {48, 50, 52, 61, 88, 89, 94}
TICKS = 480


@dataclass
class PieceParams:
    """Everything that determines a piece (and its caption and video)."""

    mood: str
    root: int
    mode: str
    tempo: int
    beats_per_bar: int
    bars: int
    melody_program: int
    accompaniment_program: int
    bass_program: int | None
    drums: str | None
    progression: tuple[int, ...]
    seed: int
    words: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.bars * self.beats_per_bar * 60.0 / self.tempo

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.root]} {self.mode}"

    @property
    def tempo_word(self) -> str:
        return "slow" if self.tempo < 80 else ("moderate" if self.tempo < 110 else "fast")

    def to_meta(self) -> dict:
        meta = asdict(self)
        meta["progression"] = list(self.progression)
        meta["key"] = self.key
        return meta


def choose_params(rng: random.Random, min_seconds: float = 4.0, max_seconds: float = 8.0, mood: str | None = None) -> PieceParams:
    """Draw a piece whose length lies in ``[min_seconds, max_seconds]``."""
    mood = mood or rng.choice(sorted(MOODS))
    spec = MOODS[mood]
    mode = rng.choice(spec.modes)
    tempo = rng.randint(*spec.tempo)
    bpb = 3 if mood in ("calm", "sad") and rng.random() < 0.3 else 4
    bar_s = bpb * 60.0 / tempo
    target = rng.uniform(min_seconds, max_seconds)
    bars = max(1, round(target / bar_s))
    while bars * bar_s > max_seconds and bars > 1:
        bars -= 1
    while bars * bar_s < min_seconds:
        bars += 1
    melody = rng.choice(spec.melody)
    return PieceParams(
        mood=mood, root=rng.randrange(12), mode=mode, tempo=tempo, beats_per_bar=bpb, bars=bars,
        melody_program=melody, accompaniment_program=rng.choice([p for p in spec.accompaniment if p != melody]),
        bass_program=spec.bass if rng.random() < 0.8 else None, drums=spec.drums,
        progression=rng.choice(PROGRESSIONS[mode]), seed=rng.randrange(2**31),
        words={"mood": rng.choice(spec.words)},
    )


# ---------------------------------------------------------------------- composition
def _chord(params: PieceParams, degree: int, octave_base: int) -> list[int]:
    scale = SCALES[params.mode]
    notes = []
    for step in (0, 2, 4):
        d = degree + step
        notes.append(octave_base + params.root + scale[d % 7] + 12 * (d // 7))
    return notes


def compose(params: PieceParams) -> mido.MidiFile:
    """The piece as a type-1 MIDI file: melody, accompaniment, optional bass and drums."""
    rng = random.Random(params.seed)
    spec = MOODS[params.mood]
    bpb, bars = params.beats_per_bar, params.bars
    events: dict[int, list[tuple[int, int, int, int, int]]] = {0: [], 1: [], 2: [], 9: []}  # ch -> (start, dur, note, vel)

    def add(ch: int, start_beats: float, dur_beats: float, note: int, vel: int) -> None:
        events[ch].append((round(start_beats * TICKS), max(1, round(dur_beats * TICKS)), note, max(1, min(127, vel)), ch))

    lo, hi = spec.velocity
    scale = SCALES[params.mode]
    # melody: a random walk over the scale that lands on chord tones on each bar's downbeat
    degree = 7 + rng.choice((0, 2, 4))  # scale index, octave 5 region
    for bar in range(bars):
        chord_degree = params.progression[bar % len(params.progression)]
        beat = 0.0
        while beat < bpb - 1e-9:
            cell = rng.choice(spec.rhythms)
            if beat + sum(cell) > bpb + 1e-9:
                cell = (bpb - beat,)
            for i, dur in enumerate(cell):
                if beat == 0.0 and i == 0:
                    targets = [chord_degree + k + 7 for k in (0, 2, 4)]
                    degree = min(targets, key=lambda t: abs(t - degree))
                else:
                    degree += rng.choice((-2, -1, -1, 0, 1, 1, 2))
                    degree = max(3, min(14, degree))
                if rng.random() > 0.08 or bar == 0:
                    note = 60 + params.root + scale[degree % 7] + 12 * (degree // 7 - 1)
                    accent = 12 if beat == 0.0 else 0
                    add(0, bar * bpb + beat, dur * 0.95, note, rng.randint(lo, hi) + accent)
                beat += dur
        # accompaniment
        chord = _chord(params, chord_degree, 48)
        start = bar * bpb
        if params.accompaniment_program in SUSTAINED:
            for n in chord:
                add(1, start, bpb, n, lo)
        elif params.mood == "energetic":
            for k in range(bpb * 2):
                for n in (chord[0], chord[0] + 7):
                    add(1, start + k * 0.5, 0.45, n, hi - 10)
        elif params.mood == "happy":
            for k in range(bpb):
                for n in chord:
                    add(1, start + k + 0.5, 0.4, n, lo)
        else:  # arpeggio
            pattern = chord + [chord[1]]
            for k in range(bpb * 2):
                add(1, start + k * 0.5, 0.9, pattern[k % len(pattern)], lo - 5)
        # bass
        if params.bass_program is not None:
            root_note = 36 + params.root + scale[chord_degree % 7]
            hits = range(bpb) if params.mood in ("happy", "energetic") else (0,)
            for k in hits:
                add(2, start + k, 0.9 if len(hits) > 1 else bpb * 0.95, root_note, lo + 5)
        # drums (General MIDI channel 10): kick 36, snare 38, closed hi-hat 42, crash 49
        if params.drums is not None:
            for k in range(bpb):
                if params.drums == "driving" or k % 2 == 0:
                    add(9, start + k, 0.2, 36, hi)
                if k % 2 == 1:
                    add(9, start + k, 0.2, 38, hi - 5)
                for half in (0.0, 0.5):
                    add(9, start + k + half, 0.1, 42, lo)
            if bar == 0 and params.drums == "driving":
                add(9, start, 0.5, 49, hi)

    mid = mido.MidiFile(type=1, ticks_per_beat=TICKS)
    meta = mido.MidiTrack()
    meta.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(params.tempo), time=0))
    meta.append(mido.MetaMessage("time_signature", numerator=bpb, denominator=4, time=0))
    mid.tracks.append(meta)
    programs = {0: params.melody_program, 1: params.accompaniment_program, 2: params.bass_program}
    for ch, notes in events.items():
        if not notes:
            continue
        track = mido.MidiTrack()
        if ch != 9:
            track.append(mido.Message("program_change", program=programs[ch], channel=ch, time=0))
        timeline = []
        for start, dur, note, vel, _ in notes:
            timeline.append((start + dur, 0, mido.Message("note_off", note=note, velocity=0, channel=ch)))
            timeline.append((start, 1, mido.Message("note_on", note=note, velocity=vel, channel=ch)))
        timeline.sort(key=lambda e: (e[0], e[1]))  # note_off before note_on at the same tick
        now = 0
        for tick, _, msg in timeline:
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    return mid


# ---------------------------------------------------------------------- caption
def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(params: PieceParams, rng: random.Random) -> str:
    """A natural-language description of the piece, from its parameters."""
    mood = params.words.get("mood", params.mood)
    lead = INSTRUMENTS[params.melody_program]
    acc = INSTRUMENTS[params.accompaniment_program]
    drums = {None: "without drums", "light": "with a light drum beat", "driving": "with a driving drum beat"}[params.drums]
    metre = " in 3/4 time" if params.beats_per_bar == 3 else ""
    bass = f", {INSTRUMENTS[params.bass_program]}" if params.bass_program is not None else ""
    templates = [
        f"{_article(mood).capitalize()} {mood} {params.tempo_word} {lead} piece in {params.key} at {params.tempo} BPM{metre}, {drums}.",
        f"{mood.capitalize()} {lead} melody over {acc} chords, {params.tempo_word} tempo, {params.key}{metre}.",
        f"{_article(params.tempo_word).capitalize()} {params.tempo_word}, {mood} tune played on {lead} with {acc} accompaniment, {drums}, in {params.key}, {params.tempo} BPM.",
        f"{mood.capitalize()} music in {params.key}{metre}: {lead} lead, {acc}{bass}, {drums}; about {params.tempo} beats per minute.",
        f"Instrumental {params.mode}-key {lead} music, {mood} and {params.tempo_word}, {params.tempo} BPM, {drums}.",
    ]
    return rng.choice(templates)


# ---------------------------------------------------------------------- rendering
def find_soundfont() -> str:
    env = os.environ.get("UNIMOE_SOUNDFONT")
    for candidate in ([env] if env else []) + list(SOUNDFONT_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ToolMissingError(
        "no General-MIDI soundfont found (looked in " + ", ".join(SOUNDFONT_CANDIDATES)
        + "); install one with: apt-get install fluid-soundfont-gm, or set UNIMOE_SOUNDFONT"
    )


def render(midi: mido.MidiFile, out: Path, sample_rate: int, seconds: float, tail: float = 0.6, soundfont: str | None = None) -> float:
    """Render ``midi`` with fluidsynth to ``out`` (mono, atomically), cut to ``seconds + tail``."""
    exe = require_tool("fluidsynth", "fluidsynth")
    soundfont = soundfont or find_soundfont()
    out.parent.mkdir(parents=True, exist_ok=True)
    mid_tmp = out.with_name(f".{out.stem}.render-{os.getpid()}.mid")
    wav_tmp = out.with_name(f".{out.stem}.render-{os.getpid()}.wav")
    try:
        midi.save(str(mid_tmp))
        cmd = [exe, "-ni", "-q", "-g", "0.5", "-r", str(sample_rate), "-T", "wav", "-F", str(wav_tmp), soundfont, str(mid_tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not wav_tmp.exists():
            raise RuntimeError(f"fluidsynth failed for {out.name} ({' '.join(cmd)}): {proc.stderr.strip()}")
        data, sr = sf.read(str(wav_tmp), dtype="float32", always_2d=True)
    finally:
        mid_tmp.unlink(missing_ok=True)
        wav_tmp.unlink(missing_ok=True)
    mono = data.mean(axis=1)[: int(round((seconds + tail) * sr))]
    fade = min(len(mono), int(0.3 * sr))
    mono[len(mono) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    peak = float(np.abs(mono).max())
    if peak <= 1e-4:
        raise RuntimeError(f"fluidsynth rendered silence for {out.name}; is the soundfont {soundfont} valid?")
    save_audio(out, torch.from_numpy(mono * (0.9 / peak)).unsqueeze(0), sr)
    return len(mono) / sr


def write_midi(midi: mido.MidiFile, out: Path) -> None:
    with atomic_path(out) as tmp:
        midi.save(str(tmp))




