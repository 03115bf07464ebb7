"""MoEConfig from YAML (jsonargparse), clear errors naming the field, dense SwiGLU layout."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from unimoe.moe import MoEConfig, SwiGLU, SwiGLUExperts, TopPRouter, build_moe_layer, split_swiglu
from unimoe.registry import EXPERTS, ROUTERS

YAML = """
moe:
  num_routed_experts: 4
  routed_intermediate_size: 16
  num_null_experts: 2
  num_shared_experts: 1
  shared_intermediate_size: 8
  router:
    class_path: top_p
    init_args: {top_p: 0.5, jitter: 0.0}
  extra_experts:
    - {name: swiglu, num_experts: 2, intermediate_size: 8}
  shared_gating: unweighted
  z_loss_coef: 0.001
  load_balance: {start: 0.03, end: 0.002, steps: 100}
"""


def parse(text: str) -> MoEConfig:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--moe", type=MoEConfig, default=MoEConfig())
    return parser.instantiate(parser.parse_string(text)).moe


def test_yaml_round_trip_builds_the_described_layer():
    cfg = parse(YAML)
    assert cfg.load_balance.weight(50) == pytest.approx(0.016)
    layer = build_moe_layer(8, cfg)
    assert isinstance(layer.router, TopPRouter) and layer.top_p == 0.5 and layer.router.num_shared == 0
    assert [type(g).__name__ for g in layer.experts] == ["SwiGLUExperts", "SwiGLUExperts", "NullExperts"]
    assert [g.num_experts for g in layer.experts] == [4, 2, 2]
    assert layer.experts[1].intermediate_size == 8 and layer.num_real_experts == 6
    y, info = layer(torch.randn(2, 3, 8))
    assert y.shape == (2, 3, 8) and info.tokens_per_expert.shape == (8,)


def test_paper_defaults():
    cfg = MoEConfig()
    assert (cfg.num_routed_experts, cfg.num_null_experts, cfg.num_shared_experts) == (8, 1, 2)
    assert (cfg.routed_intermediate_size, cfg.shared_intermediate_size) == (2752, 1376)
    layer = build_moe_layer(64, MoEConfig(routed_intermediate_size=32, shared_intermediate_size=16))
    assert layer.top_p == 0.7 and layer.router.jitter == 0.01 and layer.router.num_shared == 2
    assert "swiglu" in EXPERTS and "null" in EXPERTS and {"top_p", "top_k"} <= set(ROUTERS.names())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_routed_experts": -1}, "num_routed_experts"),
        ({"num_null_experts": 1.5}, "num_null_experts"),
        ({"routed_intermediate_size": 0}, "routed_intermediate_size"),
        ({"shared_intermediate_size": -4}, "shared_intermediate_size"),
        ({"shared_gating": "softmax"}, "shared_gating"),
        ({"z_loss_coef": -1.0}, "z_loss_coef"),
        ({"grouped_mm": "cutlass"}, "grouped_mm"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"router": "top_q"}, r"MoEConfig.router: unknown router 'top_q'.*top_k.*top_p"),
        ({"router": {"name": "top_p", "topp": 0.5}}, r"MoEConfig.router: .*unknown argument.*topp"),
        ({"router": {"name": "top_p", "top_p": 1.5}}, r"MoEConfig.router: .*top_p must be in \(0, 1\]"),
        ({"router": {"name": "top_k", "top_k": 12}}, r"MoEConfig.router: .*top_k must be in \[1"),
        ({"expert": "nope"}, r"MoEConfig.expert: unknown expert type 'nope'"),
        ({"extra_experts": [{"name": "swiglu"}]}, r"MoEConfig.extra_experts\[0\]: .*num_experts"),
        ({"extra_experts": [{"name": "swiglu", "num_experts": 0}]}, r"MoEConfig.extra_experts\[0\]: .*num_experts"),
    ],
)
def test_bad_component_spec_names_the_field(kwargs, pattern):
    base = dict(num_routed_experts=2, routed_intermediate_size=8, shared_intermediate_size=8)
    with pytest.raises(ValueError, match=pattern):
        build_moe_layer(8, MoEConfig(**{**base, **kwargs}))


def test_yaml_errors_name_the_field():
    with pytest.raises(Exception, match="num_shared_experts"):
        parse("moe: {num_shared_experts: -2}")


def plain_swiglu(x, w_gate, w_up, w_down):
    return (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def test_dense_swiglu_layout_and_upcycling_split():
    """Documented layout: gate_up_proj [2, F, D] (gate, up), down_proj [D, F]; k-way split
    along F gives experts whose outputs sum to the dense output."""
    torch.manual_seed(0)
    dense = SwiGLU(hidden_size=8, intermediate_size=32)
    assert dense.gate_up_proj.shape == (2, 32, 8) and dense.down_proj.shape == (8, 32)
    x = torch.randn(3, 5, 8)
    y, aux = dense(x)
    assert aux is None
    torch.testing.assert_close(y, plain_swiglu(x, dense.gate_up_proj[0], dense.gate_up_proj[1], dense.down_proj))

    pieces = split_swiglu(dense.gate_up_proj.detach(), dense.down_proj.detach(), 4)
    experts = SwiGLUExperts(hidden_size=8, intermediate_size=8, num_experts=4)
    with torch.no_grad():
        for e, (gu, down) in enumerate(pieces):
            experts.gate_up_proj[e] = gu
            experts.down_proj[e] = down
    flat = x.reshape(-1, 8)
    rows = flat.repeat(4, 1)  # every token through every piece, expert-major
    out = experts(rows, torch.full((4,), flat.shape[0])).view(4, -1, 8).sum(0)
    torch.testing.assert_close(out, y.reshape(-1, 8), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pieces"):
        split_swiglu(dense.gate_up_proj, dense.down_proj, 5)
