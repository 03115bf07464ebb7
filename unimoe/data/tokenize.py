"""Encode a manifest's audio into codec-token shards, once, in parallel, resumably.

Training reads shards, not audio: encoding 30k hours with a neural codec every epoch would
dominate the cost. The manifest is cut into fixed ranges of ``shard_size`` lines; each
range becomes one shard written atomically (see :mod:`unimoe.data.shards`). A shard whose
file exists with the same fingerprint (manifest lines + settings + codec) is kept, so a
killed run resumes where it stopped and never re-encodes finished work.

Examples that cannot be used are not errors: they are left out with a reason (unreadable,
silent, too short, too long, missing prompt, unusable prompt, unusable video), recorded in
their shard and listed in ``skipped.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from unimoe.atomic import OutputWriteError, write_text_atomic
from unimoe.audio import AudioFileError, load_audio
from unimoe.data.manifest import ManifestEntry, ManifestError, check_manifest
from unimoe.data.index import INDEX_DIR, LEGACY_INDEX_FILE, IndexWriter
from unimoe.data.prompts import takes_speaker_prompt
from unimoe.data.shards import (
    SETTINGS_FILE, SHARD_FORMAT, SHARD_VERSION, SKIPPED_FILE, ShardError, codes_dtype, codec_record, load_shard,
    save_shard, shard_name, write_json,
)
from unimoe.data.video import VideoFileError, load_video
from unimoe.locks import FolderLock
from unimoe.registry import ComponentSpec

SKIP_REASONS = ("unreadable", "silent", "too short", "too long", "missing prompt", "unusable prompt", "unusable video")


@dataclass
class TokenizeConfig:
    """Filters and layout of a tokenisation run (all recorded in the shards' fingerprint)."""

    shard_size: int = 256
    """Manifest lines per shard (the unit of parallel work and of resumption)."""
    min_seconds: float = 0.3
    max_seconds: float = 30.0
    silence_db: float = -55.0
    """Clips whose RMS level is below this (dBFS) count as silent."""
    prompt_tasks: tuple[str, ...] | None = None
    """Tasks that need a speaker prompt (their entries without one are skipped); None = the
    tasks that declare one (``TaskBuilder.speaker_prompt``: tts). Resolved against the
    manifest's tasks before the run (:func:`resolve_prompt_tasks`)."""
    prompt_max_seconds: float = 3.0
    """The prompt is cut to its first N seconds (voice cloning needs a short reference)."""
    prompt_min_seconds: float = 0.5
    splits: tuple[str, ...] | None = None
    """Only these splits (None: all)."""

    def __post_init__(self) -> None:
        self.prompt_tasks = tuple(self.prompt_tasks) if self.prompt_tasks is not None else None
        self.splits = tuple(self.splits) if self.splits is not None else None
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds}, {self.max_seconds}")


@dataclass
class TokenizeReport:
    out: Path
    shards: int
    encoded: int
    reused: int
    items: int
    skipped: list[dict[str, Any]]
    seconds: float
    codec: dict[str, Any] = field(default_factory=dict)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))

    def summary(self) -> str:
        lines = [f"{self.items} examples in {self.shards} shards in {self.out} "
                 f"({self.encoded} encoded, {self.reused} reused, {self.seconds:.1f} s)"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped_by_reason().items()))
            lines.append(f"skipped {len(self.skipped)}: {reasons} (details in {self.out / SKIPPED_FILE})")
        return "\n".join(lines)


# ---------------------------------------------------------------------- per-example work
class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:  # the report groups by reason: keep the vocabulary closed
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _rms_db(wav: torch.Tensor) -> float:
    return float(10 * torch.log10(wav.double().pow(2).mean() + 1e-20))


