"""Upcycling dense specialists into the MoE: exactness, averaging, vision source, width rule, CLI."""

import copy

import pytest
import torch
import torch.nn.functional as F

from unimoe.checkpoint import CheckpointMetadata, load_model, save_model
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import collate
from unimoe.model.transformer import AudioLM
from unimoe.moe.config import MoEConfig
from unimoe.training.upcycle import Specialist, UpcycleError, check_upcycle_layout, upcycle

DENSE = AudioLMConfig.from_preset("tiny")  # intermediate 128, 2 layers, with a vision encoder
TASKS = ["tts", "t2m", "v2m"]


def moe_config(pieces: int = 2, n: int = 3, top_p: float = 0.7) -> MoEConfig:
    return MoEConfig(num_routed_experts=n * pieces, routed_intermediate_size=DENSE.intermediate_size // pieces,
                     num_null_experts=1, num_shared_experts=1, shared_intermediate_size=32,
                     router={"name": "top_p", "top_p": top_p, "jitter": 0.0})


def specialists(seeds=(1, 2, 3)) -> list[Specialist]:
    out = []
    for seed, task in zip(seeds, TASKS):
        torch.manual_seed(seed)
        model = AudioLM(DENSE)
        meta = CheckpointMetadata(config=DENSE, codec={"name": "spectral_rvq", "path": "c.pt"}, stage="specialist",
                                  extra={"data_tasks": [task], "label": task})
        out.append(Specialist(state=model.state_dict(), metadata=meta, name=task))
    return out


def dense_swiglu(x, state, layer):
    """Independent reference: down @ (silu(W_gate x) * (W_up x)) from the specialist's raw tensors."""
    gate_up = state[f"blocks.{layer}.ffn.gate_up_proj"]  # [2, F, D]
    down = state[f"blocks.{layer}.ffn.down_proj"]  # [D, F]
    return (F.silu(x @ gate_up[0].T) * (x @ gate_up[1].T)) @ down.T


def force_specialist(layer_module, specialist: int, pieces: int) -> None:
    """Router logits: 0 for the chosen specialist's pieces, -1e9 for every other dynamic and shared expert."""
    router = layer_module.router
    e, s = router.num_experts, router.num_shared

    def logits(x):
        out = torch.full((x.shape[0], e + s), -1e9)
        out[:, specialist * pieces:(specialist + 1) * pieces] = 0.0
        return out

    router.compute_logits = logits


@pytest.mark.parametrize("pieces,top_p", [(2, 0.7), (4, 0.9)])
def test_forced_routing_reproduces_each_specialist_ffn(pieces, top_p):
    specs = specialists()
    result = upcycle(specs, moe_config(pieces, top_p=top_p), pieces=pieces)
    model = result.model.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 7, DENSE.hidden_size)
    for layer in range(DENSE.num_layers):
        moe = model.blocks[layer].ffn
        for s, spec in enumerate(specs):
            force_specialist(moe, s, pieces)
            y, info = moe(x)
            assert info.active_real_hist[pieces] == x.shape[0] * x.shape[1]  # every token used exactly k real experts
            expected = dense_swiglu(x, spec.state, layer)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_without_scaling_the_routed_output_is_dense_over_k():
    specs = specialists()
    model = upcycle(specs, moe_config(2), pieces=2, expert_scale=1.0).model.eval()
    x = torch.randn(1, 5, DENSE.hidden_size)
    moe = model.blocks[0].ffn
    force_specialist(moe, 1, 2)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense_swiglu(x, specs[1].state, 0) / 2, rtol=1e-5, atol=1e-6)


def test_identical_specialists_give_the_dense_model_end_to_end():
    torch.manual_seed(5)
    dense = AudioLM(DENSE).eval()
    state = dense.state_dict()
    specs = [Specialist(copy.deepcopy(state), CheckpointMetadata(config=DENSE, extra={"data_tasks": [t]}), t) for t in TASKS]
    model = upcycle(specs, moe_config(2), pieces=2).model.eval()
    for block in model.blocks:
        force_specialist(block.ffn, 2, 2)
    from unimoe.model.tasks import build_task_builder

    builder = build_task_builder("t2m", DENSE)
    seq = builder.build(torch.randint(0, DENSE.codebook_size, (DENSE.num_codebooks, 9)), drop_condition=False,
                        text="a calm piece")
    batch = collate([seq])
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, dense(batch).logits, rtol=1e-4, atol=1e-5)


