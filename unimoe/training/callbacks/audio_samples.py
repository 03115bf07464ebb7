"""Listen to a stage while it trains: generate fixed prompts per task at validation.

At the end of every ``every_n_validations``-th validation (global rank 0 only; nothing here
is a collective), the callback takes the first ``per_task`` validation examples of each
task (text, speaker-prompt codes, video frames: the same prompts every time), generates
audio with the generation API (:func:`unimoe.generation.generate`, KV cache + CFG) on the
model being trained, decodes it with the stage's codec (``pl_module.codec_spec``, recorded
in every checkpoint) and writes WAVs + JSON sidecars to
``<run dir>/samples/step<N>/`` (MLflow artifacts ``samples/step<N>/``, playable in the UI).
The codec reconstruction of each prompt's ground truth (and of its speaker prompt) is written
once to ``samples/reference/`` so the generated clips have something to be compared with.

With ``metrics`` (an :class:`~unimoe.training.callbacks.audio_metrics.AudioMetrics`), the clips
are also scored with an evaluation suite against those references and logged as
``val/audio/<task>/<key>`` (see :mod:`unimoe.training.callbacks.audio_metrics`); they end up in
the stage's ``final_metrics.json`` with the other logged metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger

from unimoe.audio import save_audio
from unimoe.generation import GenerationRequest, GenerationSettings, Generator, write_clips
from unimoe.training.callbacks.audio_metrics import AudioMetrics, ValidationScorer

log = logging.getLogger("unimoe.training")


class AudioSamples(Callback):
    """Generate and log a few fixed clips per task at validation.

    Args:
        per_task: prompts per task (the first validation examples of that task, in order).
        tasks: tasks to sample (default: every task in the validation data).
        every_n_validations: generate at every n-th validation end.
        settings: generation settings (sampling, cfg_scale, max_seconds...); the defaults
            cap clips at 6 s so a CPU run stays quick.
        split: the shard split prompts come from.
        reference: also write the codec reconstruction of each prompt's target once.
        metrics: score the clips with an evaluation suite (``{suite: demo,
            every_n_validations: 1}``; default: no scoring). Needs ``reference``.
    """

    def __init__(
        self,
        per_task: int = 2,
        tasks: Optional[List[str]] = None,
        every_n_validations: int = 1,
        settings: Optional[GenerationSettings] = None,
        split: str = "val",
        reference: bool = True,
        metrics: Optional[Union[AudioMetrics, dict]] = None,
    ) -> None:
        if per_task < 1:
            raise ValueError(f"AudioSamples.per_task must be >= 1, got {per_task}")
        if every_n_validations < 1:
            raise ValueError(f"AudioSamples.every_n_validations must be >= 1, got {every_n_validations}")
        self.per_task, self.tasks, self.every = per_task, tasks, every_n_validations
        self.settings = settings if settings is not None else GenerationSettings(max_seconds=6.0, batch_size=8)
        if isinstance(self.settings, dict):
            self.settings = GenerationSettings.from_options(self.settings)
        self.split, self.reference = split, reference
        self.metrics = AudioMetrics(**metrics) if isinstance(metrics, dict) else metrics
        if self.metrics is not None:
            if not reference:
                raise ValueError("AudioSamples(metrics=...) scores clips against their references: keep reference=True")
            if self.metrics.every_n_validations % self.every:
                raise ValueError(
                    f"AudioSamples: metrics.every_n_validations ({self.metrics.every_n_validations}) must be a "
                    f"multiple of every_n_validations ({self.every}): only validations that generate clips can score them")
        self._scorer: ValidationScorer | None = None
        self.last_results: list = []
        self._codec = None
        self._examples = None
        self._validations = 0
        self._reference_done = False
        self.written: list[Path] = []

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "codec_spec", None) is None:
            raise ValueError(
                "AudioSamples needs the stage's codec to decode audio: set model.init_args.codec "
                "(e.g. {name: spectral_rvq, path: codec.pt}) or init_from a checkpoint that records one"
            )
        self._ensure_scorer()  # a bad suite fails here, before training

    def _ensure_scorer(self) -> ValidationScorer | None:
        if self.metrics is not None and self._scorer is None:
            self._scorer = ValidationScorer(self.metrics.suite)
        return self._scorer

    def _codec_for(self, pl_module):
        if self._codec is None:
            from unimoe.registry import CODECS

            self._codec = CODECS.build(pl_module.codec_spec).eval()
        return self._codec

    def _prompt_examples(self, trainer) -> list:
        """The first ``per_task`` examples of each task in the datamodule's sources (fixed order)."""
        if self._examples is not None:
            return self._examples
        from unimoe.data.dataset import ShardDataset

        sources = getattr(trainer.datamodule, "sources", None)
        if not sources:
            raise ValueError("AudioSamples needs a UniMoEDataModule (its shard sources hold the prompts)")
        picked: dict[str, list] = {}
        for _, dirs in sorted(sources.items()):
            for directory in dirs:
                ds = ShardDataset(directory, split=self.split)
                for i in range(len(ds)):
                    task = ds.row(i)["task"]
                    if self.tasks is not None and task not in self.tasks:
                        continue
                    if len(picked.setdefault(task, [])) < self.per_task:
                        picked[task].append(ds[i])
        self._examples = [ex for task in sorted(picked) for ex in picked[task]]
        if not self._examples:
            log.warning("AudioSamples: no %r examples%s; nothing to generate", self.split,
                        f" for tasks {self.tasks}" if self.tasks else "")
        return self._examples

    # ------------------------------------------------------------------ generation
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        model = _unsharded_on_rank_zero(pl_module)  # collective under MoEParallelStrategy
        if not trainer.is_global_zero:
            return
        scoring = self._ensure_scorer() is not None and (self._validations - 1) % self.metrics.every_n_validations == 0
        out_dir = self.generate(trainer, pl_module, model, log_artifacts=not scoring)
        if out_dir is not None and scoring:
            self.score(trainer, pl_module, out_dir)  # logs the folder with its results

    @staticmethod
    def clip_id(example) -> str:
        """The file name (without ``.wav``) of an example's generated clip and references."""
        return example.id if example.id.startswith(example.task) else f"{example.task}-{example.id}"

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, model=None,
                 log_artifacts: bool = True) -> Path | None:
        examples = self._prompt_examples(trainer)
        if not examples:
            return None
        codec = self._codec_for(pl_module)
        codec.to(pl_module.device)
        requests = [
            GenerationRequest(
                id=self.clip_id(ex), task=ex.task, text=ex.text, prompt_text=ex.prompt_text,
                prompt_codes=ex.prompt_codes, video_frames=ex.video, seed=self.settings.seed + i,
            )
            for i, ex in enumerate(examples)
        ]
        builders = dict(getattr(pl_module, "task_args", None) or {})
        generator = Generator(model if model is not None else pl_module.model, codec, self.settings, builders=builders,
                              info={"stage": getattr(pl_module, "stage_name", None), "step": trainer.global_step},
                              task_ids=getattr(pl_module, "task_ids", None))
        clips = generator.generate(requests)
        out_dir = Path(trainer.default_root_dir) / "samples" / f"step{trainer.global_step:07d}"
        write_clips(clips, out_dir)
        self.written.append(out_dir)
        if log_artifacts:
            self._log_dir(trainer, out_dir, f"samples/{out_dir.name}")
        if self.reference and not self._reference_done:
            self._write_references(trainer, codec, examples)
        log.info("AudioSamples: %d clips in %s", len(clips), out_dir)
        return out_dir

    # ------------------------------------------------------------------ scoring
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> dict[str, float]:
        """Score the clips in ``out_dir`` against the references and log ``val/audio/...``."""
        from unimoe.evaluation.manifest import EvalItem

        started = time.perf_counter()
        ref_dir = self._reference_dir(trainer)
        items = []
        for ex in self._prompt_examples(trainer):
            name = self.clip_id(ex)
            prompt = ref_dir / f"{name}.prompt.wav"
            items.append(EvalItem(id=name, audio=out_dir / f"{name}.wav", task=ex.task, text=ex.text,
                                  reference_audio=ref_dir / f"{name}.wav",
                                  prompt_audio=prompt if prompt.is_file() else None))
        self.last_results = self._scorer.score(items, out_dir, step=trainer.global_step)
        values = ValidationScorer.values(self.last_results)
        for name, value in values.items():
            # Only global rank 0 gets here (nothing is a collective), hence rank_zero_only.
            pl_module.log(name, value, on_step=False, on_epoch=True, rank_zero_only=True)
        log.info("AudioSamples: scored %d clips with suite %r in %.1f s: %s", len(items), self._scorer.suite.name,
                 time.perf_counter() - started, ", ".join(f"{k} {v:.4g}" for k, v in values.items()) or "no values")
        self._log_dir(trainer, out_dir, f"samples/{out_dir.name}")  # results.json / .md too
        return values

    def _reference_dir(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / "samples" / "reference"

    def _write_references(self, trainer, codec, examples) -> None:
        """Codec reconstructions of each prompt's target (and speaker prompt): what the
        generated clips are compared with (the model can at best reproduce its codec)."""
        out_dir = self._reference_dir(trainer)
        with torch.no_grad():
            for ex in examples:
                pieces = [("", ex.codes)] + ([(".prompt", ex.prompt_codes)] if ex.prompt_codes is not None else [])
                for suffix, codes in pieces:
                    wav = codec.decode(codes.unsqueeze(0).to(codec.device))[0].float().cpu()  # [1, S]
                    save_audio(out_dir / f"{self.clip_id(ex)}{suffix}.wav", wav, codec.sample_rate)
        self._reference_done = True
        self._log_dir(trainer, out_dir, "samples/reference")

    @staticmethod
    def _log_dir(trainer, directory: Path, artifact_path: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifacts(logger.run_id, str(directory), artifact_path=artifact_path)


def _unsharded_on_rank_zero(pl_module):
    """The AudioLM to generate with: itself, or (sharded by FSDP2 / EP) a full copy gathered on rank 0.

    A sharded model cannot decode on one rank alone (every forward is a collective), so all
    ranks gather the weights and rank 0 decodes a plain copy; the other ranks get None.
    """
    from unimoe.training.parallel import gather_full_state_dict, is_parallelized

    model = pl_module.model
    if not is_parallelized(model):
        return model
    state = gather_full_state_dict(model)
    if state is None:
        return None
    from unimoe.model.transformer import AudioLM

    copy = AudioLM(model.config)
    copy.load_state_dict(state)
    return copy.to(pl_module.device)
