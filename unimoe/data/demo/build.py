"""Build the offline demo corpus: espeak-ng speech, fluidsynth music, synthetic video.

Every random choice is made up front from the seed (plan), then the clips are synthesised
in a thread pool (the work happens in espeak-ng / fluidsynth subprocesses, so threads
parallelise it). Clip files are written atomically and skipped when present, so a
re-run after a crash only makes what is missing, and the manifests are identical.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import soundfile as sf

from unimoe.atomic import write_json_atomic
from unimoe.data.demo import music, speech, video
from unimoe.data.demo.sentences import make_sentence
from unimoe.data.manifest import ManifestEntry, write_manifest
from unimoe.data.prompts import assign_prompts

CORPUS_VERSION = 2  # 2: music_test_clips / music_val_clips extra pieces per music task


class DemoCorpusError(RuntimeError):
    """The output folder holds a demo corpus built with different settings."""


@dataclass
class DemoConfig:
    """Size and shape of the demo corpus (``scaled`` multiplies the clip counts)."""

    speech_clips: int = 320
    t2m_clips: int = 22
    v2m_clips: int = 10
    music_test_clips: int = 16
    """Extra test clips per music task on top of ``t2m_clips`` / ``v2m_clips`` (whose own split
    is unchanged), so FAD and KL have sets to compare while training keeps ~10:1 speech:music."""
    music_val_clips: int = 3
    """Extra validation clips per music task (same idea), so the audio metrics scored while
    training (``AudioSamples(metrics=...)``) have more than one music prompt per task."""
    speakers: int = 12
    sample_rate: int = 24000
    speech_max_seconds: float = 4.0
    music_min_seconds: float = 4.0
    music_max_seconds: float = 8.0
    video_fps: float = 8.0
    video_size: int = 32
    val_fraction: float = 0.06
    test_fraction: float = 0.06
    seed: int = 0

    @classmethod
    def scaled(cls, scale: float = 1.0, seed: int = 0, **overrides) -> "DemoConfig":
        """Counts times ``scale`` (speakers grow with its square root); speech:music stays ~10:1."""
        if scale <= 0:
            raise ValueError(f"--scale must be positive, got {scale}")
        base = cls()
        cfg = cls(
            speech_clips=max(8, round(base.speech_clips * scale)),
            t2m_clips=max(2, round(base.t2m_clips * scale)),
            v2m_clips=max(2, round(base.v2m_clips * scale)),
            music_test_clips=max(base.music_test_clips, round(base.music_test_clips * scale)),
            music_val_clips=max(base.music_val_clips, round(base.music_val_clips * scale)),
            speakers=max(2, round(base.speakers * math.sqrt(scale))),
            seed=seed,
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg


@dataclass
class DemoReport:
    out: Path
    manifests: dict[str, Path]
    counts: dict[str, dict[str, int]]
    hours: dict[str, float]
    made: int
    reused: int
    seconds: float
    entries: list[ManifestEntry] = field(repr=False, default_factory=list)

    def summary(self) -> str:
        lines = [f"demo corpus in {self.out} ({self.made} clips made, {self.reused} reused, {self.seconds:.1f} s)"]
        for task, per_split in self.counts.items():
            split_text = ", ".join(f"{k} {v}" for k, v in per_split.items())
            lines.append(f"  {task}: {sum(per_split.values())} clips, {self.hours[task] * 60:.1f} min ({split_text})")
        lines.append("  manifests: " + ", ".join(str(p) for p in self.manifests.values()))
        return "\n".join(lines)


# ---------------------------------------------------------------------- planning
@dataclass
class _SpeechJob:
    entry: ManifestEntry
    speaker: speech.Speaker
    pitch_jitter: int


@dataclass
class _MusicJob:
    entry: ManifestEntry
    params: music.PieceParams
    midi_path: Path


def _split_ids(ids: list[str], rng: random.Random, cfg: DemoConfig, min_each: int, min_total: int) -> dict[str, str]:
    """Assign val/test (at least ``min_each`` each when there are ``min_total`` items), rest train."""
    ids = sorted(ids)
    rng.shuffle(ids)
    n_val = max(min_each, round(cfg.val_fraction * len(ids))) if len(ids) >= min_total else 0
    n_test = max(min_each, round(cfg.test_fraction * len(ids))) if len(ids) >= min_total else 0
    out = {i: "val" for i in ids[:n_val]}
    out.update({i: "test" for i in ids[n_val: n_val + n_test]})
    out.update({i: "train" for i in ids[n_val + n_test:]})
    return out


def plan(cfg: DemoConfig, out: Path) -> tuple[list[_SpeechJob], list[_MusicJob]]:
    """Every clip's parameters, text and path, decided from the seed alone."""
    speakers = speech.make_speakers(cfg.speakers, cfg.seed)
    speech_jobs: list[_SpeechJob] = []
    seen_text: set[str] = set()
    for i in range(cfg.speech_clips):
        spk = speakers[i % len(speakers)]
        rng = random.Random(f"{cfg.seed}:speech:{i}")
        max_words = max(3, int(spk.speed / 60.0 * cfg.speech_max_seconds))
        text = make_sentence(rng, max_words=max_words)
        for _ in range(20):  # distinct transcripts
            if text not in seen_text:
                break
            text = make_sentence(rng, max_words=max_words)
        seen_text.add(text)
        clip_id = f"tts-{spk.id}-{i:05d}"
        entry = ManifestEntry(
            id=clip_id, task="tts", audio=str(out / "speech" / spk.id / f"{clip_id}.wav"), text=text,
            speaker=spk.id, lang="en", meta={"synth": "espeak-ng", **spk.to_meta()},
        )
        speech_jobs.append(_SpeechJob(entry, spk, pitch_jitter=rng.randint(-3, 3)))
    by_speaker: dict[str, list[str]] = {}
    for job in speech_jobs:
        by_speaker.setdefault(job.speaker.id, []).append(job.entry.id)
    splits: dict[str, str] = {}
    for spk_id, ids in sorted(by_speaker.items()):
        splits.update(_split_ids(ids, random.Random(f"{cfg.seed}:split:{spk_id}"), cfg, min_each=2, min_total=6))
    for job in speech_jobs:
        job.entry.split = splits[job.entry.id]

    music_jobs: list[_MusicJob] = []
    for task, count in (("t2m", cfg.t2m_clips), ("v2m", cfg.v2m_clips)):
        moods = sorted(music.MOODS)
        extra = cfg.music_test_clips + cfg.music_val_clips
        for i in range(count + extra):  # clip i is the same piece whatever the counts
            rng = random.Random(f"{cfg.seed}:{task}:{i}")
            params = music.choose_params(rng, cfg.music_min_seconds, cfg.music_max_seconds, mood=moods[i % len(moods)])
            clip_id = f"{task}-{i:05d}"
            entry = ManifestEntry(
                id=clip_id, task=task, audio=str(out / "music" / f"{clip_id}.wav"), text=music.caption(params, rng),
                video=str(out / "video" / f"{clip_id}.npz") if task == "v2m" else None,
                meta={"synth": "fluidsynth", **params.to_meta()},
            )
            music_jobs.append(_MusicJob(entry, params, out / "music" / f"{clip_id}.mid"))
        ids = [j.entry.id for j in music_jobs if j.entry.task == task]
        task_splits = _split_ids(ids[:count], random.Random(f"{cfg.seed}:split:{task}"), cfg, min_each=1, min_total=5)
        task_splits.update({clip_id: "test" for clip_id in ids[count: count + cfg.music_test_clips]})
        task_splits.update({clip_id: "val" for clip_id in ids[count + cfg.music_test_clips:]})
        for job in music_jobs:
            if job.entry.task == task:
                job.entry.split = task_splits[job.entry.id]
    return speech_jobs, music_jobs


