"""Scaling a stage past one device: FSDP2 sharding x expert parallelism on Lightning (docs/training.md).

``MoEParallelStrategy`` (a ``ModelParallelStrategy``) builds the data x expert mesh; the
stage modules' ``configure_model`` shards the AudioLM with :func:`parallelize_audiolm`.
"""

from unimoe.training.parallel.mesh import MeshError, MeshLayout
from unimoe.training.parallel.sharding import ParallelSettings, gather_full_state_dict, is_parallelized, parallelize_audiolm
from unimoe.training.parallel.strategy import MoEParallelStrategy

__all__ = [
    "MeshError",
    "MeshLayout",
    "MoEParallelStrategy",
    "ParallelSettings",
    "gather_full_state_dict",
    "is_parallelized",
    "parallelize_audiolm",
]
