"""Listen to a stage while it trains: generate fixed prompts per task at validation.

At the end of every ``every_n_validations``-th validation (global rank 0 only; nothing here
is a collective), the callback takes the first ``per_task`` validation examples of each
task (text, speaker-prompt codes, video frames: the same prompts every time), generates
audio with the generation API (:func:`unimoe.generation.generate`, KV cache + CFG) on the
model being trained, decodes it with the stage's codec (``pl_module.codec_spec``, recorded
in every checkpoint) and writes WAVs + JSON sidecars to
``<run dir>/samples/step<N>/`` (MLflow artifacts ``samples/step<N>/``, playable in the UI).
The codec reconstruction of each prompt's ground truth is written once to
``samples/reference/`` so the generated clips have something to be compared with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger

from unimoe.audio import save_audio
from unimoe.generation import GenerationRequest, GenerationSettings, Generator, write_clips

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
    """

    def __init__(
        self,
        per_task: int = 2,
        tasks: Optional[List[str]] = None,
        every_n_validations: int = 1,
        settings: Optional[GenerationSettings] = None,
        split: str = "val",
        reference: bool = True,
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
        if trainer.is_global_zero:
            self.generate(trainer, pl_module, model)

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, model=None) -> Path | None:
        examples = self._prompt_examples(trainer)
        if not examples:
            return None
        codec = self._codec_for(pl_module)
        codec.to(pl_module.device)
        requests = [
            GenerationRequest(
                id=ex.id if ex.id.startswith(ex.task) else f"{ex.task}-{ex.id}", task=ex.task, text=ex.text, prompt_text=ex.prompt_text,
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
        self._log_dir(trainer, out_dir, f"samples/{out_dir.name}")
        if self.reference and not self._reference_done:
            self._write_references(trainer, codec, examples)
        log.info("AudioSamples: %d clips in %s", len(clips), out_dir)
        return out_dir

    def _write_references(self, trainer, codec, examples) -> None:
        out_dir = Path(trainer.default_root_dir) / "samples" / "reference"
        with torch.no_grad():
            for ex in examples:
                wav = codec.decode(ex.codes.unsqueeze(0).to(codec.device))[0].float().cpu()  # [1, S]
                save_audio(out_dir / f"{ex.task}-{ex.id}.wav", wav, codec.sample_rate)
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