# ---------------------------------------------------------------------- synthesis
def _run_speech(job: _SpeechJob, cfg: DemoConfig) -> bool:
    path = Path(job.entry.audio)
    if path.exists():
        job.entry.duration = round(sf.info(str(path)).duration, 4)
        return False
    job.entry.duration = round(speech.synthesize(job.speaker, job.entry.text or "", path, cfg.sample_rate, job.pitch_jitter), 4)
    return True


def _run_music(job: _MusicJob, cfg: DemoConfig, soundfont: str) -> bool:
    path = Path(job.entry.audio)
    made = False
    midi = music.compose(job.params)
    if not job.midi_path.exists():
        music.write_midi(midi, job.midi_path)
        made = True
    if not path.exists():
        music.render(midi, path, cfg.sample_rate, job.params.seconds, soundfont=soundfont)
        made = True
    job.entry.duration = round(sf.info(str(path)).duration, 4)
    if job.entry.video is not None and not Path(job.entry.video).exists():
        frames = video.render_frames(job.params, job.entry.duration, fps=cfg.video_fps, size=cfg.video_size)
        video.save_video(Path(job.entry.video), frames, cfg.video_fps)
        made = True
    return made


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def _check_config(out: Path, cfg: DemoConfig) -> None:
    info = out / "corpus.json"
    if not info.exists():
        return
    old = json.loads(info.read_text()).get("config", {})
    if old != asdict(cfg):
        diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if old.get(k) != v}
        raise DemoCorpusError(
            f"{out} already holds a demo corpus built with other settings {diff} (old, new); "
            f"use another --out or delete the folder"
        )


