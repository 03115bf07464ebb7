"""``MoEParallelStrategy``: Lightning's ``ModelParallelStrategy`` with an expert-parallel mesh dim.

Recipe YAML (the init-arg names below are a stable contract: ``unimoe plan`` reads them)::

    trainer:
      accelerator: gpu
      devices: 8
      num_nodes: 4
      precision: 32-true                # the strategy's mixed_precision is the precision
      use_distributed_sampler: false    # the data module gives every rank its own batches
      strategy:
        class_path: unimoe.training.parallel.MoEParallelStrategy
        init_args:
          expert_parallel_size: 4       # ranks per expert-parallel group (divides num_routed_experts)
          data_parallel_size: auto      # world_size / expert_parallel_size (the number of EP groups)
          activation_checkpointing: false
          mixed_precision: bf16         # bf16: bf16 params/compute, fp32 grad reduction + master weights; fp32
          reshard_after_forward: true

Init args:

* ``expert_parallel_size`` (int, default 1): the routed experts of every MoE layer are split
  over this many consecutive ranks; each holds ``num_routed_experts / expert_parallel_size``
  experts and tokens reach them by all-to-all. 1 = no expert parallelism (plain FSDP2).
* ``data_parallel_size`` (int or ``"auto"``): the mesh's other dim; ``world_size =
  data_parallel_size x expert_parallel_size``. Every rank still reads its own data, so the
  data-parallel degree of the batch is the whole world size; non-expert parameters are
  sharded over all ranks, each EP group's experts over the ``data_parallel_size`` groups.
* ``activation_checkpointing`` (bool, default false): recompute every transformer block in
  backward (less activation memory, about a third more compute).
* ``mixed_precision`` (``"bf16"`` | ``"fp32"``, default ``"bf16"``): FSDP2 mixed precision
  (the router is always fp32). Leave ``trainer.precision`` at ``32-true``.
* ``reshard_after_forward`` (bool, default true): free the gathered block weights after
  forward (re-gathered in backward); false trades memory for one all-gather less per block.
* ``save_distributed_checkpoint`` (bool, default true): checkpoints are folders of shards
  (resumable at any world size / EP size); false gathers one full file on rank 0.

Multi-node runs go through Lightning's usual paths (``num_nodes``, torchrun, SLURM). The
LightningModule applies the parallelism in ``configure_model`` (unimoe's stage modules call
:meth:`MoEParallelStrategy.parallelize_audiolm`). Bad layouts fail with one error naming the
field and the numbers before any process group exists: a world size the mesh does not divide
(at ``Trainer`` construction), an expert count the EP size does not divide, EP on a dense
model, a module without an AudioLM (when ``fit`` starts, before processes are launched).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy

from unimoe.sharded_checkpoint import check_fits, is_sharded_checkpoint, staging_path, swap_in
from unimoe.training.parallel.mesh import MeshError, MeshLayout
from unimoe.training.parallel.sharding import MixedPrecision, ParallelSettings, check_model_layout, parallelize_audiolm


class MoEParallelStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks x expert parallelism for the routed experts (see the module docstring)."""

    def __init__(
        self,
        expert_parallel_size: int = 1,
        data_parallel_size: Union[int, Literal["auto"]] = "auto",
        activation_checkpointing: bool = False,
        mixed_precision: MixedPrecision = "bf16",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size="auto",
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool) or expert_parallel_size < 1:
            raise MeshError(f"MoEParallelStrategy.expert_parallel_size must be an integer >= 1, got {expert_parallel_size!r}")
        if data_parallel_size != "auto" and (not isinstance(data_parallel_size, int) or data_parallel_size < 1):
            raise MeshError(f"MoEParallelStrategy.data_parallel_size must be 'auto' or an integer >= 1, "
                            f"got {data_parallel_size!r}")
        self.expert_parallel_size = expert_parallel_size
        self.requested_data_parallel_size = data_parallel_size
        self.settings = ParallelSettings(mixed_precision=mixed_precision, activation_checkpointing=activation_checkpointing,
                                         reshard_after_forward=reshard_after_forward)
        self.layout: MeshLayout | None = None

    # ------------------------------------------------------------------ layout checks (no process group yet)
    def set_world_ranks(self) -> None:
        """Lightning calls this at Trainer construction and again when processes start: check the mesh here."""
        super().set_world_ranks()
        if self.parallel_devices:
            self.layout = MeshLayout.resolve(self.num_nodes * self.num_processes, self.expert_parallel_size,
                                             self.requested_data_parallel_size)

    def connect(self, model) -> None:
        """``fit``/``validate`` start here, before any process is launched: refuse modules that cannot shard."""
        from unimoe.model.transformer import AudioLM

        audiolm = getattr(model, "model", None)
        if not isinstance(audiolm, AudioLM):
            raise TypeError(
                f"MoEParallelStrategy shards unimoe's AudioLM, kept at `.model` by the stage modules (SpecialistStage, "
                f"WarmupStage, JointStage); {type(model).__name__} has no AudioLM there and cannot be sharded by it"
            )
        check_model_layout(audiolm, self.expert_parallel_size)
        if self.precision_plugin.precision != "32-true":
            raise ValueError(
                f"trainer.precision={self.precision_plugin.precision!r} with MoEParallelStrategy: mixed precision is "
                f"the strategy's mixed_precision ({self.settings.mixed_precision!r}, FSDP2 MixedPrecisionPolicy); "
                "set trainer.precision: 32-true"
            )
        super().connect(model)

    # ------------------------------------------------------------------ processes and mesh
    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank (EP peers included) reads its own data
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        self.layout = MeshLayout.resolve(self.world_size, self.expert_parallel_size, self.requested_data_parallel_size)
        self._device_mesh = self.layout.build(self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    def parallelize_audiolm(self, model) -> None:
        """What the stage modules' ``configure_model`` calls: FSDP2 per block + EP (idempotent)."""
        parallelize_audiolm(model, self.device_mesh, self.settings)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Global-norm clipping across the flat and the data x expert meshes (used by the stages)."""
        from unimoe.training.parallel.clip import clip_grad_norm_

        return clip_grad_norm_(parameters, max_norm)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Sharded saves are written beside the target and renamed into place: a kill never leaves half a checkpoint."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staged = staging_path(path)
        if self.global_rank == 0 and staged.exists():
            import shutil

            shutil.rmtree(staged) if staged.is_dir() else staged.unlink()  # a save a kill interrupted
        self.barrier()
        super().save_checkpoint(checkpoint, staged, storage_options)  # collective; meta.pt last (rank 0)
        self.barrier()
        if self.global_rank == 0:
            swap_in(staged, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Resume (any world size / EP size); a folder of another model layout is refused before loading."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            assert self.model is not None
            expected = {k: tuple(v.shape) for k, v in get_model_state_dict(self.model).items()}
            check_fits(path, expected)  # every rank reads the same index: all raise alike, nothing hangs
        return super().load_checkpoint(path, weights_only)