def _encode(codec, wav: torch.Tensor) -> torch.Tensor:
    device = next((p.device for p in codec.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        codes = codec.encode(wav.unsqueeze(0).to(device))[0].cpu()  # [C, T]
    if codes.dim() != 2 or codes.shape[0] != codec.num_codebooks:
        raise RuntimeError(f"codec returned codes of shape {tuple(codes.shape)}, expected [{codec.num_codebooks}, T]")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codec.cardinality):
        raise RuntimeError(f"codec returned codes outside [0, {codec.cardinality})")
    return codes.to(codes_dtype(codec.cardinality)).clone()  # clone: own storage, saved alone


def encode_entry(entry: ManifestEntry, codec, cfg: TokenizeConfig, prompt_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn one manifest entry into a shard item, or raise ``_Skip`` with the reason."""
    try:
        wav, sr = load_audio(entry.audio, sample_rate=codec.sample_rate)
    except AudioFileError as exc:
        raise _Skip("unreadable", str(exc)) from None
    seconds = wav.shape[-1] / sr
    if seconds < cfg.min_seconds:
        raise _Skip("too short", f"{seconds:.2f} s < {cfg.min_seconds} s")
    if seconds > cfg.max_seconds:
        raise _Skip("too long", f"{seconds:.2f} s > {cfg.max_seconds} s")
    if _rms_db(wav) < cfg.silence_db:
        raise _Skip("silent", f"RMS {_rms_db(wav):.1f} dBFS < {cfg.silence_db} dBFS")

    prompt_codes = None
    if entry.task in (cfg.prompt_tasks or ()):
        if not entry.prompt_audio:
            raise _Skip("missing prompt", "no prompt_audio (speaker with a single utterance?)")
        cache = prompt_cache if prompt_cache is not None else {}
        if entry.prompt_audio not in cache:
            cache[entry.prompt_audio] = _prompt_codes(entry.prompt_audio, codec, cfg)
        prompt_codes = cache[entry.prompt_audio]
        if isinstance(prompt_codes, _Skip):
            raise prompt_codes

    video = video_fps = None
    if entry.video:
        try:
            frames, video_fps = load_video(entry.video)
        except VideoFileError as exc:
            raise _Skip("unusable video", str(exc)) from None
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W] uint8

    return {
        "id": entry.id, "task": entry.task, "split": entry.split, "text": entry.text, "speaker": entry.speaker,
        "lang": entry.lang, "prompt_text": entry.prompt_text, "duration": round(seconds, 4),
        "meta": json.dumps(entry.meta, ensure_ascii=False, sort_keys=True),
        "codes": _encode(codec, wav), "prompt_codes": prompt_codes, "video": video, "video_fps": video_fps,
    }


def _prompt_codes(path: str, codec, cfg: TokenizeConfig) -> torch.Tensor | _Skip:
    try:
        wav, sr = load_audio(path, sample_rate=codec.sample_rate)
    except AudioFileError as exc:
        return _Skip("unusable prompt", str(exc))
    wav = wav[:, : int(cfg.prompt_max_seconds * sr)]
    if wav.shape[-1] / sr < cfg.prompt_min_seconds:
        return _Skip("unusable prompt", f"prompt {path} is {wav.shape[-1] / sr:.2f} s < {cfg.prompt_min_seconds} s")
    if _rms_db(wav) < cfg.silence_db:
        return _Skip("unusable prompt", f"prompt {path} is silent")
    return _encode(codec, wav)


# ---------------------------------------------------------------------- shards
@dataclass
class _ShardJob:
    index: int
    lines: list[int]
    entries: list[ManifestEntry]
    fingerprint: str


def _fingerprint(lines: list[int], entries: list[ManifestEntry], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for line, entry in zip(lines, entries):
        h.update(json.dumps([line, asdict(entry)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def encode_shard(job: _ShardJob, codec, cfg: TokenizeConfig, out: Path, codec_info: dict[str, Any],
                 tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Encode one shard's entries and write it atomically; return its summary."""
    items, skipped = [], []
    prompt_cache: dict[str, Any] = {}
    for line, entry in zip(job.lines, job.entries):
        try:
            item = encode_entry(entry, codec, cfg, prompt_cache)
            item["line"] = line
            items.append(item)
        except _Skip as skip:
            skipped.append({"id": entry.id, "line": line, "reason": skip.reason, "detail": skip.detail})
        if tick is not None:
            tick()
    payload = {
        "format": SHARD_FORMAT, "version": SHARD_VERSION, "codec": codec_info, "fingerprint": job.fingerprint,
        "shard": job.index, "items": items, "skipped": skipped,
    }
    save_shard(out, job.index, payload)
    return _summary(payload)


def _summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Per-item lengths and labels of a shard, without tensors (for the index)."""
    rows = []
    for pos, item in enumerate(payload["items"]):
        video = item["video"]
        rows.append({
            "id": item["id"], "task": item["task"], "split": item["split"], "speaker": item["speaker"],
            "shard": payload["shard"], "pos": pos, "line": item["line"], "duration": item["duration"],
            "frames": int(item["codes"].shape[-1]),
            "prompt_frames": int(item["prompt_codes"].shape[-1]) if item["prompt_codes"] is not None else 0,
            "text": item["text"], "prompt_text": item["prompt_text"],
            "video_frames": int(video.shape[0]) if video is not None else 0,
            "video_size": list(video.shape[-2:]) if video is not None else None,
        })
    return {"shard": payload["shard"], "items": rows, "skipped": list(payload["skipped"])}


# ---------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(codec_spec: Any, cfg: TokenizeConfig, out: str, codec_info: dict[str, Any], ticks, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(codec=build_codec(codec_spec), cfg=cfg, out=Path(out), codec_info=codec_info, ticks=ticks)


def _worker_encode(job: _ShardJob) -> dict[str, Any]:
    w = _WORKER
    if codec_record(w["codec"]) != w["codec_info"]:
        raise RuntimeError("worker built a codec that differs from the main process's (non-deterministic codec spec?)")
    return encode_shard(job, w["codec"], w["cfg"], w["out"], w["codec_info"], tick=lambda: w["ticks"].put(1))


def build_codec(spec: ComponentSpec | Any):
    """A codec from a registry spec (name, import path, dict) or an already built codec."""
    from unimoe.registry import CODECS

    _import_optional("unimoe.codecs")  # registers the in-tree codecs (plug-ins come by entry point)

    codec = CODECS.build(spec)
    codec.eval()
    return codec


def _import_optional(module: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:  # that subsystem is not installed/built yet
        if exc.name is None or not module.startswith(exc.name):
            raise


# ---------------------------------------------------------------------- the run
def tokenize_manifest(
    manifest: str | Path,
    codec: ComponentSpec | Any,
    out: str | Path,
    *,
    config: TokenizeConfig | None = None,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenizeReport:
    """Encode ``manifest`` with ``codec`` into shards in ``out``; resume what exists.

    ``codec`` is a registry spec (``"spectral_rvq"``, ``{"name": "encodec", ...}``) or a
    built :class:`~unimoe.codecs.base.AudioCodec`. ``workers`` > 1 encodes shards in that
    many processes (0 or 1: in this process). A folder made with other settings, codec or
    manifest content is refused unless ``overwrite`` (then only changed shards are redone).
    """
    cfg = config or TokenizeConfig()
    manifest, out = Path(manifest).resolve(), Path(out)
    with FolderLock(out):  # one writer per shard folder (FolderInUseError names the other)
        return _tokenize(manifest, codec, out, cfg, workers, overwrite, progress)


def _tokenize(manifest: Path, codec: ComponentSpec | Any, out: Path, cfg: TokenizeConfig, workers: int,
              overwrite: bool, progress: bool) -> TokenizeReport:
    start = time.perf_counter()
    numbered, problems = check_manifest(manifest)
    if problems:
        raise ManifestError(problems)
    if cfg.splits is not None:
        numbered = [(n, e) for n, e in numbered if e.split in cfg.splits]
    cfg = resolve_prompt_tasks(cfg, {e.task for _, e in numbered}, out / SETTINGS_FILE)
    main_codec = build_codec(codec)
    codec_info = codec_record(main_codec)
    settings = {"config": asdict(cfg), "codec": codec_info}
    run_info = json.loads(json.dumps({**settings, "manifest": str(manifest),  # JSON form, as stored
                                      "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}))

    _check_settings(out, run_info, overwrite)
    for stale in out.glob(".shard-*.pt.tmp-*"):
        stale.unlink()  # half-written by a killed run; never read
    for stale in [*out.glob(f".{INDEX_DIR}.tmp-*"), *out.glob(f".{INDEX_DIR}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)

    jobs = []
    for k in range(0, len(numbered), cfg.shard_size):
        chunk = numbered[k: k + cfg.shard_size]
        lines, entries = [n for n, _ in chunk], [e for _, e in chunk]
        jobs.append(_ShardJob(len(jobs), lines, entries, _fingerprint(lines, entries, settings)))
    summaries: dict[int, dict[str, Any]] = {}
    pending = []
    for job in jobs:
        existing = _reusable(out / shard_name(job.index), job.fingerprint)
        if existing is not None:
            summaries[job.index] = existing
        else:
            pending.append(job)
    extras = [p for p in out.glob("shard-*.pt") if int(p.stem.split("-")[1]) >= len(jobs)]
    if pending or extras:
        # the folder is incomplete until the end; a re-run with nothing to do keeps the index
        # (a full disk or a kill while it rewrites the same content never leaves the folder unusable)
        (out / LEGACY_INDEX_FILE).unlink(missing_ok=True)
        if (out / INDEX_DIR).exists():
            shutil.rmtree(out / INDEX_DIR)
    write_json(out / SETTINGS_FILE, run_info)
    for extra in extras:
        extra.unlink()  # from a longer manifest (only reachable with overwrite)
    done_items = sum(len(jobs[i].entries) for i in summaries)
    _run_jobs(pending, codec, main_codec, cfg, out, codec_info, workers, progress, len(numbered), done_items, summaries)

    ordered = [summaries[j.index] for j in jobs]
    skipped = [s for summary in ordered for s in summary["skipped"]]
    write_text_atomic(out / SKIPPED_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    index = IndexWriter()
    for summary in ordered:
        for row in summary["items"]:
            index.add(row)
    index.write(out, {
        "codec": codec_info, "config": asdict(cfg), "manifest": str(manifest),
        "shards": [{"file": shard_name(s["shard"]), "items": len(s["items"]), "skipped": len(s["skipped"])} for s in ordered],
        "skipped": dict(Counter(s["reason"] for s in skipped)),
    })
    return TokenizeReport(out, len(jobs), len(pending), len(jobs) - len(pending), index.num_items, skipped,
                          time.perf_counter() - start, codec_info)


def resolve_prompt_tasks(cfg: TokenizeConfig, tasks: set[str], settings_file: Path) -> TokenizeConfig:
    """``cfg`` with ``prompt_tasks`` filled in for a manifest with ``tasks``.

    None becomes the manifest's tasks that declare a speaker prompt. The choice only matters
    for the tasks present, so when a folder was tokenised with a recorded ``prompt_tasks``
    that decides the same for every one of them (and otherwise the same settings), that
    record is kept: its shards stay valid and are reused (e.g. ``["tts"]`` for a music
    manifest, the value folders tokenised before tasks declared their prompts recorded).
    """
    if cfg.prompt_tasks is not None:
        return cfg
    resolved = tuple(sorted(t for t in tasks if takes_speaker_prompt(t)))
    try:
        old = json.loads(settings_file.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError):
        old = {}
    recorded = old.get("prompt_tasks")
    if isinstance(recorded, list) and {t for t in tasks if t in recorded} == set(resolved):
        same_otherwise = {k: v for k, v in old.items() if k != "prompt_tasks"} == json.loads(json.dumps(
            {k: v for k, v in asdict(cfg).items() if k != "prompt_tasks"}))
        if same_otherwise:
            return replace(cfg, prompt_tasks=tuple(recorded))
    return replace(cfg, prompt_tasks=resolved)


def _check_settings(out: Path, run_info: dict[str, Any], overwrite: bool) -> None:
    path = out / SETTINGS_FILE
    if not path.exists() or overwrite:
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = [k for k in ("config", "codec", "manifest_sha256") if old.get(k) != run_info.get(k)]
    if changed:
        what = {"config": "settings", "codec": "codec", "manifest_sha256": "manifest content"}
        raise ShardError(
            f"{out} holds shards made with another {', '.join(what[c] for c in changed)}; "
            f"use a new --out, or --overwrite to redo the shards that changed"
        )


def _reusable(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        payload = load_shard(path, mmap=True)
    except ShardError:
        return None  # unreadable: encode again
    if payload.get("fingerprint") != fingerprint:
        return None
    return _summary(payload)


def _run_jobs(pending, codec_spec, main_codec, cfg, out, codec_info, workers, progress, total, done, summaries) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]tokenize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("items", total=total, completed=done)
        if workers <= 1 or len(pending) <= 1:  # one worker: this process (no spawn cost)
            for job in pending:
                summaries[job.index] = encode_shard(job, main_codec, cfg, out, codec_info, tick=lambda: bar.advance(task))
            return
        ctx = mp.get_context("spawn")  # fork after torch threads started can deadlock
        ticks = ctx.Queue()
        n = min(workers, len(pending))
        threads = max(1, (os.cpu_count() or 1) // n)
        spec = codec_spec if isinstance(codec_spec, (str, dict)) else main_codec
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                 initargs=(spec, cfg, str(out), codec_info, ticks, threads)) as pool:
            futures = {pool.submit(_worker_encode, job): job for job in pending}
            remaining = set(futures)
            try:
                while remaining:
                    finished, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(ticks, bar, task)
                    for future in finished:
                        job = futures[future]
                        try:
                            summaries[job.index] = future.result()
                        except OutputWriteError:
                            raise  # names the shard file already (disk full, read-only folder)
                        except Exception as exc:
                            raise RuntimeError(f"encoding shard {job.index} (manifest lines {job.lines[0]}-{job.lines[-1]}) failed: {exc}") from exc
            except BaseException:
                for future in remaining:
                    future.cancel()
                raise
        _drain(ticks, bar, task)


def _drain(ticks, bar, task) -> None:
    while True:
        try:
            ticks.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        bar.advance(task)
