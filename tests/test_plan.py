"""``unimoe plan``: the memory model against closed forms and PyTorch's own memory tracker,
recipes of every shape (stage files, curriculum stages, checkpoints), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from unimoe.cli import main as unimoe
from unimoe.model.config import AudioLMConfig
from unimoe.model.transformer import AudioLM
from unimoe.training.memory import SHARDED_PRECISIONS, TRAINER_PRECISIONS, Layout, Workload, estimate, model_shape
from unimoe.training.plan import PlanError, load_stage, make_plan, parse_memory, plan_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "paper" / "curriculum.yaml"
MOE_PARALLEL = "unimoe.training.parallel.MoEParallelStrategy"


def _plan(capsys, *args) -> dict:
    assert unimoe(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *args) -> str:
    assert unimoe(["plan", *args]) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------- the memory model
def test_static_memory_is_the_closed_form():
    model = AudioLM(AudioLMConfig.from_preset("tiny-moe"))
    names = [n for n, _ in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    trainable = [n for n in names if ".ffn.router." in n or ".ffn.shared_experts." in n]
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    shape = model_shape(model, trainable)
    assert (shape.total, shape.trainable) == (total, n_trainable)
    work = Workload(tokens=64, active_experts=2)
    ddp = estimate(shape, Layout("ddp", TRAINER_PRECISIONS["bf16-mixed"], world_size=8), work).components
    assert ddp["parameters"] == 4 * total and ddp["gradients"] == ddp["ddp_gradient_buckets"] == 4 * n_trainable
    assert ddp["optimizer_states"] == 8 * n_trainable and ddp["autocast_weight_copies"] == 2 * n_trainable
    fsdp = estimate(shape, Layout("fsdp", SHARDED_PRECISIONS["bf16"], world_size=8, expert_parallel_size=2), work)
    assert fsdp.components["parameters"] == 4 * total / 8 and fsdp.components["optimizer_states"] == 8 * n_trainable / 8
    assert "ddp_gradient_buckets" not in fsdp.components and fsdp.components["fsdp_gathered"] > 0
    # every block's expert share is 1/ep of what plain FSDP gathers
    plain = estimate(shape, Layout("fsdp", SHARDED_PRECISIONS["bf16"], world_size=8), work)
    assert fsdp.components["fsdp_gathered"] <= plain.components["fsdp_gathered"]


def _tracked_peak(cfg: AudioLMConfig, batch_rows: int, seq: int) -> tuple[int, float, AudioLM]:
    """Peak of live tensors over two real training steps, from PyTorch's MemTracker (the reference)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from unimoe.bench.plan import _batch
    from unimoe.training.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    batch = _batch(cfg, batch_rows * seq, seq)
    model = AudioLM(cfg).train()
    opt, _ = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1e-4), total_steps=10)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    active = []
    with tracker:
        for step in range(2):
            out = model(batch, logits="none")
            loss = out.loss + (cfg.moe.aux_loss(out.routing, step) if cfg.moe is not None else 0.0)
            active.append(float(out.aux.mean_active_real))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()
    peak = max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    return peak, sum(active) / len(active), model


@pytest.mark.parametrize("preset, ac", [("tiny", False), ("tiny-moe", False), ("tiny-moe", True)])
def test_estimate_matches_measured_live_tensor_peak(preset, ac):
    cfg = AudioLMConfig.from_preset(preset, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256,
                                    num_codebooks=4, codebook_size=256, vision=None, gradient_checkpointing=ac)
    peak, k, model = _tracked_peak(cfg, batch_rows=2, seq=512)
    shape = model_shape(model, [n for n, _ in model.named_parameters()])
    layout = Layout("single", TRAINER_PRECISIONS["32-true"], activation_checkpointing=ac, gpu=False)
    est = estimate(shape, layout, Workload(tokens=1024, active_experts=k)).peak
    assert abs(est / peak - 1) < 0.05, (est, peak)


