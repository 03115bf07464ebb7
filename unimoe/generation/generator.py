"""The in-memory generation API: requests in, clips (codes, waveform, metadata) out.

    generator = Generator(model, codec, GenerationSettings(cfg_scale=3.0))
    clips = generator.generate([GenerationRequest(id="a", task="t2m", text="calm piano")])
    clips[0].wav, clips[0].sample_rate, clips[0].metadata

No file is written here (the training stage's audio-sample callback calls this on the model
it is training); :mod:`unimoe.generation.outputs` writes WAVs and sidecars for the CLI and
the evaluation seam. Requests are decoded ``batch_size`` at a time, each with its own seed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from unimoe.generation.decode import DecodeOutput, decode
from unimoe.generation.inputs import InputError, PreparedRequest, prepare_request
from unimoe.generation.requests import GenerationRequest
from unimoe.generation.sampling import CodebookSampling
from unimoe.generation.settings import GenerationSettings, frames_for
from unimoe.model.delay import segment_to_codes
from unimoe.model.tasks import TaskBuilder, TaskIds, build_task_builder
from unimoe.registry import TASKS, ComponentSpec

log = logging.getLogger("unimoe.generation")


class GenerationError(RuntimeError):
    """Generation cannot start: model and codec disagree, no codec, unusable checkpoint settings."""


@dataclass
class GeneratedClip:
    """One generated clip: codec codes (delay reverted), the waveform when a codec is given, metadata."""

    id: str
    task: str
    codes: Tensor
    """``[C, T]`` long: undelayed codec frames (what the codec decoded)."""
    wav: Tensor | None
    """``[S]`` float32 at ``sample_rate`` (None without a codec)."""
    sample_rate: int | None
    seed: int
    stop_reason: str
    metadata: dict[str, Any] = field(default_factory=dict)
    """Everything the sidecar records (settings, timings, activated experts, inputs)."""

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def duration(self) -> float | None:
        return None if self.wav is None else self.wav.shape[-1] / self.sample_rate


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, router_top_p: float | None,
                   experts_per_token: float | None = None) -> Iterator[None]:
    """Eval mode (no router jitter) and the router top-p override or expert budget for the duration; all restored after."""
    was_training = model.training
    model.eval()
    if router_top_p is not None:
        model.set_top_p(router_top_p)
    if experts_per_token is not None:
        if model.config.moe is None:
            raise GenerationError("an expert budget (--experts-per-token) needs an MoE model; this one is dense")
        try:
            model.set_expert_budget(experts_per_token)
        except (TypeError, ValueError) as exc:
            model.set_expert_budget(None)
            raise GenerationError(f"cannot hold {experts_per_token} experts per token: {exc}") from exc
    try:
        with torch.no_grad():
            yield
    finally:
        if experts_per_token is not None:
            model.set_expert_budget(None)
        if router_top_p is not None:
            model.set_top_p(None)
        model.train(was_training)


def effective_router_top_p(model: torch.nn.Module) -> float | None:
    """The top-p the MoE routers use right now (None for a dense model or routers without one)."""
    for block in model.blocks:
        if block.is_moe:
            return block.ffn.top_p
    return None


class Generator:
    """Generates clips from a model (+ codec) for a list of :class:`GenerationRequest`.

    ``builders`` maps a task name to a :class:`TaskBuilder` or its registry spec (a training
    stage's builders, so the unconditional CFG row matches its condition dropout); tasks not
    named use the registered builder with default arguments. ``task_ids`` is the model's task
    table (``CheckpointMetadata.task_table()``, a stage's ``task_ids``); a task it lacks gets
    the next id; None = the legacy order. ``codec`` may be None when the caller only wants
    codes (then give ``frame_rate`` for the duration limits).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        codec: torch.nn.Module | None = None,
        settings: GenerationSettings | None = None,
        builders: Mapping[str, TaskBuilder | ComponentSpec] | None = None,
        *,
        frame_rate: float | None = None,
        info: dict[str, Any] | None = None,
        task_ids: TaskIds | None = None,
    ) -> None:
        self.model = model
        self.task_ids = task_ids
        self.codec = codec
        self.settings = (settings or GenerationSettings()).validate()
        self.config = model.config
        self._builder_specs = dict(builders or {})
        self._builders: dict[str, TaskBuilder] = {}
        self.info = dict(info or {})
        """Extra sidecar fields (checkpoint, codec spec) that describe where the model came from."""
        if codec is not None:
            check_codec(self.config, codec)
            frame_rate = codec.frame_rate
        if frame_rate is None:
            raise GenerationError("Generator needs a codec or a frame_rate (to turn seconds into frames)")
        self.frame_rate = float(frame_rate)
        self.sampling = CodebookSampling.from_settings(self.settings, self.config.num_codebooks)
        self._params = _param_slope(model)

    # ------------------------------------------------------------------ builders / inputs
    def builder(self, task: str) -> TaskBuilder:
        """The task builder of ``task`` (built once)."""
        if task not in self._builders:
            spec = self._builder_specs.get(task, task)
            ids = None if self.task_ids is None else self.task_ids.extended([task])
            self._builders[task] = spec if isinstance(spec, TaskBuilder) else build_task_builder(spec, self.config,
                                                                                                  task_ids=ids)
        return self._builders[task]

    def prepare(self, requests: Sequence[GenerationRequest], *, skip_invalid: bool = False
                ) -> tuple[list[PreparedRequest], list[dict[str, str]]]:
        """Load every request's inputs; returns (prepared, skipped ``{id, reason}``). Raises unless ``skip_invalid``."""
        prepared, skipped = [], []
        for index, request in enumerate(requests):
            seed = request.seed if request.seed is not None else self.settings.seed + index
            try:
                builder = self._task_builder(request)
                prepared.append(prepare_request(request, builder, codec=self.codec, seed=seed,
                                                max_prompt_seconds=self.settings.max_prompt_seconds))
            except InputError as exc:
                if not skip_invalid:
                    raise
                log.warning("skipping: %s", exc)
                skipped.append({"id": request.id, "reason": str(exc)})
        return prepared, skipped

    def _task_builder(self, request: GenerationRequest) -> TaskBuilder:
        if request.task not in TASKS and request.task not in self._builder_specs:
            raise InputError(f"request {request.id!r} ({request.source}): field 'task': unknown task "
                             f"{request.task!r}; known tasks: {', '.join(TASKS.names())}")
        try:
            return self.builder(request.task)
        except (ValueError, KeyError) as exc:  # unknown task (RegistryError), v2m without a vision encoder
            raise InputError(f"request {request.id!r} ({request.source}): field 'task': {exc}") from exc

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GeneratedClip]:
        """Generate one clip per request, in order (inputs are checked before any decoding)."""
        prepared, _ = self.prepare(requests)
        return self.generate_prepared(prepared)

    def generate_prepared(self, prepared: Sequence[PreparedRequest]) -> list[GeneratedClip]:
        clips: list[GeneratedClip] = []
        size = self.settings.batch_size
        with inference_mode(self.model, self.settings.router_top_p, self.settings.experts_per_token):
            for start in range(0, len(prepared), size):
                clips += self._generate_batch(list(prepared[start: start + size]))
        return clips

    def _generate_batch(self, batch: list[PreparedRequest]) -> list[GeneratedClip]:
        s = self.settings
        device = self.model.audio_head.weight.device
        cond = [item.cond for item in batch]
        uncond = [item.uncond for item in batch] if s.uses_cfg else None
        out = decode(
            self.model, cond, uncond, self.sampling,
            max_frames=[frames_for(s.max_seconds, self.frame_rate)] * len(batch),
            min_frames=frames_for(s.min_seconds, self.frame_rate),
            cfg_scale=s.cfg_scale, eos_logit_scale=s.eos_logit_scale, use_cache=s.use_cache, cache=s.cache,
            compile=s.compile, seeds=[item.seed for item in batch],
            routing_stats=s.routing_stats or s.experts_per_token is not None,  # a budget is reported
        )
        codes = [segment_to_codes(seg.cpu(), self.config.delays, self.model.specials) for seg in out.segments]
        wavs, codec_seconds = self._decode_audio(codes)
        audio_seconds = sum(c.shape[1] for c in codes) / self.frame_rate
        timing = {
            "batch_size": len(batch),
            "decode_steps": out.steps,
            "generation_seconds": round(out.seconds, 4),
            "codec_seconds": round(codec_seconds, 4),
            "frames_per_second": round(sum(out.num_frames) / max(out.seconds, 1e-9), 2),
            "real_time_factor": round((out.seconds + codec_seconds) / max(audio_seconds, 1e-9), 4),
            "cache": out.cache,
            "compiled": out.compiled,
            **self._budget(out),
        }
        router_top_p = None if s.experts_per_token is not None else effective_router_top_p(self.model)
        clips = []
        for i, item in enumerate(batch):
            wav = wavs[i] if wavs is not None else None
            meta = {
                **item.request.describe(),
                "seed": item.seed,
                "frames": out.num_frames[i],
                "frame_rate": self.frame_rate,
                "duration": round(out.num_frames[i] / self.frame_rate, 4),
                "stop_reason": out.stop_reasons[i],
                "max_frames": out.max_frames[i],
                "settings": s.to_dict(),
                "router_top_p": router_top_p,
                **self._experts(out, i),
                **timing,
                **item.info,
                **self.info,
            }
            if item.request.extra:
                meta["request_fields"] = item.request.extra
            if wav is not None:
                meta["sample_rate"] = self.codec.sample_rate
            clips.append(GeneratedClip(id=item.request.id, task=item.request.task, codes=codes[i], wav=wav,
                                       sample_rate=self.codec.sample_rate if self.codec is not None else None,
                                       seed=item.seed, stop_reason=out.stop_reasons[i], metadata=meta))
        return clips

    def _decode_audio(self, codes: list[Tensor]) -> tuple[list[Tensor] | None, float]:
        """Codes ``[C, T]`` -> waveforms ``[T * hop]``, one clip at a time (lengths differ)."""
        if self.codec is None:
            return None, 0.0
        start = time.perf_counter()
        wavs = []
        with torch.no_grad():
            for c in codes:
                wav = self.codec.decode(c.unsqueeze(0).to(self.codec.device))  # [1, 1, T * hop]
                wavs.append(wav[0, 0].float().cpu())
        return wavs, time.perf_counter() - start

    def _budget(self, out: DecodeOutput) -> dict[str, Any]:
        """With ``experts_per_token``: the target and what the batch's decoded tokens used (mean over layers)."""
        target = self.settings.experts_per_token
        if target is None:
            return {}
        if out.expert_sums is None or float(out.expert_tokens.sum()) == 0:
            return {"expert_budget": {"target": target, "batch_mean": None, "relative_error": None}}
        mean = float(out.expert_sums.sum(0).div(out.expert_tokens.sum()).mean())
        return {"expert_budget": {"target": target, "batch_mean": round(mean, 4),
                                  "relative_error": round((mean - target) / target, 4)}}

    def _experts(self, out: DecodeOutput, i: int) -> dict[str, Any]:
        """Activated (real, routed) experts per decoded token of request ``i``: mean and per MoE layer."""
        if out.expert_sums is None:
            return {"activated_experts_per_token": None}
        tokens = float(out.expert_tokens[i])
        if tokens == 0:  # a one-step clip: nothing was fed back
            return {"activated_experts_per_token": None, "activated_experts_tokens": 0}
        per_layer = (out.expert_sums[i] / tokens).tolist()
        mean = sum(per_layer) / len(per_layer)
        base, slope = self._params
        return {
            "activated_experts_per_token": round(mean, 4),
            "activated_experts_per_layer": [round(v, 4) for v in per_layer],
            "activated_experts_tokens": int(tokens),
            "activated_params_per_token": int(round(base + slope * mean)),
        }


