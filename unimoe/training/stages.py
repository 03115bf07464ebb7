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

from unimoe.checkpoint import METADATA_KEY, CheckpointMetadata, config_to_dict
from unimoe.finite import check_finite_weights
from unimoe.model.config import AudioLMConfig, model_config
from unimoe.data.sequences import SequenceLayout
from unimoe.model.batch import Batch
from unimoe.model.tasks import TaskIds
from unimoe.model.transformer import AudioLM
from unimoe.moe.losses import AuxLossSchedule
from unimoe.moe.stats import RoutingInfo, mean_over_layers
from unimoe.pretrained import PRETRAINED_STAGE
from unimoe.registry import ComponentField, ComponentSpec, plain_spec, spec_parts
from unimoe.training.balance import GlobalLoadBalance
from unimoe.training.determinism import step_randomness
from unimoe.training.init_from import InitFrom, InitReport, load_initial_weights, read_init_checkpoint
from unimoe.training.metrics import TaskLossAccumulator
from unimoe.training.optim import OptimizerConfig, build_optimizer

log = logging.getLogger("unimoe.training")


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
        model: the AudioLM config: a preset name (``demo``), or a mapping of ``AudioLMConfig``
            fields, optionally starting from a preset (``{preset: paper-specialist, num_codebooks: 8}``,
            see :func:`unimoe.model.config.model_config`); None = the ``init_from`` checkpoint's config.
        init_from: start from another stage's checkpoint (weights only, step 0): a path or
            ``{path, include, exclude, remap, strict}``. Mutually exclusive with ``--ckpt_path``.
        optimizer: AdamW + warmup/cosine settings (the stage's default lr when omitted).
        codec: the codec spec the training tokens came from (recorded in every checkpoint;
            the audio-sample callback decodes with it); None = the ``init_from`` checkpoint's.
        freeze: globs of AudioLM parameter names to keep frozen.
        load_balance: load-balance weight schedule for this stage; None = ``model.moe.load_balance``.
        domains: task -> domain for the validation summaries (default: each task's declared
            ``domain``: tts=speech, t2m/v2m=music).
        label: a short name for this model (e.g. ``tts``); used to label experts after upcycling.
        seed: seed of the fresh initialisation (before ``init_from`` is applied).
        task_ids: the model's task table, names in id order; None = the ``init_from``
            checkpoint's (a fresh model starts empty). The data's new tasks are appended at
            setup; the table is saved in the hyper-parameters (so a crash resume keeps it) and
            in every checkpoint (``CheckpointMetadata.task_ids``).
    """

    stage_name: ClassVar[str] = "stage"
    default_lr: ClassVar[float] = 1e-4

    def __init__(
        self,
        model: Optional[Union[str, AudioLMConfig, Dict[str, Any]]] = None,
        init_from: Optional[Union[str, InitFrom]] = None,
        optimizer: Optional[OptimizerConfig] = None,
        codec: Optional[ComponentField] = None,
        freeze: Optional[List[str]] = None,
        load_balance: Optional[AuxLossSchedule] = None,
        domains: Optional[Dict[str, str]] = None,
        label: Optional[str] = None,
        seed: int = 0,
        task_ids: Optional[List[str]] = None,
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
        self.codec_spec = plain_spec(_plain(codec)) if codec is not None else (source.codec if source is not None else None)
        self.domains = None if domains is None else dict(domains)
        self.label = label
        self.lineage: dict[str, Any] = {k: v for k, v in (source.extra if source else {}).items() if k != "label"}
        if self.init_spec is not None:
            self.lineage["init_from"] = {"path": self.init_spec.path, "stage": source.stage}
        self.task_args: dict[str, Any] = dict(source.tasks) if source is not None else {}
        if task_ids is not None:
            self.task_ids = TaskIds(task_ids)
        else:
            self.task_ids = source.task_table() if source is not None else TaskIds()
        self.hparams["task_ids"] = self.task_ids.names
        self.register_buffer("tasks_seen", torch.zeros(len(self.task_ids), dtype=torch.bool), persistent=False)
        self.apply_freezing(freeze)
        # The resolved model config goes into the saved hyper-parameters, so a crash resume
        # (which restores hparams and no longer applies init_from) rebuilds the same model.
        self.hparams["model"] = config_to_dict(config)
        _plain_hparams(self.hparams)
        self.step_stats: StepStats | None = None
        self._eval_losses = TaskLossAccumulator(config.num_codebooks, self.task_ids)
        self._balance = GlobalLoadBalance()
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

    # ------------------------------------------------------------------ the data's view of the model
    def sequence_layout(self, task_specs: dict[str, ComponentSpec]) -> SequenceLayout:
        """What the data module lays sequences out with: this model's config and task ids.

        ``task_specs`` are the data's tasks with the builder spec it uses for each: tasks the
        table lacks get the next ids (in name order, never renumbering the others), and specs
        of tasks this model has no record of are recorded for generation.
        """
        extended = self.task_ids.extended(task_specs)
        if extended is not self.task_ids:
            self.task_ids = extended
            self.hparams["task_ids"] = extended.names
            seen = torch.zeros(len(extended), dtype=torch.bool, device=self.tasks_seen.device)
            seen[: self.tasks_seen.shape[0]] = self.tasks_seen
            self.tasks_seen = seen
            self._eval_losses = TaskLossAccumulator(self.config.num_codebooks, extended)
        # The builders this model was trained with (its prompt format) lay out its data too.
        formats = {t: name for t, s in self.task_args.items() if isinstance(name := spec_parts(s)[0], str)}
        for task, spec in task_specs.items():
            self.task_args.setdefault(task, spec)
        return SequenceLayout(self.config, self.task_ids, task_formats=formats)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_codec(getattr(datamodule, "codec_info", None))

    def check_codec(self, shards_codec: dict[str, Any] | None) -> None:
        """The codec this stage records must be the one the training shards were made with.

        Every checkpoint tells generation which codec decodes its tokens; a recipe pointing at
        another fit of the codec (same shape, other codebooks) would make that wrong silently.
        """
        if not shards_codec or self.codec_spec is None:
            return
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

    def configure_model(self) -> None:
        """Shard the AudioLM under ``MoEParallelStrategy`` (FSDP2 per block, experts over EP); else nothing."""
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        parallelize = getattr(strategy, "parallelize_audiolm", None)
        if parallelize is not None:
            parallelize(self.model)
        elif isinstance(strategy, L.pytorch.strategies.ModelParallelStrategy):
            raise TypeError(f"{type(self).__name__} is sharded by unimoe.training.parallel.MoEParallelStrategy (a "
                            "ModelParallelStrategy with an expert-parallel dim); use it instead of ModelParallelStrategy")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = getattr(self.trainer.strategy, "clip_grad_norm_", None)
        if clip is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported under "
                             f"{type(self.trainer.strategy).__name__}; use 'norm'")
        clip([p for group in optimizer.param_groups for p in group["params"]], float(gradient_clip_val))

    def forward(self, batch: Batch):
        return self.model(batch, logits="none")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        epoch, rank = (self.trainer.current_epoch, self.trainer.global_rank) if self._trainer is not None else (0, 0)
        with step_randomness(self.hparams.seed, epoch, batch_idx, rank, self.device):  # router jitter: resumable
            out = self.model(batch, logits="none")
        step = self.trainer.global_step if self._trainer is not None else 0
        balanced = self.balanced_routing(out.routing, step)
        aux, weight = self.aux_loss(balanced.routing, step)
        loss = out.loss + aux
        size = int(batch.lengths.shape[0])
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/total_loss", loss.detach(), batch_size=size)
        for task_id, value in out.task_losses.items():
            self.log(f"train/loss/{self.task_ids.name(task_id)}", value.detach(), batch_size=size)
        if self.config.moe is not None:
            means = mean_over_layers(balanced.routing)  # global batch (all ranks, accumulated micro-batches)
            self.log("train/aux_loss", aux.detach(), batch_size=size)
            self.log("train/aux_weight", weight, batch_size=size)
            self.log("train/load_balance", means.load_balance.detach(), batch_size=size)
            self.log("train/active_experts", balanced.mean_active_real, prog_bar=True, batch_size=size)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            self.log("train/lr", self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0], batch_size=size)
        self.tasks_seen[batch.task_ids[:, 0].unique()] = True
        self.step_stats = StepStats([_detach(i) for i in out.routing], float(aux.detach()), weight, train=True)
        return loss

    def balanced_routing(self, routing: list[RoutingInfo | None], step: int):
        """The routing with global-batch load-balance losses (:mod:`unimoe.training.balance`)."""
        trainer = self._trainer
        return self._balance(routing, step=step, accumulate=trainer.accumulate_grad_batches if trainer else 1,
                             world_size=trainer.world_size if trainer else 1)

    def aux_loss(self, routing: list[RoutingInfo | None], step: int) -> tuple[Tensor, float]:
        """Weighted MoE aux loss at global ``step`` and the load-balance weight used (0 for dense).

        The weighting itself is :meth:`MoEConfig.aux_loss`'s; the stage only chooses the schedule.
        """
        schedule = self.schedule()
        if schedule is None:
            return torch.zeros((), device=self.device), 0.0
        return self.config.moe.aux_loss(routing, step, schedule=schedule), schedule.weight(step)

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
        seen = [self.task_ids.name(i) for i in torch.nonzero(self.tasks_seen.cpu()).flatten().tolist()]
        extra["data_tasks"] = sorted(set(seen) | set(self.lineage.get("data_tasks") or []))
        if self.label:
            extra["label"] = self.label
        return CheckpointMetadata(config=self.config, codec=self.codec_spec, stage=self.stage_name,
                                  tasks=dict(self.task_args), extra=extra, task_ids=self.task_ids.names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        step = self.trainer.global_step if self._trainer is not None else 0
        reduce = ((lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum"))
                  if self._trainer is not None and self.trainer.world_size > 1 else None)
        check_finite_weights(checkpoint.get("state_dict", {}), f"a checkpoint of {type(self).__name__} at step {step}", reduce)
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
            if name in self.task_ids:
                self.tasks_seen[self.task_ids[name]] = True


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
        model: Optional[Union[str, AudioLMConfig, Dict[str, Any]]] = None,
        init_from: Optional[Union[str, InitFrom]] = None,
        optimizer: Optional[OptimizerConfig] = None,
        codec: Optional[ComponentField] = None,
        trainable: List[str] = ["blocks.*.ffn.router.*", "blocks.*.ffn.shared_experts.*"],  # noqa: B006
        load_balance: Optional[AuxLossSchedule] = None,
        domains: Optional[Dict[str, str]] = None,
        label: Optional[str] = None,
        seed: int = 0,
        task_ids: Optional[List[str]] = None,
    ) -> None:
        self._trainable = list(trainable)
        super().__init__(model=model, init_from=init_from, optimizer=optimizer, codec=codec, freeze=None,
                         load_balance=load_balance, domains=domains, label=label, seed=seed, task_ids=task_ids)

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
    if source is not None and source.stage == PRETRAINED_STAGE:
        return _pretrained_config(model, source, owner)
    if model is None:
        if source is None:
            raise ValueError(f"{owner}: give model (a preset name or config) or init_from (a checkpoint to start from)")
        return source.config
    try:
        return model_config(model, f"{owner}.model")
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc) if str(exc).startswith(owner) else f"{owner}.model: {exc}") from exc


def _pretrained_config(model: Any, source: CheckpointMetadata, owner: str) -> AudioLMConfig:
    """The recipe's audio parts on the pretrained LM's backbone (see :func:`unimoe.pretrained.merge_backbone`)."""
    from unimoe.pretrained import BACKBONE_FIELDS, merge_backbone

    info = source.extra.get("pretrained", {})
    user = None if model is None else _resolve_config(model, None, owner)
    backbone = {f: getattr(source.config, f) for f in BACKBONE_FIELDS}
    try:
        config = merge_backbone(user, backbone, info.get("ref", "?"), from_preset=isinstance(model, str))
    except ValueError as exc:
        raise ValueError(f"{owner}.model: {exc}") from exc
    limit = info.get("max_position_embeddings")
    if isinstance(limit, int) and config.max_seq_len > limit:
        log.warning("%s: max_seq_len %d is longer than the %d positions %s was trained on", owner,
                    config.max_seq_len, limit, info.get("ref"))
    return config


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
    """jsonargparse Namespaces -> dicts (hparams restored from a checkpoint arrive as either); component fields -> specs."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return value.as_dict()
    return plain_spec(value)


def _plain_hparams(hparams) -> None:
    """Dataclasses in hparams -> dicts, so checkpoints load with ``weights_only=True`` (LightningCLI resume)."""
    for key, value in list(hparams.items()):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            hparams[key] = dataclasses.asdict(value)
        elif hasattr(value, "as_dict"):
            hparams[key] = value.as_dict()
        else:
            hparams[key] = plain_spec(value)


def _detach(info: RoutingInfo | None) -> RoutingInfo | None:
    return None if info is None else info.detach()