def test_shared_parts_are_averaged_and_vision_comes_from_the_video_specialist():
    specs = specialists()
    state = upcycle(specs, moe_config(2), pieces=2).model.state_dict()
    for key in ("text_embed.weight", "audio_embed.weight", "blocks.1.attn.q_proj.weight", "blocks.0.attn.k_proj.bias",
                "blocks.0.attn_norm.weight", "norm.weight", "audio_head.weight"):
        expected = (specs[0].state[key] + specs[1].state[key] + specs[2].state[key]) / 3
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-7)
    vision = [k for k in state if k.startswith("vision.")]
    assert vision
    for key in vision:
        assert torch.equal(state[key], specs[2].state[key]), key  # the v2m specialist, bit for bit
    # routed expert s*k + j is piece j of specialist s, gate and up rows together
    gate_up = state["blocks.0.ffn.experts.0.gate_up_proj"]  # [6, 2, 64, D]
    torch.testing.assert_close(gate_up[3], specs[1].state["blocks.0.ffn.gate_up_proj"][:, 64:128])


def test_grouped_router_init_gives_one_gate_row_per_specialist():
    result = upcycle(specialists(), moe_config(2), pieces=2, router_init="grouped")
    gate = result.model.blocks[0].ffn.router.gate.weight  # [6 routed + 1 null + 1 shared, D]
    for s in range(3):
        assert torch.equal(gate[2 * s], gate[2 * s + 1])
    assert not torch.equal(gate[0], gate[2])
    assert result.expert_labels == ["tts.0", "tts.1", "t2m.0", "t2m.1", "v2m.0", "v2m.1"]
    assert result.metadata.extra["upcycle"]["vision_from"] == "v2m"


def test_width_rule_errors_name_the_field():
    with pytest.raises(UpcycleError, match=r"moe.routed_intermediate_size must be .* 128 / 2 = 64, got 32"):
        check_upcycle_layout(DENSE, moe_config(4).__class__(num_routed_experts=6, routed_intermediate_size=32), 3, 2)
    with pytest.raises(UpcycleError, match=r"moe.num_routed_experts must be .* 3 x 2 = 6, got 8"):
        check_upcycle_layout(DENSE, MoEConfig(num_routed_experts=8, routed_intermediate_size=64), 3, 2)
    # the paper's numbers: specialists of 11008 cannot become 8 experts of 2752 with 2 pieces
    paper_dense, paper_moe = AudioLMConfig.from_preset("paper-dense"), AudioLMConfig.from_preset("paper").moe
    with pytest.raises(UpcycleError, match="11008 / 2 = 5504, got 2752"):
        check_upcycle_layout(paper_dense, paper_moe, 4, 2)
    check_upcycle_layout(paper_dense.replace(intermediate_size=5504), paper_moe, 4, 2)  # recipes/paper's choice
    with pytest.raises(UpcycleError, match="cannot be split"):
        check_upcycle_layout(DENSE, MoEConfig(num_routed_experts=9, routed_intermediate_size=42), 3, 3)


def test_mismatched_specialists_are_refused():
    specs = specialists()
    other = DENSE.replace(num_layers=3)
    specs[1] = Specialist(AudioLM(other).state_dict(), CheckpointMetadata(config=other), "odd")
    with pytest.raises(UpcycleError, match="another architecture.*num_layers"):
        upcycle(specs, moe_config(2), pieces=2)
    specs = specialists()
    specs[2].metadata.codec = {"name": "encodec"}
    with pytest.raises(UpcycleError, match="different codecs"):
        upcycle(specs, moe_config(2), pieces=2)


@pytest.mark.parametrize("suffix", [".ckpt", ""])  # .ckpt files, or model folders in and out
def test_upcycle_command_writes_a_checkpoint_the_warmup_stage_reads(tmp_path, capsys, suffix):
    from unimoe.commands.upcycle import main
    from unimoe.training.stages import WarmupStage

    paths = []
    for spec in specialists():
        model = AudioLM(DENSE)
        model.load_state_dict(spec.state)
        paths.append(str(save_model(tmp_path / f"{spec.name}{suffix}", model, spec.metadata)))
    out = tmp_path / f"up{suffix}"
    args = ["--specialists", *paths, "--out", str(out), "--moe.num_routed_experts", "6",
            "--moe.routed_intermediate_size", "64", "--moe.num_shared_experts", "1", "--moe.shared_intermediate_size", "32"]
    assert main(args) == 0
    assert out.is_dir() == (suffix == "")
    model, meta = load_model(out)
    assert meta.stage == "upcycle" and meta.config.moe.num_routed_experts == 6 and meta.codec == {"name": "spectral_rvq", "path": "c.pt"}
    assert meta.extra["expert_labels"][:2] == ["tts.0", "tts.1"]
    assert main(args) == 1 and "exists" in capsys.readouterr().err  # never overwritten silently
    stage = WarmupStage(init_from=str(out))
    assert stage.expert_labels == meta.extra["expert_labels"] and stage.codec_spec == meta.codec
    for key, value in model.state_dict().items():
        assert torch.equal(stage.model.state_dict()[key], value), key