def generate(
    model: torch.nn.Module,
    codec: torch.nn.Module | None,
    requests: Sequence[GenerationRequest],
    settings: GenerationSettings | None = None,
    builders: Mapping[str, TaskBuilder | ComponentSpec] | None = None,
    *,
    frame_rate: float | None = None,
    task_ids: TaskIds | None = None,
) -> list[GeneratedClip]:
    """One-call form of :class:`Generator` (for callbacks): clips in request order, no files written."""
    return Generator(model, codec, settings, builders, frame_rate=frame_rate, task_ids=task_ids).generate(requests)


def check_codec(config, codec) -> None:
    """The model's codebook count and size must be the codec's."""
    if codec.num_codebooks != config.num_codebooks or codec.cardinality != config.codebook_size:
        raise GenerationError(
            f"codec {type(codec).__name__} makes {codec.num_codebooks} codebooks of {codec.cardinality} codes but the "
            f"model expects {config.num_codebooks} of {config.codebook_size}; use the codec the model was trained with"
        )


def _param_slope(model: torch.nn.Module) -> tuple[float, float]:
    """``(params with 0 routed experts, params per routed expert across the MoE layers)``: activated params are linear in k."""
    if model.config.moe is None:
        n = float(model.num_parameters())
        return n, 0.0
    base = float(model.num_parameters(0))
    return base, float(model.num_parameters(1)) - base
