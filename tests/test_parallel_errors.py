"""Bad layouts and bad checkpoints under MoEParallelStrategy: one clear error, before any process group.

Everything here runs in the test process: the checks happen at Trainer construction
(world size vs mesh) or when ``fit`` connects the module (model vs mesh), both before
Lightning initialises ``torch.distributed``; sharded-checkpoint checks read files only.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from boring_stage import Boring  # noqa: E402  (tests/helpers)
from parallel_fit import tiny_config  # noqa: E402

from unimoe.checkpoint import CheckpointError, read_checkpoint
from unimoe.sharded_checkpoint import (
    META_FILE, ShardedCheckpointError, check_fits, checkpoint_exists, recover_swap, staging_path, swap_in,
)
from unimoe.training.parallel import MeshError, MeshLayout, MoEParallelStrategy
from unimoe.training.stages import JointStage, SpecialistStage


def trainer(devices: int, **strategy_args) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=MoEParallelStrategy(**strategy_args), logger=False)


def test_world_size_the_mesh_does_not_divide_is_refused_at_trainer_construction():
    with pytest.raises(MeshError, match=r"world size 3 \(num_nodes x devices\) is not divisible by expert_parallel_size=2"):
        trainer(3, expert_parallel_size=2)
    with pytest.raises(MeshError, match=r"data_parallel_size=3 x expert_parallel_size=2 = 6, but the world size is 4"):
        trainer(4, expert_parallel_size=2, data_parallel_size=3)
    assert not torch.distributed.is_initialized()
    assert MeshLayout.resolve(8, 4) == MeshLayout(world_size=8, data_parallel_size=2, expert_parallel_size=4)


@pytest.mark.parametrize("args,message", [
    ({"expert_parallel_size": 0}, "expert_parallel_size must be an integer >= 1, got 0"),
    ({"data_parallel_size": -1}, "data_parallel_size must be 'auto' or an integer >= 1, got -1"),
    ({"mixed_precision": "fp16"}, r"mixed_precision must be one of \('bf16', 'fp32'\), got 'fp16'"),
])
def test_bad_strategy_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        MoEParallelStrategy(**args)


def test_expert_count_not_divisible_by_ep_is_refused_when_fit_connects():
    strategy = trainer(4, expert_parallel_size=4).strategy
    with pytest.raises(MeshError, match=r"MoEConfig.num_routed_experts=6 is not divisible by "
                                        r"MoEParallelStrategy.expert_parallel_size=4"):
        strategy.connect(JointStage(model=tiny_config(6)))
    strategy.connect(JointStage(model=tiny_config(4)))  # 4 experts over 4 ranks is fine
    assert not torch.distributed.is_initialized()


def test_expert_parallelism_on_a_dense_stage_is_refused():
    dense = tiny_config()
    dense.moe = None
    with pytest.raises(MeshError, match="expert_parallel_size=2 needs an MoE model, but this model is dense"):
        trainer(2, expert_parallel_size=2).strategy.connect(SpecialistStage(model=dense))
    trainer(2, expert_parallel_size=1).strategy.connect(SpecialistStage(model=dense))  # plain FSDP2: fine


def test_a_module_that_cannot_shard_is_refused():
    with pytest.raises(TypeError, match="Boring has no AudioLM there and cannot be sharded"):
        trainer(2).strategy.connect(Boring())


def test_precision_is_the_strategys():
    t = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", strategy=MoEParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match="set trainer.precision: 32-true"):
        t.strategy.connect(JointStage(model=tiny_config()))


# ---------------------------------------------------------------------- sharded checkpoint files
def write_folder(path, tensors: dict[str, torch.Tensor], header: dict | None = None):
    """A sharded checkpoint as MoEParallelStrategy writes it (one process: no_dist)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": tensors}, checkpoint_id=str(path), no_dist=True)
    torch.save(header or {"global_step": 3}, path / META_FILE)
    return path


def test_a_folder_of_another_model_layout_is_refused_naming_the_tensors(tmp_path):
    folder = write_folder(tmp_path / "last.ckpt", {"model.w": torch.ones(4, 3), "model.old": torch.zeros(2)})
    check_fits(folder, {"model.w": (4, 3), "model.old": (2,)})
    with pytest.raises(ShardedCheckpointError, match=r"model.w: checkpoint \(4, 3\) vs model \(8, 3\).*model.new.*model.old"):
        check_fits(folder, {"model.w": (8, 3), "model.new": (1,)})


def test_read_checkpoint_assembles_a_folder_and_names_a_broken_one(tmp_path):
    from unimoe.checkpoint import config_to_dict

    meta = {"format_version": 1, "config": config_to_dict(tiny_config()), "codec": None, "stage": "joint",
            "tasks": {}, "extra": {}}
    folder = write_folder(tmp_path / "final.ckpt", {"model.w": torch.arange(6.0).view(2, 3)},
                          {"global_step": 5, "unimoe": meta})
    checkpoint = read_checkpoint(folder)
    assert checkpoint["global_step"] == 5 and checkpoint["unimoe"]["stage"] == "joint"
    assert torch.equal(checkpoint["state_dict"]["model.w"], torch.arange(6.0).view(2, 3))
    (folder / ".metadata").unlink()  # a folder whose shard index is gone
    with pytest.raises(CheckpointError, match="cannot read the shard index of .*final.ckpt"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nothing.ckpt")


def test_sharded_saves_replace_the_old_folder_atomically(tmp_path):
    path = tmp_path / "last.ckpt"
    write_folder(path, {"model.w": torch.zeros(2)}, {"global_step": 1})
    staged = write_folder(staging_path(path), {"model.w": torch.ones(2)}, {"global_step": 2})
    swap_in(staged, path)
    assert read_checkpoint(path)["global_step"] == 2 and not staged.exists()
    # a kill between the two renames of the next swap: the previous folder is put back by any reader
    previous = path.with_name(f".{path.name}.previous")
    path.rename(previous)
    assert checkpoint_exists(path) and read_checkpoint(path)["global_step"] == 2 and not previous.exists()
    recover_swap(path)  # nothing to do now


def test_resuming_a_folder_without_the_strategy_is_refused(tmp_path, capsys):
    from unimoe.training.cli import run_lightning_cli

    folder = write_folder(tmp_path / "last.ckpt", {"model.w": torch.zeros(2)},
                          {"hyper_parameters": {"_class_path": "boring_stage.Boring", "hidden": 8, "lr": 0.1}})
    config = tmp_path / "boring.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "boring_stage.Boring"},
                                      "data": {"class_path": "boring_stage.BoringData"},
                                      "trainer": {"strategy": "ddp", "default_root_dir": str(tmp_path / "run")}}))
    assert run_lightning_cli(["fit", "--config", str(config), "--ckpt_path", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a sharded checkpoint (a folder written by MoEParallelStrategy)" in err
    assert "unimoe checkpoint consolidate" in err
