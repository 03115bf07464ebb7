"""Smoke test of the pretrained-load memory benchmark: its synthetic Qwen2-layout checkpoint is a
valid init_from source (the same tensors land in the model), and the JSON has every field.
Memory itself is never asserted beyond being measured."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from unimoe.bench.load import AUDIO, write_checkpoint
from unimoe.commands.bench import BENCHMARKS, main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_load_json(capsys, tmp_path):
    assert "load" in BENCHMARKS
    assert main(["load", "--json", "--hidden", "64", "--layers", "1", "--intermediate", "128", "--vocab", "256",
                 "--dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint_dtype"] == "bf16" and result["model_mb"] > 0
    for variant in ("streamed", "full"):
        assert set(result[variant]) == {"extra_mb", "x_model", "seconds"}


def test_its_checkpoint_loads_through_init_from(tmp_path):
    from safetensors.torch import load_file

    from unimoe.training.stages import SpecialistStage

    write_checkpoint(tmp_path, Namespace(hidden=64, layers=1, intermediate=128, vocab=256, dtype="fp32"))
    stage = SpecialistStage(model=dict(AUDIO), init_from=str(tmp_path))
    hf = load_file(str(tmp_path / "model.safetensors"))
    ours = stage.model.state_dict()
    assert torch.equal(ours["blocks.0.ffn.gate_up_proj"][1], hf["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(ours["blocks.0.attn.k_proj.bias"], hf["model.layers.0.self_attn.k_proj.bias"])
    assert torch.equal(ours["text_head.weight"], hf["lm_head.weight"])
