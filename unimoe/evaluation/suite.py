"""Evaluation suites: YAML files in ``evaluation/`` that pair metrics with backends.

Schema (unknown keys are errors, so a typo never silently drops a metric)::

    name: speech                      # required; used for run names and default output dirs
    description: free text
    on_unavailable: error             # or "skip": report a backend that cannot load and go on
    by_task: false                    # true: one result per task (tts, t2m, v2m...) per metric
    clip_policy: {min_duration_s: 0.3, silence_dbfs: -60}
    reference_set: path/to/folder     # optional FAD reference clips (folder or manifest);
                                      # relative to the suite file
    metrics:
      - metric: wer                   # scorer: wer | cer | sim | mos | fad | clap | kl | import path
        backend: whisper_base_offline # METRICS spec: name, import path, {class_path, init_args}
        key: wer_whisper_base         # optional column / MLflow name (default: the metric name)
        options: {language: en}       # optional scorer options (tasks, pooling, activation...)
        on_unavailable: skip          # optional, overrides the suite's for this entry
        fallback:                     # optional: scored instead when the backend cannot load,
          backend: mel_stats          #   under its own key (default: the metric name + backend)
          key: fad_mel_stats          #   and labelled as a fallback; options default to the entry's
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unimoe.registry import ComponentSpec

from .clips import ClipPolicy
from .errors import EvaluationError

_SUITE_KEYS = {"name", "description", "on_unavailable", "by_task", "clip_policy", "reference_set", "metrics"}
_METRIC_KEYS = {"metric", "backend", "key", "options", "on_unavailable", "fallback"}
_FALLBACK_KEYS = {"backend", "key", "options"}
_POLICIES = ("error", "skip")
SUITE_DIR = Path(__file__).resolve().parents[2] / "evaluation"


@dataclass
class MetricSpec:
    metric: str
    backend: ComponentSpec
    key: str
    options: dict[str, Any] = field(default_factory=dict)
    on_unavailable: str | None = None  # None: the suite's policy
    fallback: "MetricSpec | None" = None  # same metric, another backend, its own key

    @property
    def backend_label(self) -> str:
        """A short readable name of the backend spec for tables."""
        b = self.backend
        if isinstance(b, str):
            return b
        return str(b.get("class_path") or b.get("name") or b)


@dataclass
class Suite:
    name: str
    metrics: list[MetricSpec]
    description: str = ""
    on_unavailable: str = "error"
    by_task: bool = False
    clip_policy: ClipPolicy = field(default_factory=ClipPolicy)
    reference_set: Path | None = None
    source: Path | None = None


def _fail(where: str, msg: str) -> EvaluationError:
    return EvaluationError(f"suite {where}: {msg}")


def parse_suite(data: Any, where: str = "<dict>", base_dir: Path | None = None) -> Suite:
    """Validate a suite mapping (as loaded from YAML) and build a :class:`Suite`."""
    if not isinstance(data, dict):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}")
    unknown = set(data) - _SUITE_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_SUITE_KEYS)}")
    if not data.get("name"):
        raise _fail(where, "missing 'name'")
    on_unavailable = data.get("on_unavailable", "error")
    if on_unavailable not in _POLICIES:
        raise _fail(where, f"on_unavailable must be 'error' or 'skip', got {on_unavailable!r}")
    by_task = data.get("by_task", False)
    if not isinstance(by_task, bool):
        raise _fail(where, f"by_task must be true or false, got {by_task!r}")
    raw_metrics = data.get("metrics")
    if not isinstance(raw_metrics, list) or not raw_metrics:
        raise _fail(where, "'metrics' must be a non-empty list")
    metrics: list[MetricSpec] = []
    for i, m in enumerate(raw_metrics):
        at = f"metrics[{i}]"
        if not isinstance(m, dict):
            raise _fail(where, f"{at} must be a mapping")
        bad = set(m) - _METRIC_KEYS
        if bad:
            raise _fail(where, f"{at} has unknown key(s) {sorted(bad)}; allowed: {sorted(_METRIC_KEYS)}")
        if not isinstance(m.get("metric"), str) or m.get("backend") in (None, ""):
            raise _fail(where, f"{at} needs 'metric' (a name) and 'backend' (a spec)")
        options = m.get("options") or {}
        if not isinstance(options, dict):
            raise _fail(where, f"{at}.options must be a mapping")
        policy = m.get("on_unavailable")
        if policy is not None and policy not in _POLICIES:
            raise _fail(where, f"{at}.on_unavailable must be 'error' or 'skip', got {policy!r}")
        spec = MetricSpec(metric=m["metric"], backend=m["backend"], key=str(m.get("key") or m["metric"]),
                          options=dict(options), on_unavailable=policy)
        if m.get("fallback") is not None:
            spec.fallback = _parse_fallback(m["fallback"], spec, where, f"{at}.fallback")
        metrics.append(spec)
    keys = [k for m in metrics for k in ([m.key] + ([m.fallback.key] if m.fallback else []))]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise _fail(where, f"duplicate metric key(s) {dupes}; give each entry a distinct 'key'")
    policy_raw = data.get("clip_policy") or {}
    try:
        policy = ClipPolicy(**policy_raw)
    except TypeError as exc:
        raise _fail(where, f"bad clip_policy: {exc}") from None
    ref = data.get("reference_set")
    ref_path = None
    if ref:
        ref_path = Path(ref).expanduser()
        if not ref_path.is_absolute() and base_dir is not None:
            ref_path = base_dir / ref_path
    return Suite(name=str(data["name"]), metrics=metrics, description=str(data.get("description", "")),
                 on_unavailable=on_unavailable, by_task=by_task, clip_policy=policy, reference_set=ref_path)


def _parse_fallback(raw: Any, primary: MetricSpec, where: str, at: str) -> MetricSpec:
    """The ``fallback`` of a metric entry: the same metric on another backend."""
    if isinstance(raw, str):
        raw = {"backend": raw}
    if not isinstance(raw, dict) or raw.get("backend") in (None, ""):
        raise _fail(where, f"{at} must be a backend spec or a mapping with 'backend' (and optional 'key', 'options')")
    bad = set(raw) - _FALLBACK_KEYS
    if bad:
        raise _fail(where, f"{at} has unknown key(s) {sorted(bad)}; allowed: {sorted(_FALLBACK_KEYS)}")
    options = raw.get("options", primary.options)
    if not isinstance(options, dict):
        raise _fail(where, f"{at}.options must be a mapping")
    spec = MetricSpec(metric=primary.metric, backend=raw["backend"], key="", options=dict(options))
    spec.key = str(raw.get("key") or f"{primary.metric}_{spec.backend_label}")
    if spec.key == primary.key:
        raise _fail(where, f"{at}.key must differ from the entry's key {primary.key!r}: numbers from different "
                           f"backends never share a name")
    return spec


def load_suite(path_or_name: str | Path) -> Suite:
    """Load a suite from a YAML path, or by bare name from the repository's ``evaluation/``."""
    path = Path(path_or_name)
    if not path.is_file() and path.suffix == "" and (SUITE_DIR / f"{path_or_name}.yaml").is_file():
        path = SUITE_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        available = ", ".join(p.stem for p in sorted(SUITE_DIR.glob("*.yaml"))) or "none"
        raise EvaluationError(f"suite file not found: {path_or_name} (suites in {SUITE_DIR}: {available})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvaluationError(f"suite {path}: invalid YAML: {exc}") from None
    suite = parse_suite(data, where=str(path), base_dir=path.parent)
    suite.source = path
    return suite
