"""Metric scorers: each turns items plus one backend into a :class:`MetricResult`.

A scorer knows the metric's definition (WER, SIM, FAD...) and which kind of backend it
needs; the backend knows the model. Suites pair them (``metric: wer, backend: ...``).
Scorers live in their own registry, ``SCORERS`` (entry-point group
``unimoe.eval_scorers``), so a plug-in can add a metric the same way it adds a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unimoe.registry import SCORERS

from .backends.base import (
    ASRBackend,
    AudioClassifier,
    AudioEmbedder,
    MetricBackend,
    QualityPredictor,
    SpeakerEmbedder,
    TextAudioEmbedder,
)
from .clips import ClipPolicy, ClipSkip, load_clip
from .divergence import paired_kl
from .errors import EvaluationError
from .frechet import frechet_distance_from_embeddings, small_sample_warning
from .manifest import EvalItem
from .normalize import normalize_text
from .result import MetricResult
from .similarity import cosine_similarity
from .text_metrics import char_errors, corpus_rate, word_errors

__all__ = ["SCORERS", "Scorer"]


@dataclass
class ScoreContext:
    """What a scorer may use besides items and backend."""

    policy: ClipPolicy = field(default_factory=ClipPolicy)
    reference_set: list[Path] | None = None  # explicit FAD reference clips
    log: Callable[[str], None] = lambda msg: None


class Scorer(ABC):
    """One metric definition. ``families`` limits it to speech or music items (items with
    no known task are always included); ``options`` come from the suite YAML."""

    name: str = ""
    requires: type[MetricBackend] = MetricBackend
    higher_is_better: bool = False
    default_families: tuple[str, ...] = ("speech", "music")

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        self.families = tuple(tasks) if tasks is not None else self.default_families

    def applies_to(self, item: EvalItem) -> bool:
        return item.family is None or item.family in self.families or (item.task or "") in self.families

    def check_backend(self, backend: MetricBackend, label: str) -> None:
        if not isinstance(backend, self.requires):
            raise EvaluationError(
                f"metric {self.name!r} needs a {self.requires.__name__} backend, but {label!r} "
                f"({type(backend).__name__}) is not one"
            )

    def new_result(self, key: str, label: str, backend: MetricBackend, items: list[EvalItem]) -> MetricResult:
        return MetricResult(key=key, metric=self.name, backend=label, backend_description=backend.describe(),
                            higher_is_better=self.higher_is_better, n_items=len(items))

    @abstractmethod
    def score(self, items: list[EvalItem], backend: MetricBackend, result: MetricResult, ctx: ScoreContext) -> None:
        """Fill ``result`` (value, per_item, skipped, details, warnings)."""

    # helpers -------------------------------------------------------------------------
    @staticmethod
    def skip(result: MetricResult, item_id: str, reason: str) -> None:
        result.skipped.append({"id": item_id, "metric": result.key, "reason": reason})


class _ErrorRate(Scorer):
    requires = ASRBackend
    default_families = ("speech",)
    unit = "word"

    def __init__(self, tasks: Sequence[str] | None = None, language: str | None = "en",
                 explicit_language_only: bool = False) -> None:
        super().__init__(tasks)
        self.language = language
        self.explicit_language_only = explicit_language_only

    def applies_to(self, item: EvalItem) -> bool:
        """Items in another language (by their ``language`` field) are left to another
        entry; items without one count as ``language`` unless ``explicit_language_only``."""
        if not super().applies_to(item):
            return False
        if item.language is None:
            return not self.explicit_language_only
        return self.language is None or item.language.split("-")[0].lower() == self.language

    def count(self, hyp: str, ref: str):
        return word_errors(hyp, ref) if self.unit == "word" else char_errors(hyp, ref)

    def score(self, items, backend, result, ctx):
        counts = []
        for item in items:
            language = item.language or self.language
            if not item.text:
                self.skip(result, item.id, "no reference text")
                continue
            ref = normalize_text(item.text, language)
            if not ref:
                self.skip(result, item.id, "reference text is empty after normalisation")
                continue
            try:
                wav = load_clip(item.audio, backend.sample_rate, ctx.policy)
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
                continue
            raw = backend.transcribe(wav, language)
            hyp = normalize_text(raw, language)
            c = self.count(hyp, ref)
            counts.append(c)
            result.per_item[item.id] = {result.key: c.rate, "hypothesis": hyp, "reference": ref, "raw_hypothesis": raw}
        if counts:
            result.value = corpus_rate(counts)
            result.n_scored = len(counts)
            result.details = {
                "aggregation": f"corpus: sum of {self.unit} edits / sum of reference {self.unit}s",
                "mean_utterance_rate": float(np.mean([c.rate for c in counts])),
                "edits": float(sum(c.errors for c in counts)),
                f"reference_{self.unit}s": float(sum(c.total for c in counts)),
                "normalisation": "lowercase, drop [..]/(..), drop apostrophes, punctuation->space, numbers as-is",
            }


class WER(_ErrorRate):
    """Word error rate of the ASR transcript of each clip against its ``text``."""

    name = "wer"
    unit = "word"


class CER(_ErrorRate):
    """Character error rate (spaces removed for zh/ja-like languages by the normaliser)."""

    name = "cer"
    unit = "char"


class SIM(Scorer):
    """Speaker similarity: cosine of the speaker embeddings of the generated clip and its
    speaker reference (``prompt_audio``, else ``reference_audio``)."""

    name = "sim"
    requires = SpeakerEmbedder
    higher_is_better = True
    default_families = ("speech",)

    def score(self, items, backend, result, ctx):
        values = []
        references: dict[Path, np.ndarray | ClipSkip] = {}  # prompts are shared across many items
        for item in items:
            try:
                ref_path = item.speaker_reference
                if ref_path is None:
                    raise ClipSkip("no reference speaker audio (prompt_audio or reference_audio)")
                gen = backend.embed_speaker(load_clip(item.audio, backend.sample_rate, ctx.policy))
                if ref_path not in references:
                    try:
                        references[ref_path] = backend.embed_speaker(
                            load_clip(ref_path, backend.sample_rate, ctx.policy, role="reference"))
                    except ClipSkip as skip:
                        references[ref_path] = skip
                ref = references[ref_path]
                if isinstance(ref, ClipSkip):
                    raise ref
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
                continue
            value = float(cosine_similarity(gen, ref))
            values.append(value)
            result.per_item[item.id] = {result.key: value, "speaker_reference": str(ref_path)}
        if values:
            result.value, result.n_scored = float(np.mean(values)), len(values)
            result.details = {"aggregation": "mean cosine over items", "min": min(values), "max": max(values)}


class MOS(Scorer):
    """Mean of a quality predictor's score (DNSMOS OVRL for the ``dnsmos`` backend)."""

    name = "mos"
    requires = QualityPredictor
    higher_is_better = True
    default_families = ("speech",)

    def score(self, items, backend, result, ctx):
        rows = []
        for item in items:
            try:
                scores = backend.predict_quality(load_clip(item.audio, backend.sample_rate, ctx.policy))
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
                continue
            rows.append(scores)
            result.per_item[item.id] = {result.key: scores[backend.primary], **scores}
        if rows:
            result.value, result.n_scored = float(np.mean([r[backend.primary] for r in rows])), len(rows)
            result.details = {f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}
            result.details["primary"] = backend.primary


