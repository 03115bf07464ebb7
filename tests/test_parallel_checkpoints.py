"""Sharded checkpoints of `unimoe fit` under MoEParallelStrategy, on the tiny real shards.

A checkpoint written at one world size / expert-parallel size resumes at another with the
same weights, optimizer state and data position: rank 0's next-step loss equals the
uninterrupted run's (rank 0's first batch after the resume is the same batch at every world
size: ranks take the epoch's batches round robin). Consolidation gives the one file that
generation reads; a killed rank's stage resumes through `unimoe curriculum`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training_helpers import parallel_stage, recorded_losses, tiny_data  # noqa: E402  (tests/helpers)

from unimoe.checkpoint import load_model
from unimoe.training.stages import JointStage

HELPERS = Path(__file__).parent / "helpers"


def unimoe(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("UNIMOE_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "unimoe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fit(work: Path, name: str, config: dict, *extra: str) -> subprocess.CompletedProcess:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = unimoe("fit", "--config", str(path), *extra, cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, data):
    """3 uninterrupted steps on 2 ranks with expert parallelism 2 (checkpoints kept at every step)."""
    work = tmp_path_factory.mktemp("ep2")
    fit(work, "u", parallel_stage(data, work / "u", world=2, ep=2, steps=3, every=1))
    return work


def test_sharded_checkpoint_resumes_on_one_process_at_the_same_next_step_loss(ep2_run, data):
    work = ep2_run
    step2 = work / "u" / "checkpoints" / "step=2.ckpt"
    assert (step2 / "meta.pt").is_file() and len(list(step2.glob("*.distcp"))) == 2  # one shard per rank
    proc = fit(work, "r1", parallel_stage(data, work / "r1", world=1, ep=1, steps=3), "--ckpt_path", str(step2))
    assert "written with 2 ranks, this run has 1" in proc.stderr  # the data position was converted, not restarted
    uninterrupted, resumed = recorded_losses(work / "u"), recorded_losses(work / "r1")
    assert list(resumed) == [3]
    assert resumed[3] == pytest.approx(uninterrupted[3], rel=1e-5, abs=1e-6)


def test_consolidated_checkpoint_generates(ep2_run):
    work = ep2_run
    sharded = work / "u" / "checkpoints" / "step=2.ckpt"  # a resume checkpoint: a sharded folder
    proc = unimoe("checkpoint", "info", str(sharded), "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "sharded" and info["global_step"] == 2 and info["optimizer_state"] is True
    proc = unimoe("checkpoint", "consolidate", str(sharded), "--out", str(work / "joint.ckpt"), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert unimoe("checkpoint", "consolidate", str(sharded), "--out", str(work / "joint.ckpt"), cwd=work).returncode == 2
    proc = unimoe("export", str(sharded), str(work / "joint-model"), cwd=work)  # the pickle-free model folder
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_file, meta = load_model(work / "joint.ckpt")
    from_folder, _ = load_model(sharded)  # generation, evaluation, upcycle and init_from read sharded folders too
    exported, _ = load_model(work / "joint-model")
    next_stage = JointStage(init_from=str(sharded))  # init_from straight from the sharded folder
    assert meta.stage == "joint" and meta.config.moe.num_routed_experts == 4
    assert next_stage.lineage["init_from"]["stage"] == "joint"
    for (name, a), (_, b), (_, c) in zip(from_file.state_dict().items(), from_folder.state_dict().items(),
                                         next_stage.model.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, exported.state_dict()[name]), name
    # the stage's final model (step 3) is gathered from the shards into a model folder at the end of fit
    final = work / "u" / "final"
    assert (final / "model.safetensors").is_file() and not list((work / "u").glob(".final*"))
    final_model, final_meta = load_model(final)
    assert final_meta.stage == "joint" and final_model.state_dict().keys() == from_file.state_dict().keys()
    for path in (work / "joint.ckpt", final):
        proc = unimoe("generate", "--ckpt", str(path), "--task", "t2m", "--text", "calm piano",
                      "--max-seconds", "1", "--out", str(work / "gen" / path.name), cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        clip = json.loads((work / "gen" / path.name / "generated.jsonl").read_text().splitlines()[0])
        assert (work / "gen" / path.name / Path(clip["audio"]).name).is_file()


@pytest.mark.slow
def test_world_4_ep_2_resumes_at_world_2_ep_1_and_at_world_1(tmp_path, data):
    fit(tmp_path, "u", parallel_stage(data, tmp_path / "u", world=4, ep=2, steps=3))
    step2 = tmp_path / "u" / "checkpoints" / "step=2.ckpt"
    uninterrupted = recorded_losses(tmp_path / "u")
    for world in (2, 1):
        fit(tmp_path, f"r{world}", parallel_stage(data, tmp_path / f"r{world}", world=world, ep=1, steps=3),
            "--ckpt_path", str(step2))
        assert recorded_losses(tmp_path / f"r{world}")[3] == pytest.approx(uninterrupted[3], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_another_layout_is_refused_on_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(HELPERS / "parallel_fit.py"), "--world", "2", "--ep", "2", "--steps", "1"]
    folder = tmp_path / "four_experts.ckpt"
    proc = subprocess.run([*script, "--out", str(tmp_path / "a"), "--save", str(folder)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([*script, "--out", str(tmp_path / "b"), "--routed", "8", "--steps", "2", "--resume", str(folder)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "was written for another model layout" in proc.stderr
    assert "model.blocks.0.ffn.experts.0.gate_up_proj: checkpoint (4, 2, 32, 32) vs model (8, 2, 32, 32)" in proc.stderr


@pytest.mark.slow
def test_a_killed_rank_resumes_through_the_curriculum(tmp_path, data):
    marker = tmp_path / "killed.json"
    stage = parallel_stage(data, tmp_path / "unused", world=2, ep=2, steps=6, validate=True, callbacks=[
        {"class_path": "ExpertLoadMonitor", "init_args": {"log_every_n_steps": 2}},
        {"class_path": "AudioSamples", "init_args": {"per_task": 1, "settings": {"max_seconds": 0.5}}},
        {"class_path": "training_helpers.KillOnce", "init_args": {"at_step": 3, "marker": str(marker), "rank": 1}}])
    trainer = {k: v for k, v in stage["trainer"].items() if k not in ("default_root_dir", "callbacks")}
    trainer["callbacks"] = stage["trainer"]["callbacks"][1:]  # the curriculum adds its own ModelCheckpoint
    trainer["callbacks"][0]["init_args"]["path"] = str(tmp_path / "losses.jsonl")
    curriculum = tmp_path / "cur.yaml"
    curriculum.write_text(yaml.safe_dump({
        "name": "ep", "root": str(tmp_path / "runs"), "launcher": "subprocess", "checkpoint_every_n_steps": 2,
        "stages": [{"name": "joint", "model": stage["model"], "data": stage["data"], "trainer": trainer}]}))
    first = unimoe("curriculum", "--config", str(curriculum), cwd=tmp_path)
    assert first.returncode != 0 and json.loads(marker.read_text())["killed_at_step"] >= 3
    last = tmp_path / "runs" / "joint" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last / "meta.pt", weights_only=True)["global_step"]
    second = unimoe("curriculum", "--config", str(curriculum), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resuming at step {saved_step}/6" in second.stderr
    done = json.loads((tmp_path / "runs" / "joint" / "DONE.json").read_text())
    assert done["global_step"] == 6 and done["resumed_from"]["step"] == saved_step
    model, meta = load_model(tmp_path / "runs" / "joint" / "final")
    assert meta.stage == "joint" and all(torch.isfinite(p).all() for p in model.parameters())
    run = tmp_path / "runs" / "joint"
    # under the strategy, validation ran on both ranks, routing counts were summed over them, and rank 0
    # generated samples from a gathered copy of the sharded weights
    routing = json.loads((run / "plots" / "routing_val_step0000006.json").read_text())
    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.model.config import AudioLMConfig

    dm = UniMoEDataModule(**{**stage["data"]["init_args"], "model": AudioLMConfig(**stage["data"]["init_args"]["model"])})
    dm.setup("validate")
    real_tokens = sum(int(b.attention_mask.sum()) for b in dm.val_dataloader())
    assert routing["num_tokens"] == [real_tokens] * 2  # both ranks' shares of the split, each layer
    assert len(list((run / "samples" / "step0000006").glob("*.wav"))) == 3  # one per task
