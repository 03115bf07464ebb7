"""Running a suite: build backends once, score every metric, write JSON/Markdown/MLflow.

Three ways in, one scoring path:

* an evaluation manifest (``audio`` = generated clip)           -> :func:`run_suite(manifest=...)`
* a folder of ``<id>.wav`` + a reference manifest (training format) -> ``wavs=..., manifest=...``
* a checkpoint: a :class:`Generator` writes the folder first     -> ``generator=..., manifest=...``
"""

from __future__ import annotations

import importlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from unimoe.atomic import write_text_atomic
from unimoe.jsonl import resolve_path
from unimoe.registry import METRICS, ComponentSpec

from .backends.base import MetricBackend
from .errors import BackendUnavailableError, EvaluationError
from .manifest import (
    EvalItem,
    ManifestPairing,
    pair_with_generated_manifest,
    pair_with_references,
    read_eval_manifest,
    read_jsonl,
    read_reference_set,
)
from .report import EvaluationReport, write_report
from .result import MetricResult
from .scorers import ScoreContext, build_scorer
from .suite import MetricSpec, Suite, load_suite
from .tracking import log_report


@runtime_checkable
class Generator(Protocol):
    """Checkpoint mode's seam: turn generation requests into audio files.

    ``requests`` is a JSONL manifest in the training format (``id, task, text,
    prompt_audio, video, ...``; ``audio`` if present is the ground truth and must not be
    read). The generator writes one clip per request it can serve into ``out_dir`` and
    returns the path of a JSONL manifest it wrote there with at least ``id`` and
    ``audio`` (the generated file) per line. Requests it could not serve are simply
    absent; the runner reports them as skipped.
    """

    def __call__(self, requests: Path, out_dir: Path) -> Path: ...


def load_checkpoint_generator(ckpt: str | Path, **options: Any) -> Generator:
    """``unimoe.generation.build_generator(ckpt_path, **options)`` -> :class:`Generator`."""
    try:
        generation = importlib.import_module("unimoe.generation")
    except ImportError as exc:
        raise EvaluationError(
            f"checkpoint mode needs the generation subsystem (unimoe.generation), which is not importable "
            f"here ({exc}). Generate WAVs another way and run: unimoe evaluate --suite S --wavs DIR --manifest M"
        ) from exc
    build = getattr(generation, "build_generator", None)
    if build is None:
        raise EvaluationError(
            "unimoe.generation has no build_generator(ckpt_path, **options) -> Generator yet; "
            "evaluate a folder of WAVs with --wavs instead"
        )
    from unimoe.checkpoint import CheckpointError

    try:
        generator = build(str(ckpt), **options)
    except (CheckpointError, generation.GenerationError, generation.SettingsError) as exc:  # bad input: one line
        raise EvaluationError(f"--ckpt {ckpt}: {exc}") from exc
    if not callable(generator):
        raise EvaluationError(f"unimoe.generation.build_generator returned {type(generator).__name__}, not a Generator")
    return generator


# ------------------------------------------------------------------------- backends
_BACKENDS: dict[str, MetricBackend] = {}


def build_backend(spec: ComponentSpec | MetricBackend, cache: bool = True) -> MetricBackend:
    """Build a backend from its spec; with ``cache`` one instance per spec per process,
    since loading a model costs far more than using it."""
    if isinstance(spec, MetricBackend):
        return spec
    key = json.dumps(spec, sort_keys=True, default=str)
    if cache and key in _BACKENDS:
        return _BACKENDS[key]
    backend = METRICS.build(spec)  # RegistryError / BackendUnavailableError carry the message
    if not isinstance(backend, MetricBackend):
        raise EvaluationError(f"metric backend {spec!r} built a {type(backend).__name__}, not a MetricBackend")
    if cache:
        _BACKENDS[key] = backend
    return backend


# ------------------------------------------------------------------------- scoring
def evaluate_items(
    suite: Suite,
    items: list[EvalItem],
    reference_set: list[Path] | None = None,
    backends: dict[str, MetricBackend] | None = None,
    log: Callable[[str], None] = print,
    by_task: bool | None = None,
) -> list[MetricResult]:
    """Score ``items`` with every metric of ``suite``.

    ``backends`` maps a metric key to a ready backend (overrides the suite's spec; used
    by tests and notebooks that hold models already). ``by_task`` (default: the suite's)
    scores each task's items on their own and sets :attr:`MetricResult.task`.
    """
    ctx = ScoreContext(policy=suite.clip_policy, reference_set=reference_set, log=log)
    per_task = suite.by_task if by_task is None else by_task
    results: list[MetricResult] = []
    for spec in suite.metrics:
        results.extend(_evaluate_metric(suite, spec, items, ctx, backends or {}, log, per_task))
    return results


