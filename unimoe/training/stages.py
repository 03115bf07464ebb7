"""The three curriculum stages as LightningModules sharing one model and one training step.

* :class:`SpecialistStage` - stage 1: a dense AudioLM on one task/domain's raw data.
* :class:`WarmupStage`     - stage 2: the upcycled MoE; ONLY the routers and shared experts
  train (on the balanced seed subset); everything else is frozen bit-for-bit.
* :class:`JointStage`      - stage 3: everything trains on the balanced mix, with the
  load-balance weight annealed as a function of the trainer's global step.

Contracts (see docs/ARCHITECTURE.md "Training"):

* the AudioLM lives at ``self.model`` and every checkpoint carries ``checkpoint["unimoe"]``
  (:mod:`unimoe.checkpoint`), so the next stage, generation and evaluation rebuild it alone;
* a stage starts from the previous one through ``init_from`` (weights only, step 0); crash
  resume is Lightning's ``ckpt_path``; the two are mutually exclusive;
* after every training / validation step ``self.step_stats`` holds the step's detached
  routing (per layer), aux loss and its weight, for callbacks (:mod:`unimoe.training.callbacks`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Union

import lightning as L
import torch
from torch import Tensor

from unimoe.checkpoint import METADATA_KEY, CheckpointMetadata, config_from_dict, config_to_dict
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import TASK_IDS, Batch
from unimoe.model.transformer import AudioLM
from unimoe.moe.losses import AuxLossSchedule, aux_loss
from unimoe.moe.stats import RoutingInfo, mean_over_layers
from unimoe.registry import ComponentSpec
from unimoe.training.init_from import InitFrom, InitReport, load_initial_weights, read_init_checkpoint
from unimoe.training.metrics import DEFAULT_DOMAINS, TaskLossAccumulator
from unimoe.training.optim import OptimizerConfig, build_optimizer

log = logging.getLogger("unimoe.training")

SEQUENCE_FIELDS = ("num_codebooks", "codebook_size", "delays", "text_tokenizer", "vision")
"""Model-config fields the data pipeline lays sequences out with; data and model must agree."""


@dataclass
class StepStats:
    """What one training/validation step leaves for callbacks (all detached)."""

    routing: List[Optional[RoutingInfo]]
    aux_loss: float
    aux_weight: float
    train: bool


class StageModule(L.LightningModule):
    """Shared training logic of every stage. Subclasses set the stage name and what trains.

    Args:
        model: the AudioLM config (a preset name or a mapping of ``AudioLMConfig`` fields);
            None = the ``init_from`` checkpoint's config.
        init_from: start from another stage's checkpoint (weights only, step 0): a path or
            ``{path, include, exclude, remap, strict}``. Mutually exclusive with ``--ckpt_path``.
        optimizer: AdamW + warmup/cosine settings (the stage's default lr when omitted).
        codec: the codec spec the training tokens came from (recorded in every checkpoint;
            the audio-sample callback decodes with it); None = the ``init_from`` checkpoint's.
        freeze: globs of AudioLM parameter names to keep frozen.
        load_balance: load-balance weight schedule for this stage; None = ``model.moe.load_balance``.
        domains: task -> domain for the validation summaries (default tts=speech, t2m/v2m=music).
        label: a short name for this model (e.g. ``tts``); used to label experts after upcycling.
        seed: seed of the fresh initialisation (before ``init_from`` is applied).
    """

    stage_name: ClassVar[str] = "stage"
    default_lr: ClassVar[float] = 1e-4

    def __init__(
        self,
        model: Optional[Union[str, AudioLMConfig]] = None,
        init_from: Optional[Union[str, InitFrom]] = None,
        optimizer: Optional[OptimizerConfig] = None,
        codec: Optional[ComponentSpec] = None,
        freeze: Optional[List[str]] = None,
        load_balance: Optional[AuxLossSchedule] = None,
        domains: Optional[Dict[str, str]] = None,
        label: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.init_spec = InitFrom.coerce(_plain(init_from))
        source: CheckpointMetadata | None = None
        state = None
        if self.init_spec is not None:
            source, state = read_init_checkpoint(self.init_spec)
        config = _resolve_config(model, source, type(self).__name__)
        self.check_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = AudioLM(config)
        self.init_report: InitReport | None = None
        if self.init_spec is not None:
            self.init_report = load_initial_weights(self.model, self.init_spec, state)
            log.info(self.init_report.summary())
        self.optim = _coerce(OptimizerConfig, optimizer, "optimizer") or OptimizerConfig(lr=self.default_lr)
        self.load_balance = _coerce(AuxLossSchedule, load_balance, "load_balance")
        self.codec_spec = _plain(codec) if codec is not None else (source.codec if source is not None else None)
        self.domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        self.label = label
        self.lineage: dict[str, Any] = {k: v for k, v in (source.extra if source else {}).items() if k != "label"}
        if self.init_spec is not None:
            self.lineage["init_from"] = {"path": self.init_spec.path, "stage": source.stage}
        self.task_args: dict[str, Any] = dict(source.tasks) if source is not None else {}
        self.register_buffer("tasks_seen", torch.zeros(len(TASK_IDS), dtype=torch.bool), persistent=False)
        self.apply_freezing(freeze)
        # The resolved model config goes into the saved hyper-parameters, so a crash resume
        # (which restores hparams and no longer applies init_from) rebuilds the same model.
        self.hparams["model"] = config_to_dict(config)
        _plain_hparams(self.hparams)
        self.step_stats: StepStats | None = None
        self._eval_losses = TaskLossAccumulator(config.num_codebooks)
        self.metadata().to_dict()  # plain JSON or a clear error now, not at the first checkpoint save

    # ------------------------------------------------------------------ configuration checks
    def check_config(self, config: AudioLMConfig) -> None:
        """Subclasses reject configs they cannot train (dense vs MoE)."""

    def apply_freezing(self, freeze: Optional[List[str]]) -> None:
        if freeze:
            names = [n for n, _ in self.model.named_parameters()]
            for pattern in freeze:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ValueError(f"{type(self).__name__}.freeze: pattern {pattern!r} matches no model parameter")
            for name, p in self.model.named_parameters():
                if any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
                    p.requires_grad_(False)

    @property
    def config(self) -> AudioLMConfig:
        return self.model.config

    @property
    def expert_labels(self) -> list[str] | None:
        """Names of the routed experts (``tts.0``, ``tts.1``... after upcycling), else None."""
        labels = self.lineage.get("expert_labels")
        return list(labels) if labels else None

    def schedule(self) -> AuxLossSchedule | None:
        if self.config.moe is None:
            return None
        return self.load_balance or self.config.moe.load_balance

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_config = getattr(datamodule, "model_config", None)
        if isinstance(data_config, AudioLMConfig):
            diff = [f for f in SEQUENCE_FIELDS if getattr(data_config, f) != getattr(self.config, f)]
            if diff:
                details = "; ".join(f"{f}: data {getattr(data_config, f)!r} vs model {getattr(self.config, f)!r}" for f in diff)
                raise ValueError(
                    f"data.init_args.model and the stage's model disagree on how sequences are laid out ({details}); "
                    "give the data module the same codec shape, delays, tokenizer and vision encoder"
                )
            if not self.task_args:
                self.task_args = {t: {"name": t, "cond_drop_prob": datamodule.cond_drop_prob,
                                      **(getattr(datamodule, "task_args", None) or {}).get(t, {})} for t in TASK_IDS}
        self.check_codec(getattr(datamodule, "codec_info", None))

    def check_codec(self, shards_codec: dict[str, Any] | None) -> None:
        """The codec this stage records must be the one the training shards were made with.

        Every checkpoint tells generation which codec decodes its tokens; a recipe pointing at
        another fit of the codec (same shape, other codebooks) would make that wrong silently.
        """
        if not shards_codec or self.codec_spec is None:
            return
        import unimoe.components  # noqa: F401  registers the codecs
        from unimoe.data.shards import CodecMismatchError, codec_record, compare_codecs
        from unimoe.registry import CODECS

        try:
            codec = CODECS.build(self.codec_spec)
        except Exception as exc:  # noqa: BLE001 - any build failure is a bad `codec` field
            raise ValueError(f"{type(self).__name__}.codec {self.codec_spec!r} cannot be built: {exc}") from exc
        try:
            compare_codecs(shards_codec, codec_record(codec), "the training data of this stage")
        except CodecMismatchError as exc:
            raise ValueError(f"{type(self).__name__}.codec {self.codec_spec!r} is not the codec of the shards: {exc}") from exc

    def forward(self, batch: Batch):
        return self.model(batch, logits="none")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.model(batch, logits="none")
        step = self.trainer.global_step if self._trainer is not None else 0
        aux, weight = self.aux_loss(out.routing, step)
        loss = out.loss + aux
        size = int(batch.lengths.shape[0])
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/total_loss", loss.detach(), batch_size=size)
        for task_id, value in out.task_losses.items():
            self.log(f"train/loss/{TASK_IDS.name(task_id)}", value.detach(), batch_size=size)
        if self.config.moe is not None:
            means = mean_over_layers(out.routing)
            self.log("train/aux_loss", aux.detach(), batch_size=size)
            self.log("train/aux_weight", weight, batch_size=size)
            self.log("train/load_balance", means.load_balance.detach(), batch_size=size)
            self.log("train/active_experts", means.mean_active_real, prog_bar=True, batch_size=size)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            self.log("train/lr", self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0], batch_size=size)
        self.tasks_seen[batch.task_ids[:, 0].unique()] = True
        self.step_stats = StepStats([_detach(i) for i in out.routing], float(aux.detach()), weight, train=True)
        return loss

    def aux_loss(self, routing: list[RoutingInfo | None], step: int) -> tuple[Tensor, float]:
        """Weighted MoE aux loss at global ``step`` and the load-balance weight used (0 for dense)."""
        schedule = self.schedule()
        if schedule is None:
            return torch.zeros((), device=self.device), 0.0
        weight = schedule.weight(step)
        moe = self.config.moe
        return aux_loss(routing, load_balance_weight=weight, z_loss_coef=moe.z_loss_coef,
                        entropy_loss_coef=moe.entropy_loss_coef), weight

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: Batch) -> None:
        out = self.model(batch, logits="none")
        if out.token_loss is not None:
            self._eval_losses.update(out.token_loss, batch.labels, batch.task_ids)
        step = self.trainer.global_step if self._trainer is not None else 0
        aux, weight = self.aux_loss(out.routing, step)
        self.step_stats = StepStats([_detach(i) for i in out.routing], float(aux), weight, train=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_losses.reset()

    def on_test_epoch_start(self) -> None:
        self._eval_losses.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if self._trainer is not None else None
        metrics = self._eval_losses.compute(prefix, reduce=reduce, domains=self.domains)
        for name, value in metrics.items():  # already summed over ranks: identical everywhere
            self.log(name, value, prog_bar=name == f"{prefix}/loss", sync_dist=False)
        self._eval_losses.reset()

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        optimizer, scheduler = build_optimizer(self.model.named_parameters(), self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def metadata(self) -> CheckpointMetadata:
        """What this stage's checkpoints say about themselves."""
        extra = dict(self.lineage)
        seen = [TASK_IDS.name(i) for i in torch.nonzero(self.tasks_seen.cpu()).flatten().tolist()]
        extra["data_tasks"] = sorted(set(seen) | set(self.lineage.get("data_tasks") or []))
        if self.label:
            extra["label"] = self.label
        return CheckpointMetadata(config=self.config, codec=self.codec_spec, stage=self.stage_name,
                                  tasks=dict(self.task_args), extra=extra)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.metadata().to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Crash resume: restore what init_from provided the first time (lineage, codec, tasks seen)."""
        if self.init_spec is not None and self._trainer is not None:
            raise ValueError(
                f"init_from ({self.init_spec.path}) and ckpt_path ({self.trainer.ckpt_path}) are mutually exclusive: "
                "init_from starts a new stage from another stage's weights at step 0; ckpt_path resumes this "
                "stage (weights, optimizer, step). Build the module without init_from to resume."
            )
        meta = checkpoint.get(METADATA_KEY)
        if not meta:
            return
        saved = CheckpointMetadata.from_dict(meta)
        self.lineage = {k: v for k, v in saved.extra.items() if k not in ("data_tasks", "label")} | {
            k: v for k, v in self.lineage.items() if k not in saved.extra
        }
        if self.codec_spec is None:
            self.codec_spec = saved.codec
        if not self.task_args:
            self.task_args = dict(saved.tasks)
        for name in saved.extra.get("data_tasks") or []:
            if name in TASK_IDS:
                self.tasks_seen[TASK_IDS[name]] = True


class SpecialistStage(StageModule):
    """Stage 1: a dense specialist (one task/domain, raw data mix, paper lr 1e-4)."""

    stage_name: ClassVar[str] = "specialist"
    default_lr: ClassVar[float] = 1e-4

    def check_config(self, config: AudioLMConfig) -> None:
        if config.moe is not None:
            raise ValueError("SpecialistStage trains a dense model: model.moe must be null (MoE comes from upcycling)")


class WarmupStage(StageModule):
    """Stage 2: train ONLY the routers and shared experts of the upcycled MoE (paper lr 3e-5).

    Args:
        trainable: globs of AudioLM parameter names that train; everything else is frozen
            (``requires_grad=False``, never given to the optimizer, bit-for-bit unchanged).
        (others: see :class:`StageModule`)
    """

    stage_name: ClassVar[str] = "warmup"
    default_lr: ClassVar[float] = 3e-5

    def __init__(
        self,
        model: Optional[Union[str, AudioLMConfig]] = None,
        init_from: Optional[Union[str, InitFrom]] = None,
        optimizer: Optional[OptimizerConfig] = None,
        codec: Optional[ComponentSpec] = None,
        trainable: List[str] = ["blocks.*.ffn.router.*", "blocks.*.ffn.shared_experts.*"],  # noqa: B006
        load_balance: Optional[AuxLossSchedule] = None,
        domains: Optional[Dict[str, str]] = None,
        label: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        self._trainable = list(trainable)
        super().__init__(model=model, init_from=init_from, optimizer=optimizer, codec=codec, freeze=None,
                         load_balance=load_balance, domains=domains, label=label, seed=seed)

    def check_config(self, config: AudioLMConfig) -> None:
        if config.moe is None:
            raise ValueError("WarmupStage needs an MoE model (init_from an upcycled checkpoint, or model.moe set)")

    def apply_freezing(self, freeze: Optional[List[str]]) -> None:
        if not self._trainable:
            raise ValueError("WarmupStage.trainable is empty: nothing would train")
        names = [n for n, _ in self.model.named_parameters()]
        for pattern in self._trainable:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"WarmupStage.trainable: pattern {pattern!r} matches no model parameter")
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in self._trainable))
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        log.info("warmup: training %d of %d parameters (%s); the rest is frozen", n_train, n_all, self._trainable)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


class JointStage(StageModule):
    """Stage 3: everything trains on the balanced mix, aux weight annealed by global step (paper lr 1e-5)."""

    stage_name: ClassVar[str] = "joint"
    default_lr: ClassVar[float] = 1e-5

    def check_config(self, config: AudioLMConfig) -> None:
        if config.moe is None:
            raise ValueError("JointStage trains the MoE model: model.moe must be set (or init_from a warmup checkpoint)")


# ---------------------------------------------------------------------- helpers
def _resolve_config(model: Any, source: CheckpointMetadata | None, owner: str) -> AudioLMConfig:
    model = _plain(model)
    if model is None:
        if source is None:
            raise ValueError(f"{owner}: give model (a preset name or config) or init_from (a checkpoint to start from)")
        return source.config
    if isinstance(model, AudioLMConfig):
        return model
    if isinstance(model, str):
        return AudioLMConfig.from_preset(model)
    if isinstance(model, dict):
        try:
            return config_from_dict(model)
        except Exception as exc:
            raise ValueError(f"{owner}.model: {exc}") from exc
    raise ValueError(f"{owner}.model must be a preset name or an AudioLMConfig mapping, got {type(model).__name__}")


def _coerce(cls, value, name: str):
    value = _plain(value)
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise ValueError(f"{name} must be a mapping of {cls.__name__} fields, got {value!r}")


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces -> dicts (hparams restored from a checkpoint arrive as either)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return value.as_dict()
    return value


def _plain_hparams(hparams) -> None:
    """Dataclasses in hparams -> dicts, so checkpoints load with ``weights_only=True`` (LightningCLI resume)."""
    for key, value in list(hparams.items()):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            hparams[key] = dataclasses.asdict(value)
        elif hasattr(value, "as_dict"):
            hparams[key] = value.as_dict()


def _detach(info: RoutingInfo | None) -> RoutingInfo | None:
    return None if info is None else info.detach()