class FAD(Scorer):
    """Frechet distance between Gaussians fitted to generated and reference embeddings.

    ``pooling="frames"`` (default, as in the original FAD) pools every frame embedding of
    every clip; ``"clip"`` averages frames to one row per clip first. The reference set is
    the context's explicit set if given, else the items' ``reference_audio`` clips.
    """

    name = "fad"
    requires = AudioEmbedder
    default_families = ("music",)

    def __init__(self, tasks: Sequence[str] | None = None, pooling: str = "frames", min_clips: int = 2) -> None:
        super().__init__(tasks)
        if pooling not in ("frames", "clip"):
            raise EvaluationError(f"FAD pooling must be 'frames' or 'clip', got {pooling!r}")
        self.pooling, self.min_clips = pooling, max(2, int(min_clips))

    def _embed(self, backend: AudioEmbedder, path: Path, ctx: ScoreContext, role: str) -> np.ndarray:
        emb = np.atleast_2d(np.asarray(backend.embed_frames(load_clip(path, backend.sample_rate, ctx.policy, role))))
        return emb.mean(axis=0, keepdims=True) if self.pooling == "clip" else emb

    def score(self, items, backend, result, ctx):
        gen_rows, gen_clips = [], 0
        for item in items:
            try:
                gen_rows.append(self._embed(backend, item.audio, ctx, "generated"))
                gen_clips += 1
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
        if ctx.reference_set is not None:
            ref_paths, source = list(ctx.reference_set), "explicit reference set"
        else:
            ref_paths = list(dict.fromkeys(i.reference_audio for i in items if i.reference_audio is not None))
            source = "reference_audio of the manifest items"
        ref_rows = []
        for path in ref_paths:
            try:
                ref_rows.append(self._embed(backend, path, ctx, "reference"))
            except ClipSkip as skip:
                result.warnings.append(f"reference clip skipped: {skip.reason}")
        result.n_scored = gen_clips
        if gen_clips < self.min_clips or len(ref_rows) < self.min_clips:
            result.error = (f"FAD needs at least {self.min_clips} usable clips per set; got {gen_clips} generated "
                            f"and {len(ref_rows)} reference ({source})")
            return
        gen, ref = np.concatenate(gen_rows), np.concatenate(ref_rows)
        for count, label in ((gen.shape[0], "generated"), (ref.shape[0], "reference")):
            warning = small_sample_warning(count, gen.shape[1], f"{label} set")
            if warning:
                result.warnings.append(warning)
        result.value = frechet_distance_from_embeddings(gen, ref)
        result.details = {"pooling": self.pooling, "generated_clips": gen_clips, "generated_embeddings": int(gen.shape[0]),
                          "reference_clips": len(ref_rows), "reference_embeddings": int(ref.shape[0]),
                          "embedding_dim": int(gen.shape[1]), "reference_source": source}