def _task_groups(items: list[EvalItem], by_task: bool) -> list[tuple[str | None, list[EvalItem]]]:
    """``[(task, items)]`` in order of first appearance, or one group of everything."""
    if not by_task or not items:
        return [(None, items)]
    groups: dict[str | None, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(item.task, []).append(item)
    return list(groups.items())


def unavailable_label(spec: ComponentSpec) -> str:
    """"unavailable offline" for a backend whose weights never ship with a package (its class
    is not ``offline``), else "unavailable" (an offline backend whose package is missing)."""
    target = spec.get("class_path") or spec.get("name") if isinstance(spec, dict) else spec
    try:
        offline = isinstance(target, str) and bool(getattr(METRICS.get(target), "offline", False))
    except Exception:  # unknown name or an import that fails: the build error says why
        offline = False
    return "unavailable" if offline else "unavailable offline"


def _evaluate_metric(
    suite: Suite, spec: MetricSpec, items: list[EvalItem], ctx: ScoreContext, backends: dict[str, MetricBackend],
    log: Callable[[str], None], by_task: bool,
) -> list[MetricResult]:
    scorer = build_scorer(spec.metric, spec.options)
    groups = _task_groups([i for i in items if scorer.applies_to(i)], by_task)
    try:
        backend = backends.get(spec.key) or build_backend(spec.backend)
    except BackendUnavailableError as exc:
        policy = spec.on_unavailable or suite.on_unavailable
        if policy != "skip" and spec.fallback is None:
            raise
        label = unavailable_label(spec.backend)
        log(f"[eval] {spec.key}: backend {spec.backend_label} {label} ({exc})"
            + (f"; scoring the fallback {spec.fallback.key} instead" if spec.fallback else ""))
        results = [MetricResult(key=spec.key, metric=scorer.name, backend=spec.backend_label,
                                backend_description=f"{label}: {exc}", higher_is_better=scorer.higher_is_better,
                                n_items=len(group), error=f"backend unavailable: {exc}", task=task,
                                unavailable=label).finalize() for task, group in groups]
        if spec.fallback is not None:
            for result in _evaluate_metric(suite, spec.fallback, items, ctx, backends, log, by_task):
                result.backend_description = f"FALLBACK for {spec.key} ({spec.backend_label} {label}): " \
                                             f"{result.backend_description}"
                result.details["fallback_for"] = spec.key
                results.append(result)
        return results
    scorer.check_backend(backend, spec.backend_label)
    results = []
    for task, group in groups:
        result = scorer.new_result(spec.key, spec.backend_label, backend, group)
        result.task = task
        start = time.perf_counter()
        if group:
            scorer.score(group, backend, result, ctx)
        result.details["elapsed_s"] = round(time.perf_counter() - start, 3)
        results.append(result.finalize())
        shown = "n/a" if result.value is None else f"{result.value:.4f}"
        log(f"[eval] {result.name} = {shown} ({result.n_scored}/{result.n_items} scored, {backend.describe()})")
    return results


def _absolute_paths(row: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a manifest line whose path fields no longer depend on the file's location."""
    out = dict(row)
    for key in ("audio", "prompt_audio", "video", "reference_audio"):
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = resolve_path(value, base)
    return out


def _pairing(
    manifest: Path | None, wavs: Path | None, generator: Generator | None, out_dir: Path, audio_root: Path | None,
    split: str | None, limit: int | None = None,
) -> ManifestPairing:
    if manifest is None:
        raise EvaluationError("a manifest is required (--manifest)")
    if generator is not None:
        if wavs is not None:
            raise EvaluationError("give either a generator/checkpoint or a folder of WAVs, not both")
        gen_dir = out_dir / "generated"
        gen_dir.mkdir(parents=True, exist_ok=True)
        # The generator sees only the requested split (and at most `limit` lines), with absolute
        # paths: the request file lives in another folder than the manifest it came from.
        base = (Path(audio_root) if audio_root else Path(manifest).parent).resolve()
        rows = [_absolute_paths(r, base) for r in read_jsonl(manifest)
                if split is None or r.get("split", "train") == split]
        if limit:
            rows = rows[:limit]
        requests = gen_dir / "requests.jsonl"
        write_text_atomic(requests, "".join(json.dumps(r) + "\n" for r in rows))
        produced = generator(requests, gen_dir)
        return pair_with_generated_manifest(produced, requests, None, split)
    if wavs is not None:
        return pair_with_references(wavs, manifest, audio_root, split)
    return ManifestPairing(items=read_eval_manifest(manifest, audio_root, split))


def run_suite(
    suite: Suite | str | Path,
    *,
    manifest: str | Path | None = None,
    wavs: str | Path | None = None,
    generator: Generator | None = None,
    out_dir: str | Path | None = None,
    reference_set: str | Path | None = None,
    audio_root: str | Path | None = None,
    tracking_uri: str | None = None,
    experiment: str = "unimoe-eval",
    mlflow: bool = True,
    limit: int | None = None,
    split: str | None = None,
    backends: dict[str, MetricBackend] | None = None,
    log: Callable[[str], None] = print,
) -> EvaluationReport:
    """Score generated audio with a suite and write ``results.json``, ``results.md`` and an
    MLflow run (sqlite under ``out_dir`` unless ``tracking_uri`` is given)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    created = datetime.now(timezone.utc)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "eval" / f"{suite.name}-{created:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    pairing = _pairing(Path(manifest) if manifest else None, Path(wavs) if wavs else None, generator, out,
                       Path(audio_root) if audio_root else None, split, limit)
    items = pairing.items[:limit] if limit else pairing.items
    ref_source = Path(reference_set) if reference_set else suite.reference_set
    ref_clips = read_reference_set(ref_source) if ref_source else None
    results = evaluate_items(suite, items, reference_set=ref_clips, backends=backends, log=log)
    report = EvaluationReport(
        suite=suite.name,
        description=suite.description,
        created=created.isoformat(timespec="seconds"),
        inputs={"suite_file": str(suite.source) if suite.source else None, "manifest": str(manifest),
                "wavs": str(wavs) if wavs else None, "split": split, "generator": type(generator).__name__ if generator else None,
                "reference_set": str(ref_source) if ref_source else None},
        n_items=len(items),
        metrics=results,
        skipped_before_scoring=pairing.skipped,
        unreferenced=pairing.unreferenced,
    )
    json_path, md_path = write_report(report, out)
    if mlflow:
        info = log_report(report, out, tracking_uri=tracking_uri, experiment=experiment, artifacts=[json_path, md_path])
        report.outputs.update(mlflow_tracking_uri=info["tracking_uri"], mlflow_run_id=info["run_id"])
        write_report(report, out)  # record the run id in the JSON too
    log(f"[eval] wrote {json_path} and {md_path}")
    return report
