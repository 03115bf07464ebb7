"""MoEParallelStrategy on real CPU processes (gloo) against the single-process run of the same training.

``tests/helpers/parallel_fit.py`` trains a tiny JointStage for a few AdamW steps on fixed
batches; the sharded runs split each step's global batch over the ranks, the reference
(one process, today's path, no strategy) trains on the whole global batch. After every
step the mean of the ranks' losses, the global load-balance loss and the routing of every
token must equal the reference's, and so must the full (gathered) parameters at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).parent / "helpers"
NUM_LAYERS = 2


def fit(out: Path, world: int, ep: int = 1, steps: int = 3, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HELPERS / "parallel_fit.py"), "--out", str(out), "--world", str(world), "--ep", str(ep),
           "--steps", str(steps), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = 1 if world == 1 else world
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process runs on the global batches of 2 and of 4 ranks (2 rows per rank)."""
    base = tmp_path_factory.mktemp("reference")
    return {2: fit(base / "world2", 1, 1, 3, "--global_rows", "4", "--accumulate", "2")[0],  # 2 micro-batches / step
            4: fit(base / "world4", 1, 1, 3, "--global_rows", "8")[0]}


def assert_same_training(ranks: list[dict], ref: dict, check_routing: bool = True) -> None:
    steps = len(ref["loss"])  # micro-batches
    world = len(ranks)
    mean_loss = [sum(r["loss"][s] for r in ranks) / world for s in range(steps)]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-6)
    for r in ranks:  # the balance loss is the global batch's on every rank: the reference's value
        torch.testing.assert_close(torch.tensor(r["load_balance"]), torch.tensor(ref["load_balance"]), rtol=1e-5, atol=1e-6)
    params = ranks[0]["params"]
    assert set(params) == set(ref["params"])
    for name, value in ref["params"].items():
        torch.testing.assert_close(params[name], value, rtol=1e-4, atol=5e-5, msg=name)
    if check_routing:  # every token reached the same experts, at every step and layer
        for i, expected in enumerate(ref["selected"]):
            got = torch.cat([r["selected"][i] for r in ranks])
            assert torch.equal(got, expected), f"routing differs at micro-batch {i // NUM_LAYERS}, layer {i % NUM_LAYERS}"


def test_bf16_mixed_precision_keeps_the_router_fp32(tmp_path, references):
    ranks = fit(tmp_path / "bf16", 2, 1, 3, "--mixed_precision", "bf16", "--global_rows", "8")
    for r in ranks:
        assert r["dtypes"] == {("router", torch.float32), ("attention", torch.bfloat16)}
        assert all(torch.isfinite(torch.tensor(r["loss"])))
    mean_loss = [sum(r["loss"][s] for r in ranks) / 2 for s in range(3)]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(references[4]["loss"]), rtol=2e-2, atol=0)
    assert all(v.dtype == torch.float32 for v in ranks[0]["params"].values())  # fp32 master weights


def test_expert_parallel_2_ranks_with_accumulation_equals_single_process(tmp_path, references):
    ranks = fit(tmp_path / "ep2", 2, 2, 3, "--accumulate", "2")
    assert len(ranks[0]["loss"]) == 6  # 3 optimizer steps of 2 micro-batches
    assert_same_training(ranks, references[2])
    assert ranks[0]["loss"] != ranks[1]["loss"]  # the ranks really trained on different rows


def test_fsdp_x_expert_parallel_2x2_equals_single_process(tmp_path, references):
    assert_same_training(fit(tmp_path / "2x2", 4, 2), references[4])


@pytest.mark.slow
def test_activation_checkpointing_and_clipping_2x2_equal_single_process(tmp_path, references, tmp_path_factory):
    ref = fit(tmp_path / "ref", 1, 1, 3, "--global_rows", "8", "--clip", "0.05")[0]
    unclipped = references[4]["params"]
    assert any(not torch.allclose(ref["params"][k], unclipped[k], atol=1e-4) for k in unclipped)  # clipping bit
    ranks = fit(tmp_path / "ac", 4, 2, 3, "--activation_checkpointing", "--clip", "0.05")
    assert_same_training(ranks, ref, check_routing=False)  # recomputation routes twice per step


@pytest.mark.slow
def test_bad_layouts_fail_on_every_rank_without_hanging(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    # 6 routed experts cannot be split over 4 EP ranks: all 4 launched ranks refuse before any process group exists
    proc = subprocess.run([sys.executable, str(HELPERS / "parallel_fit.py"), "--out", str(tmp_path), "--world", "4",
                           "--ep", "4", "--routed", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "MoEConfig.num_routed_experts=6 is not divisible by MoEParallelStrategy.expert_parallel_size=4" in proc.stderr
    assert "Initializing distributed" not in proc.stderr + proc.stdout