class CLAPScore(Scorer):
    """CLAP score: cosine of the caption's text embedding and the clip's audio embedding."""

    name = "clap"
    requires = TextAudioEmbedder
    higher_is_better = True
    default_families = ("music",)

    def score(self, items, backend, result, ctx):
        values = []
        for item in items:
            caption = item.caption_text
            if not caption or not caption.strip():
                self.skip(result, item.id, "no caption/text")
                continue
            try:
                audio = backend.embed_audio(load_clip(item.audio, backend.sample_rate, ctx.policy))
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
                continue
            text = np.asarray(backend.embed_text([caption]))[0]
            value = float(cosine_similarity(text, audio))
            values.append(value)
            result.per_item[item.id] = {result.key: value, "caption": caption}
        if values:
            result.value, result.n_scored = float(np.mean(values)), len(values)
            result.details = {"aggregation": "mean cosine(text, audio) over items"}


class KL(Scorer):
    """Mean over pairs of KL(p_reference || p_generated) of classifier class distributions
    (see :mod:`unimoe.evaluation.divergence` for the direction and epsilon)."""

    name = "kl"
    requires = AudioClassifier
    default_families = ("music",)

    def __init__(self, tasks: Sequence[str] | None = None, activation: str | None = None) -> None:
        super().__init__(tasks)
        self.activation = activation

    def score(self, items, backend, result, ctx):
        activation = self.activation or backend.kl_activation
        values = []
        for item in items:
            try:
                if item.reference_audio is None:
                    raise ClipSkip("no paired reference_audio")
                gen = backend.class_logits(load_clip(item.audio, backend.sample_rate, ctx.policy))
                ref = backend.class_logits(load_clip(item.reference_audio, backend.sample_rate, ctx.policy, "reference"))
            except ClipSkip as skip:
                self.skip(result, item.id, skip.reason)
                continue
            value = float(paired_kl(ref[None], gen[None], activation)[0])
            values.append(value)
            result.per_item[item.id] = {result.key: value}
        if values:
            result.value, result.n_scored = float(np.mean(values)), len(values)
            result.details = {"direction": "KL(reference || generated)", "activation": activation,
                              "aggregation": "mean over pairs"}


def build_scorer(metric: str | dict[str, Any], options: dict[str, Any] | None = None) -> Scorer:
    """Build a scorer from a registered name or import path plus its options."""
    spec: dict[str, Any] = {"name": metric, **(options or {})} if isinstance(metric, str) else dict(metric)
    scorer = SCORERS.build(spec)
    if not isinstance(scorer, Scorer):
        raise EvaluationError(f"evaluation metric {metric!r} built a {type(scorer).__name__}, not a Scorer")
    return scorer