# ---------------------------------------------------------------------- recipes
def test_paper_joint_fits_as_shipped_and_would_not_under_ddp(capsys):
    shipped = _plan(capsys, "--config", str(PAPER), "--stage", "joint")
    assert shipped["fits"] is True and shipped["strategy"]["expert_parallel_size"] == 4
    assert shipped["strategy"]["data_parallel_size"] == 2 and shipped["nodes"] == 1
    ddp = _plan(capsys, "--config", str(PAPER), "--stage", "joint", "--strategy", "ddp")
    assert ddp["fits"] is False and ddp["per_device_gb"] > 80 and ddp["strategy"]["kind"] == "ddp"
    assert ddp["model"]["moe"] and ddp["model"]["trainable_params"] == ddp["model"]["total_params"]
    # ~16 bytes per parameter before activations (fp32 weights, grads, 2 AdamW moments) + DDP's buckets
    static = sum(ddp["components_gb"][k] for k in ("parameters", "gradients", "optimizer_states"))
    assert static == pytest.approx(16 * ddp["model"]["total_params"] / 2**30, rel=0.01)
    strategy = yaml.safe_dump({"class_path": MOE_PARALLEL, "init_args": {"expert_parallel_size": 4,
                                                                        "activation_checkpointing": True}})
    ep = _plan(capsys, "--config", str(PAPER), "--stage", "joint", "--strategy", strategy, "--videos", "0",
               "--gpus", "32")
    assert ep["fits"] is True and ep["strategy"]["data_parallel_size"] == 8 and ep["nodes"] == 4
    assert ep["per_device_gb"] < ep["per_device_gb_without_checkpointing"]
    assert ep["components_gb"]["parameters"] == pytest.approx(4 * ep["model"]["total_params"] / 32 / 2**30, rel=1e-3)


@pytest.mark.parametrize("stage", ["specialist_tts_zh", "specialist_tts_en", "specialist_t2m", "specialist_v2m",
                                   "warmup"])
def test_every_paper_stage_fits_one_node_as_shipped(capsys, stage):
    plan = _plan(capsys, "--config", str(PAPER), "--stage", stage)
    assert plan["fits"] is True and plan["nodes"] == 1 and plan["strategy"]["name"] == "MoEParallelStrategy"


def test_warmup_trains_only_routers_and_shared_experts(capsys):
    warm = _plan(capsys, "--config", str(PAPER), "--stage", "warmup", "--videos", "0")
    model = _paper_moe()
    expected = sum(p.numel() for n, p in model.named_parameters() if ".ffn.router." in n or ".ffn.shared_experts." in n)
    assert warm["model"]["trainable_params"] == expected and warm["stage_class"] == "WarmupStage"
    assert warm["model"]["total_params"] == sum(p.numel() for p in model.parameters())


def _paper_moe():
    """The paper curriculum's MoE built independently of the recipe reader: the ``paper`` preset, which
    tests/test_recipes.py checks is exactly the upcycle of the paper specialists."""
    from unimoe.model.transformer import meta_model

    return meta_model(AudioLMConfig.from_preset("paper"))


def test_specialist_stage_and_demo_recipes(capsys):
    spec = _plan(capsys, "--config", str(PAPER), "--stage", "specialist_tts_en", "--videos", "0")
    assert not spec["model"]["moe"] and spec["world_size"] == 8 and spec["activation_checkpointing"] is True
    demo = _plan(capsys, "--config", str(ROOT / "recipes" / "demo" / "curriculum.yaml"), "--stage", "specialist_tts",
                 "--gpus", "1", "--gpu-memory", "24GB")
    assert demo["fits"] is True and demo["strategy"]["kind"] == "single" and demo["device_memory_gb"] == 24
    joint = _plan(capsys, "--config", str(ROOT / "recipes" / "joint.yaml"), "--model", "tiny-moe")
    assert joint["model"]["source"] == "--model" and joint["workload"]["max_tokens"] == 4096


def test_model_from_an_init_from_checkpoint(tmp_path, capsys):
    from unimoe.checkpoint import CheckpointMetadata, save_model_checkpoint

    cfg = AudioLMConfig.from_preset("tiny-moe")
    save_model_checkpoint(tmp_path / "warm.ckpt", AudioLM(cfg), CheckpointMetadata(config=cfg, stage="warmup"))
    recipe = {"model": {"class_path": "JointStage", "init_args": {"init_from": str(tmp_path / "warm.ckpt")}},
              "data": {"init_args": {"max_tokens": 2048}}, "trainer": {"devices": 2, "strategy": "ddp"}}
    (tmp_path / "joint.yaml").write_text(yaml.safe_dump(recipe))
    report = _plan(capsys, "--config", str(tmp_path / "joint.yaml"))
    assert report["model"]["source"].startswith("init_from checkpoint")
    assert report["model"]["total_params"] == AudioLM(cfg).num_parameters()
    assert report["workload"]["max_tokens"] == 2048 and report["world_size"] == 2


