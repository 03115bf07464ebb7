"""The example plug-in package installs with pip and plugs in through entry points only.

The package is pip-installed (``--target`` a temporary directory, so the shared venv is
left untouched), then a FRESH interpreter with that directory on its path parses YAML with
jsonargparse, builds an MoE config that uses the plug-in router and expert type, and --
if ``unimoe.model`` is available -- the whole audio LM around it, runs forward/backward and
reports what it built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "unimoe-extra-moe"

MOE_YAML = """
moe:
  num_routed_experts: 4
  routed_intermediate_size: 32
  num_null_experts: 1
  num_shared_experts: 1
  shared_intermediate_size: 16
  router: {class_path: learned_threshold, init_args: {init_threshold: 0.15, temperature: 0.05}}
  extra_experts:
    - {class_path: lowrank, init_args: {num_experts: 3, rank: 8}}
  entropy_loss_coef: 0.01
"""

MODEL_YAML = """
model:
  hidden_size: 64
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  intermediate_size: 128
  max_seq_len: 256
  num_codebooks: 4
  codebook_size: 16
  delays: [0, 1, 2, 3]
  text_vocab_size: 320
  moe_layers: [1]
  moe:
    num_routed_experts: 4
    routed_intermediate_size: 64
    num_null_experts: 1
    num_shared_experts: 1
    shared_intermediate_size: 32
    # the one YAML spelling, also inside AudioLMConfig.moe (an Optional dataclass): the
    # registry, not jsonargparse, resolves these names
    router: {class_path: learned_threshold, init_args: {init_threshold: 0.15}}
    extra_experts:
      - {class_path: lowrank, init_args: {num_experts: 3, rank: 8}}
"""

CHILD = r'''
import json, sys
import torch
from jsonargparse import ArgumentParser
from unimoe.commands.plugins import collect
from unimoe.moe import MoEConfig, RoutingInfo, build_moe_layer

def plugin_parts(layer):
    return {
        "router": f"{type(layer.router).__module__}.{type(layer.router).__name__}",
        "experts": [f"{type(g).__module__}.{type(g).__name__}" for g in layer.experts],
    }

def grads_ok(module, names):
    out = {}
    for name, p in module.named_parameters():
        if any(n in name for n in names):
            out[name] = p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0
    return out

torch.manual_seed(0)
result = {"registered": collect()}
parser = ArgumentParser(exit_on_error=False)
parser.add_argument("--moe", type=MoEConfig)
moe_cfg = parser.instantiate(parser.parse_path(sys.argv[1])).moe
layer = build_moe_layer(32, moe_cfg)
x = torch.randn(2, 9, 32, requires_grad=True)
mask = torch.ones(2, 9, dtype=torch.bool); mask[1, 6:] = False
y, info = layer(x, mask, torch.zeros(2, 9, dtype=torch.long))
loss = y.square().mean() + moe_cfg.aux_loss([info], step=0)
loss.backward()
result["layer"] = {**plugin_parts(layer), "finite": bool(torch.isfinite(y).all()),
                   "grads": grads_ok(layer, ["threshold_logit", "experts.1."]),
                   "tokens_per_expert": info.tokens_per_expert.tolist()}

try:
    from unimoe.model.config import AudioLMConfig
    from unimoe.model.transformer import AudioLM
    model_ok = "moe" in AudioLMConfig.__dataclass_fields__
except ImportError as exc:
    model_ok, result["model_missing"] = False, repr(exc)
if model_ok:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=AudioLMConfig)
    cfg = parser.instantiate(parser.parse_path(sys.argv[2])).model
    model = AudioLM(cfg)
    emb = torch.randn(2, 10, cfg.hidden_size)
    mask = torch.ones(2, 10, dtype=torch.bool); mask[0, 8:] = False
    hidden, routing = model.backbone(emb, token_mask=mask, task_ids=torch.ones(2, 10, dtype=torch.long))
    loss = hidden.square().mean() + cfg.moe.aux_loss(routing, step=0)
    loss.backward()
    moe_blocks = [b.ffn for b in model.blocks if b.is_moe]
    result["model"] = {
        "routing_kinds": [None if r is None else type(r).__name__ for r in routing],
        "moe_layers": [plugin_parts(m) for m in moe_blocks],
        "finite": bool(torch.isfinite(hidden).all()),
        "grads": grads_ok(model, ["threshold_logit", "experts.1."]),
    }
print("RESULT " + json.dumps(result))
'''


def test_plugin_installs_and_builds_from_yaml(tmp_path):
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter, so the plug-in cannot be installed")
    src = tmp_path / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert list(site.glob("unimoe_extra_moe-*.dist-info")), "pip produced no dist-info (entry points)"

    (tmp_path / "moe.yaml").write_text(MOE_YAML)
    (tmp_path / "model.yaml").write_text(MODEL_YAML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "moe.yaml"), str(tmp_path / "model.yaml")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    line = next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])

    assert result["registered"]["routers"]["learned_threshold"] == "unimoe_extra_moe.routers.LearnedThresholdRouter"
    assert result["registered"]["experts"]["lowrank"] == "unimoe_extra_moe.experts.LowRankExperts"
    want_parts = {
        "router": "unimoe_extra_moe.routers.LearnedThresholdRouter",
        "experts": ["unimoe.moe.experts.SwiGLUExperts", "unimoe_extra_moe.experts.LowRankExperts",
                    "unimoe.moe.experts.NullExperts"],
    }
    layer = result["layer"]
    assert {k: layer[k] for k in want_parts} == want_parts
    assert layer["finite"] and len(layer["tokens_per_expert"]) == 8
    assert layer["grads"] and all(layer["grads"].values()), layer["grads"]
    assert {"router.threshold_logit", "experts.1.down_proj", "experts.1.up_proj"} <= set(layer["grads"])

    assert "model" in result, f"unimoe.model unavailable: {result.get('model_missing')}"
    model = result["model"]
    assert model["routing_kinds"] == [None, "RoutingInfo"]
    assert model["moe_layers"] == [want_parts]
    assert model["finite"] and model["grads"] and all(model["grads"].values()), model["grads"]