def _remove_stale_temporaries(out: Path) -> None:
    """Half-written files of a killed run (dot-prefixed temporaries) are never kept."""
    for folder in ("speech", "music", "video", "manifests"):
        for path in (out / folder).rglob(".*"):
            if path.is_file() and any(tag in path.name for tag in (".tmp", ".espeak-", ".render-")):
                path.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    write_json_atomic(path, obj, indent=2)


def build_demo_corpus(
    out: str | Path,
    config: DemoConfig | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    on_clip: Callable[[str], None] | None = None,
) -> DemoReport:
    """Synthesise (or complete) the demo corpus in ``out`` and write its manifests.

    Layout: ``speech/<speaker>/<id>.wav``, ``music/<id>.{mid,wav}``, ``video/<id>.npz``,
    ``manifests/{tts,t2m,v2m,all}.jsonl`` and ``corpus.json`` (settings, counts, hours).
    """
    cfg = config or DemoConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    soundfont = music.find_soundfont()
    speech.require_tool("fluidsynth", "fluidsynth")
    _write_json(out / "corpus.json", {"version": CORPUS_VERSION, "config": asdict(cfg), "status": "building"})
    _remove_stale_temporaries(out)
    start = time.perf_counter()
    speech_jobs, music_jobs = plan(cfg, out)
    workers = workers or max(1, os.cpu_count() or 1)
    made = reused = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]demo corpus"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("clips", total=len(speech_jobs) + len(music_jobs))
        futures = {pool.submit(_run_music, j, cfg, soundfont): j.entry.id for j in music_jobs}
        futures.update({pool.submit(_run_speech, j, cfg): j.entry.id for j in speech_jobs})
        for future in as_completed(futures):
            try:
                was_made = future.result()
            except Exception as exc:
                for f in futures:
                    f.cancel()
                raise RuntimeError(f"demo corpus: clip {futures[future]} failed: {exc}") from exc
            made += int(was_made)
            reused += int(not was_made)
            bar.advance(task)
            if on_clip is not None:
                on_clip(futures[future])

    entries = [j.entry for j in speech_jobs] + [j.entry for j in music_jobs]
    assign_prompts([e for e in entries if e.task == "tts"], seed=cfg.seed, min_seconds=1.0, max_seconds=10.0)
    manifests = {}
    for task_name in ("tts", "t2m", "v2m"):
        manifests[task_name] = write_manifest(out / "manifests" / f"{task_name}.jsonl", [e for e in entries if e.task == task_name])
    manifests["all"] = write_manifest(out / "manifests" / "all.jsonl", entries)
    counts: dict[str, dict[str, int]] = {}
    hours: dict[str, float] = {}
    for task_name in ("tts", "t2m", "v2m"):
        subset = [e for e in entries if e.task == task_name]
        counts[task_name] = {s: sum(1 for e in subset if e.split == s) for s in ("train", "val", "test")}
        hours[task_name] = sum(e.duration or 0.0 for e in subset) / 3600.0
    elapsed = time.perf_counter() - start
    _write_json(out / "corpus.json", {
        "version": CORPUS_VERSION, "config": asdict(cfg), "status": "complete", "counts": counts,
        "hours": hours, "speakers": sorted({e.speaker for e in entries if e.speaker}),
        "tools": {"espeak-ng": _tool_version(["espeak-ng", "--version"]),
                  "fluidsynth": _tool_version(["fluidsynth", "--version"]), "soundfont": soundfont},
        "manifests": {k: str(v.relative_to(out)) for k, v in manifests.items()},
    })
    return DemoReport(out, manifests, counts, hours, made, reused, elapsed, entries)
