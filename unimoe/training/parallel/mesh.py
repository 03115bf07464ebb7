"""The device mesh of :class:`~unimoe.training.parallel.MoEParallelStrategy`: data x expert parallel.

``world_size = data_parallel_size x expert_parallel_size``, laid out row-major as a 2-D
:class:`~torch.distributed.device_mesh.DeviceMesh` with dims ``("data_parallel",
"expert_parallel")``: rank ``r`` sits at ``(r // ep, r % ep)``, so an expert-parallel group
is ``ep`` consecutive ranks (on one node when ``ep`` <= devices per node: the all-to-all is
the heaviest traffic).

Every one of the ``world_size`` ranks reads its own data (expert parallelism borrows its
ranks from data parallelism, as in torchtitan). Non-expert parameters are sharded (FSDP2)
over all ``world_size`` ranks; routed experts are split over the ``ep`` ranks of a group and
each group's share is sharded over the ``data_parallel_size`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

DATA_PARALLEL = "data_parallel"
EXPERT_PARALLEL = "expert_parallel"
SHARDED = "data_expert"
"""The flattened (data_parallel, expert_parallel) dim: every rank; non-expert parameters shard over it."""


class MeshError(ValueError):
    """The requested layout does not fit the world size or the model (the message names fields and numbers)."""


@dataclass(frozen=True)
class MeshLayout:
    """Sizes of the strategy's mesh (validated)."""

    world_size: int
    data_parallel_size: int
    expert_parallel_size: int

    @classmethod
    def resolve(
        cls, world_size: int, expert_parallel_size: int, data_parallel_size: Union[int, Literal["auto"]] = "auto",
        *, where: str = "MoEParallelStrategy",
    ) -> "MeshLayout":
        """Check the sizes against the world size; ``data_parallel_size="auto"`` = ``world_size // ep``."""
        if not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool) or expert_parallel_size < 1:
            raise MeshError(f"{where}.expert_parallel_size must be an integer >= 1, got {expert_parallel_size!r}")
        if world_size % expert_parallel_size:
            raise MeshError(
                f"{where}: the world size {world_size} (num_nodes x devices) is not divisible by "
                f"expert_parallel_size={expert_parallel_size}; use a world size that is a multiple of it"
            )
        auto = world_size // expert_parallel_size
        if data_parallel_size == "auto":
            data_parallel_size = auto
        if not isinstance(data_parallel_size, int) or isinstance(data_parallel_size, bool) or data_parallel_size < 1:
            raise MeshError(f"{where}.data_parallel_size must be 'auto' or an integer >= 1, got {data_parallel_size!r}")
        if data_parallel_size * expert_parallel_size != world_size:
            raise MeshError(
                f"{where}: data_parallel_size={data_parallel_size} x expert_parallel_size={expert_parallel_size} = "
                f"{data_parallel_size * expert_parallel_size}, but the world size is {world_size} (num_nodes x devices); "
                f"set data_parallel_size: {auto} (or 'auto')"
            )
        return cls(world_size, data_parallel_size, expert_parallel_size)

    def build(self, device_type: str):
        """The 2-D mesh (collective: every rank calls it after the process group is up)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.data_parallel_size, self.expert_parallel_size),
                                mesh_dim_names=(DATA_PARALLEL, EXPERT_PARALLEL))
        mesh[(DATA_PARALLEL, EXPERT_PARALLEL)]._flatten(SHARDED)  # registers mesh[SHARDED]
        return mesh