def test_videos_come_from_the_shard_index(tmp_path):
    from unimoe.data.index import IndexWriter, SCHEMA

    writer = IndexWriter()
    for i, (frames, vf) in enumerate([(200, 8), (120, 4), (300, 0)]):
        writer.add({**{k: 0 for k in SCHEMA}, "id": f"x{i}", "task": "v2m" if vf else "t2m", "split": "train",
                    "speaker": None, "text": "t", "prompt_text": None, "frames": frames, "video_frames": vf,
                    "video_size": [32, 32] if vf else None, "duration": 1.0})
    writer.write(tmp_path / "shards", {"codec": {}, "config": {}, "manifest": "m", "shards": [], "skipped": {}})
    recipe = {"model": {"class_path": "SpecialistStage", "init_args": {"model": "tiny"}},
              "data": {"init_args": {"max_tokens": 1000, "sources": {"v": str(tmp_path / "shards")}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(recipe))
    inputs, _ = plan_inputs(load_stage(tmp_path / "s.yaml"))
    # tiny ViT: patch 8, temporal 2, merge 2 -> 4 frames of 32x32 = 2 x 16 patches, 8 tokens; the shortest
    # v2m sequence is 120 frames + 8 tokens, so 1000 // 128 = 7 videos; the largest video has 4 x 16 patches
    assert (inputs.workload.videos, inputs.workload.patches_per_video) == (7, 64)


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 and parse_memory("81920MiB") == 80
    assert parse_memory("141") == 141
    with pytest.raises(PlanError, match="expected a size"):
        parse_memory("lots")


# ---------------------------------------------------------------------- bad input
def test_bad_input_names_the_field_and_numbers(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "bad.yaml: not valid YAML" in _error(capsys, "--config", str(bad))
    assert "is a curriculum: choose a stage with --stage" in _error(capsys, "--config", str(PAPER))

    def strategy(**args):
        return yaml.safe_dump({"class_path": MOE_PARALLEL, "init_args": args})

    err = _error(capsys, "--config", str(PAPER), "--stage", "joint", "--gpus", "6", "--strategy", strategy(expert_parallel_size=3))
    assert "MoEConfig.num_routed_experts=8 is not divisible by --strategy.init_args.expert_parallel_size=3" in err
    err = _error(capsys, "--config", str(PAPER), "--stage", "joint", "--gpus", "12", "--strategy",
                 strategy(expert_parallel_size=8))
    assert "expert_parallel_size=8 does not divide the world size 12" in err
    err = _error(capsys, "--config", str(PAPER), "--stage", "joint", "--gpus", "16", "--strategy",
                 strategy(expert_parallel_size=4, data_parallel_size=2))
    assert "data_parallel_size=2 x expert_parallel_size=4 = 8, but the world size is 16" in err
    err = _error(capsys, "--config", str(PAPER), "--stage", "joint", "--strategy", strategy(expert_paralel_size=2))
    assert "unknown init arg 'expert_paralel_size' (did you mean 'expert_parallel_size'?)" in err
    err = _error(capsys, "--config", str(PAPER), "--stage", "specialist_t2m", "--strategy", strategy(expert_parallel_size=2))
    assert "needs an MoE model, but this stage's model is dense" in err
    assert "unknown --strategy 'deepspeed_stage_3'" in _error(capsys, "--config", str(PAPER), "--stage", "joint",
                                                            "--strategy", "deepspeed_stage_3")
    assert "unknown --strategy class 'my.Strategy'" in _error(capsys, "--config", str(PAPER), "--stage", "joint",
                                                            "--strategy", "{class_path: my.Strategy}")
    err = _error(capsys, "--config", str(ROOT / "recipes" / "joint.yaml"))  # init_from runs/demo/warmup/... not there
    assert "init_from" in err and "--model" in err and "--stage" in err
    recipe = {"model": {"class_path": "JointStage", "init_args": {"model": "tiny"}}}
    (tmp_path / "dense_joint.yaml").write_text(yaml.safe_dump(recipe))
    assert "JointStage trains an MoE model, but the model is dense" in _error(capsys, "--config", str(tmp_path / "dense_joint.yaml"))
    recipe = {"model": {"class_path": "SpecialistStage", "init_args": {"model": "tiny"}}, "trainer": {"devices": "auto"}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))
    assert "trainer.devices is 'auto'" in _error(capsys, "--config", str(tmp_path / "auto.yaml"))


def test_bench_plan_case_runs_and_agrees():
    from unimoe.bench.plan import measure

    case = {"name": "t", "preset": "tiny-moe", "layers": 1, "hidden": 64, "ffn": 128, "tokens": 512, "seq_len": 256,
            "codebooks": 1}
    row = measure(case, steps=2, mode="tensors")
    assert row["batch"] == [2, 256] and row["mean_active_experts"] > 0 and row["measured_breakdown_mb"]
    assert abs(row["error"]) < 0.1
