"""Importing the authors' released UniMoE-Audio checkpoint (HITsz-TMG/Uni-MoE, UniMoE-Audio/utils).

A synthetic release folder is built here at tiny width with the release's exact key names,
config fields and (for the codec) its exact shapes: 12 codebooks x 1027, delays [0, 8..18],
8 routed + 1 null + 2 shared experts. The reference is the release's forward restated plainly
from ``UniMoE_Audio_model.py`` / ``UniMoE_Audio_core.py`` (placeholder embedding scatter, Qwen2
attention, the iterative sparse-mixer top-p routing with its banded softmax, the global softmax
over selected + shared logits, codec head) -- loops, no unimoe code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unimoe.checkpoint import load_model
from unimoe.model.delay import CodecSpecials
from unimoe.model.tasks import Modality, build_task_builder, collate
from unimoe.pretrained.hub import PretrainedError
from unimoe.release.convert import import_release
from unimoe.release.tasks import ASSISTANT, AUDIO_START, CHAT_TOKENS, SPECIAL_TOKENS, SYSTEM, USER
from unimoe.safetensors_io import stream_safetensors

pytestmark = pytest.mark.usefixtures("single_thread")

RELEASE_DELAYS = [0] + list(range(8, 19))
SPECIALS = ("<|endoftext|>", *CHAT_TOKENS, *SPECIAL_TOKENS)


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE with no merges (one token per byte) plus the release's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def release_config(*, layers=2, hidden=32, channels=12, vocab=1027, delays=RELEASE_DELAYS, text_vocab=320) -> dict:
    k = vocab - 3
    return {
        "architectures": ["UniAudioRVQQwen2_5VLMoEForConditionalGeneration"], "model_type": "uni_audio_rvq_qwen2_5vl_moe",
        "codec_channels": channels, "codec_vocab_size": vocab, "codec_delay_pattern": list(delays),
        "codec_eos_value": k, "codec_pad_value": k + 1, "codec_bos_value": k + 2,
        "codec_placeholder_value": 300, "vocab_size": text_vocab,
        "text_config": {
            "model_type": "qwen2_5_vl_moe_text", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "rope_scaling": {"mrope_section": [2, 1, 1], "rope_type": "default", "type": "default"},
            "max_position_embeddings": 4096, "vocab_size": text_vocab, "use_sliding_window": False,
            "mlp_dynamic_expert_num": 8, "mlp_dynamic_null_expert_num": 1, "mlp_fixed_expert_num": 2,
            "dynamic_intermediate_size": 16, "shared_intermediate_size": 8, "mlp_dynamic_top_p": 0.7,
            "mlp_dynamic_top_k": 0.0, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "token_drop": False,
            "fp32_gate": True, "ignore_differentiable_router": True, "l_aux_weight": 0.025,
            "min_l_aux_weight": 0.001, "l_aux_weight_decay_steps": 10000,
        },
        "vision_config": {"depth": 1, "hidden_size": 8},
    }


def release_state(cfg: dict, seed: int = 0, prefix: str = "language_model.") -> dict[str, torch.Tensor]:
    """Random tensors under the release's key names (norm scales near 1, some gate rows near-tied)."""
    g = torch.Generator().manual_seed(seed)
    t = cfg["text_config"]
    D, H, KV = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    hd = D // H
    E, S, F_, Fs = t["mlp_dynamic_expert_num"], t["mlp_fixed_expert_num"], t["dynamic_intermediate_size"], t["shared_intermediate_size"]
    N = t["mlp_dynamic_null_expert_num"]
    C, V = cfg["codec_channels"], cfg["codec_vocab_size"]

    def r(*shape, scale=0.15):
        return scale * torch.randn(shape, generator=g)

    sd = {prefix + "embed_tokens.weight": r(t["vocab_size"], D, scale=0.5), prefix + "norm.weight": 1 + r(D, scale=0.1),
          "lm_head.weight": r(t["vocab_size"], D), "codec_head.weight": r(C * V, D, scale=0.3),
          "visual.patch_embed.proj.weight": r(8, 3), "visual.blocks.0.attn.qkv.weight": r(24, 8)}
    for k in range(C):
        sd[f"codec_embed_tokens.{k}.weight"] = r(V, D, scale=0.3)
    for i in range(t["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(D, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(D, scale=0.1)
        for name, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
            sd[p + f"self_attn.{name}_proj.weight"] = r(rows, D, scale=0.3)
            sd[p + f"self_attn.{name}_proj.bias"] = r(rows, scale=0.1)
        sd[p + "self_attn.o_proj.weight"] = r(D, H * hd, scale=0.3)
        gate = r(E + N + S, D, scale=0.6)
        gate[1] = gate[0] * 1.004  # experts 0 and 1 nearly tie: the release's banded softmax splits their weight
        sd[p + "mlp.gate.weight"] = gate
        for e in range(E):
            x = p + f"mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}."
            sd[x + "gate_proj.weight"], sd[x + "up_proj.weight"] = r(F_, D, scale=0.4), r(F_, D, scale=0.4)
            sd[x + "down_proj.weight"] = r(D, F_, scale=0.4)
        for s in range(S):
            x = p + f"mlp.fixed_real_moe.{s}."
            sd[x + "gate_proj.weight"], sd[x + "up_proj.weight"] = r(Fs, D, scale=0.4), r(Fs, D, scale=0.4)
            sd[x + "down_proj.weight"] = r(D, Fs, scale=0.4)
    return sd


def write_release(folder: Path, cfg: dict, sd: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """config.json + model-0000x-of-0000n.safetensors + model.safetensors.index.json + tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        stream_safetensors(folder / name, part, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)
    return folder


# ---------------------------------------------------------------------- the release's forward, restated
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def sparse_mixer(scores, top_k, eps):
    """``audio_sparse_expert_mixer`` at inference: iterative argmax, banded softmax multiplier."""
    masked = scores.clone()
    mult, sel = [], []
    for _ in range(top_k):
        threshold, idx = masked.max(-1)
        factor = torch.maximum(scores.abs(), threshold.abs())
        far = ((threshold - scores) / factor) > 2 * eps
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), -1)
        mult.append(gates[idx])
        sel.append(int(idx))
        masked[idx] = float("-inf")
    return mult, sel


def release_moe(x, sd, p, t):
    """``UniMoEAudioSparseMoeBlock.forward`` in eval mode, token by token."""
    E = t["mlp_dynamic_expert_num"] + t["mlp_dynamic_null_expert_num"]
    R, S = t["mlp_dynamic_expert_num"], t["mlp_fixed_expert_num"]
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = sd[p + "mlp.gate.weight"] @ x[n]  # [E + S]
        dyn = logits[:E]
        cum = torch.sort(torch.softmax(dyn, -1), descending=True).values.cumsum(-1)
        k = int((~(cum >= t["mlp_dynamic_top_p"])).sum()) + 1
        mult, sel = sparse_mixer(dyn, k, t["router_jitter_noise"])
        w = torch.zeros(E)
        for m, e in zip(mult, sel):
            w[e] += m
        w = w / (w.sum() + 1e-6)
        mask = torch.zeros(E + S, dtype=torch.bool)
        mask[sel] = True
        mask[E:] = True
        gw = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
        dyn_w, fixed_w = w * gw[:E].sum(), gw[E:]
        for e in range(R):
            if mask[e]:
                q = p + f"mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}."
                out[n] += dyn_w[e] * swiglu(x[n], sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"], sd[q + "down_proj.weight"])
        for s in range(S):
            q = p + f"mlp.fixed_real_moe.{s}."
            out[n] += fixed_w[s] * swiglu(x[n], sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"], sd[q + "down_proj.weight"])
    return out


def release_forward(sd, cfg, input_ids, codec_input_ids, prefix="language_model."):
    """One sequence: ``input_ids [L]`` (placeholder at codec positions), ``codec_input_ids [n, C]`` -> ``[L, C, V]``."""
    t = cfg["text_config"]
    C, V = cfg["codec_channels"], cfg["codec_vocab_size"]
    x = sd[prefix + "embed_tokens.weight"][input_ids].clone()
    codec = sum(sd[f"codec_embed_tokens.{k}.weight"][codec_input_ids[:, k]] for k in range(C))
    x[input_ids == cfg["codec_placeholder_value"]] = codec
    L, H, KV = x.shape[0], t["num_attention_heads"], t["num_key_value_heads"]
    hd = t["hidden_size"] // H
    pos = torch.arange(L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(t["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"], t["rms_norm_eps"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]).view(L, H, hd).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]).view(L, KV, hd).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]).view(L, KV, hd).transpose(0, 1)
        q, k = rope(q, pos, t["rope_theta"]), rope(k, pos, t["rope_theta"])
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(L, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + release_moe(rms(x, sd[p + "post_attention_layernorm.weight"], t["rms_norm_eps"]), sd, p, t)
    x = rms(x, sd[prefix + "norm.weight"], t["rms_norm_eps"])
    return (x @ sd["codec_head.weight"].T).view(L, C, V)


def release_prompt_codes(codes_TC, delays, specials: CodecSpecials):
    """``UniMoEAudio._preprocess_codec``: the voice prompt as the release lays it out, ``[T + D + 1, C]``."""
    T, C = codes_TC.shape
    out = torch.zeros(T + max(delays) + 1, C, dtype=torch.long)
    for c in range(C):
        start = delays[c] + 1
        out[:start, c] = specials.bos
        out[start: start + T, c] = codes_TC[:, c]
        out[start + T:, c] = specials.pad
        if start + T < out.shape[0]:
            out[start + T, c] = specials.eos
    return out


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = release_config()
    sd = release_state(cfg)
    folder = write_release(tmp_path_factory.mktemp("release") / "UniMoE-Audio-preview", cfg, sd)
    out = tmp_path_factory.mktemp("imported") / "model"
    import_release(folder, out, dtype=torch.float32)
    return cfg, sd, folder, out


def _as_release_inputs(seq, placeholder):
    audio = seq.modality == Modality.AUDIO
    ids = torch.where(audio, torch.full_like(seq.text_ids, placeholder), seq.text_ids)
    return ids, seq.audio_codes[:, audio].T


def test_imported_forward_equals_the_releases_forward(release):
    cfg, sd, _, out = release
    model, meta = load_model(out)
    assert meta.stage == "imported" and meta.config.moe.num_routed_experts == 8
    builder = build_task_builder(meta.tasks["tts"], meta.config, task_ids=meta.task_table())
    g = torch.Generator().manual_seed(1)
    seq = builder.build(torch.randint(0, 1024, (12, 5), generator=g), text="hello there",
                        prompt=torch.randint(0, 1024, (12, 4), generator=g), prompt_text="hi")
    ids, codec = _as_release_inputs(seq, cfg["codec_placeholder_value"])
    with torch.no_grad():
        ours = model(collate([seq], with_labels=False), logits="all").logits[0]
        theirs = release_forward(sd, cfg, ids, codec)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the near-tied pair of experts really exercised the banded softmax (weights not 1/k)
    router = model.blocks[0].ffn.router
    x = torch.randn(64, 32)
    weights = router(x).weights
    assert ((weights > 0) & (weights < 0.45)).any() and router.num_experts == 9


def test_prompt_format_is_the_releases_template(release):
    cfg, _, _, out = release
    model, meta = load_model(out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    specials = CodecSpecials(1024)
    tts = build_task_builder(meta.tasks["tts"], meta.config, task_ids=meta.task_table())
    prompt = torch.randint(0, 1024, (12, 3))
    cond, uncond = tts.cfg_prefixes(text="good day", prompt=prompt, prompt_text="hi")
    for seq, text in ((cond, "good day"), (uncond, "")):  # the release's negative row empties the text only
        n = 3 + 18 + 1
        expected = enc(SYSTEM + USER + "<|SPEECH_PROMPT_START|>hi<|SPEECH_PROMPT_END|><|VOICE_PROMPT_START|>"
                       + "<|AUDIO_PLACEHOLDER|>" * n + "<|VOICE_PROMPT_END|><|SPEECH_START|>" + text
                       + "<|SPEECH_END|>" + ASSISTANT + AUDIO_START + "<|AUDIO_PLACEHOLDER|>")
        ids, codec = _as_release_inputs(seq, enc("<|AUDIO_PLACEHOLDER|>")[0])
        assert ids.tolist() == expected
        assert torch.equal(codec[:n], release_prompt_codes(prompt.T, RELEASE_DELAYS, specials))
        assert torch.equal(codec[n], torch.full((12,), specials.bos))  # the BOS frame that starts generation
    t2m = build_task_builder(meta.tasks["t2m"], meta.config, task_ids=meta.task_table())
    cond, uncond = t2m.cfg_prefixes(text="calm piano")
    for seq, caption in ((cond, "calm piano"), (uncond, "Low quality.")):
        ids, _ = _as_release_inputs(seq, enc("<|AUDIO_PLACEHOLDER|>")[0])
        assert ids.tolist() == enc(SYSTEM + USER + "<|MUSIC_START|>" + caption + "<|MUSIC_END|>" + ASSISTANT
                                   + AUDIO_START + "<|AUDIO_PLACEHOLDER|>")
    assert seq.task_id == meta.task_table()["t2m"]


def test_generation_presets_restate_the_release_defaults():
    from unimoe.generation.settings import GenerationSettings

    t2m = GenerationSettings.from_options({}, preset="uni_moe_audio_t2m")
    # release: cond + 10 (cond - uncond) == uncond + 11 (cond - uncond)
    assert (t2m.cfg_scale, t2m.eos_logit_scale, t2m.top_k, t2m.top_p, t2m.temperature) == (11.0, 0.6, 45, 1.0, 1.0)
    assert round(t2m.min_seconds * 50) == 100 and round(t2m.max_seconds * 50) == 981
    tts = GenerationSettings.from_options({"seed": 3}, preset="uni_moe_audio_tts")
    assert (tts.cfg_scale, tts.eos_logit_scale, tts.seed) == (2.0, 1.0, 3)
    from unimoe.generation.settings import SettingsError

    with pytest.raises(SettingsError, match="unknown generation preset 'nope'"):
        GenerationSettings.from_options({}, preset="nope")


def test_broken_release_folders_are_refused_naming_file_and_key(release, tmp_path):
    cfg, sd, folder, _ = release
    with pytest.raises(PretrainedError, match="no config.json"):
        import_release(tmp_path / "empty", tmp_path / "o1") if (tmp_path / "empty").mkdir() is None else None
    # a missing expert tensor
    partial = dict(sd)
    gone = "language_model.layers.1.mlp.fixed_real_moe.1.up_proj.weight"
    del partial[gone]
    bad = write_release(tmp_path / "missing", cfg, partial)
    with pytest.raises(PretrainedError, match="layers.1.mlp.fixed_real_moe.1.up_proj.weight"):
        import_release(bad, tmp_path / "o2")
    # a truncated shard names the file
    trunc = write_release(tmp_path / "trunc", cfg, sd)
    shard = trunc / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(Exception, match="model-00002-of-00002.safetensors"):
        import_release(trunc, tmp_path / "o3")
    # a config that disagrees with the tensors (a wrong expert width) names the key and both shapes
    wrong = json.loads(json.dumps(cfg))
    wrong["text_config"]["dynamic_intermediate_size"] = 24
    bad = write_release(tmp_path / "shape", wrong, sd)
    with pytest.raises(Exception, match=r"experts\.0\.gate_up_proj"):
        import_release(bad, tmp_path / "o4")
    # another model type, pickled weights only
    other = json.loads(json.dumps(cfg))
    other["model_type"] = "qwen2"
    bad = write_release(tmp_path / "qwen", other, sd)
    with pytest.raises(PretrainedError, match="model_type is 'qwen2'"):
        import_release(bad, tmp_path / "o5")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match="only pickled weights"):
        import_release(pickled, tmp_path / "o6")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing half-written


def test_import_cli_streams_one_tensor_at_a_time(release, tmp_path, capsys, monkeypatch):
    from unimoe.cli import main
    from unimoe.release import weights

    _, _, folder, _ = release
    sizes = []
    real = weights.ReleaseTensors.__getitem__

    def spy(self, key):
        tensor = real(self, key)
        sizes.append(tensor.numel())
        return tensor

    monkeypatch.setattr(weights.ReleaseTensors, "__getitem__", spy)
    assert main(["import", "uni-moe-audio", str(folder), str(tmp_path / "m")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_tensors"] == 2 and summary["tasks"] == {"tts": "uni_moe_audio_tts", "t2m": "uni_moe_audio_t2m"}
    assert len(sizes) == summary["tensors"]  # each output tensor read exactly once
    model, meta = load_model(tmp_path / "m")
    assert model.audio_head.weight.dtype == torch.float32  # model built fp32; the file kept the release's dtype
    assert main(["import", "uni-moe-audio", str(folder), str(tmp_path / "m")]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def imported_for_tiny_codec(tmp_path_factory):
    """The same release layout sized to the tiny corpus' codec (4 codebooks x 16 codes), imported with it."""
    from training_helpers import tiny_data

    data = tiny_data(tmp_path_factory.getbasetemp())
    cfg = release_config(channels=4, vocab=19, delays=[0, 1, 2, 3])
    folder = write_release(tmp_path_factory.mktemp("tiny_release") / "release", cfg, release_state(cfg, seed=2))
    out = tmp_path_factory.mktemp("tiny_imported") / "model"
    codec = {"name": "spectral_rvq", "path": str(data / "codec.pt")}
    import_release(folder, out, codec=codec, dtype=torch.float32, max_seq_len=1024)
    return data, out


def test_generate_and_evaluate_accept_the_imported_model(imported_for_tiny_codec, tmp_path, capsys):
    from unimoe.cli import main

    data, model = imported_for_tiny_codec
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(model), "--preset", "uni_moe_audio_t2m", "--task", "t2m", "--text",
                 "calm piano", "--max-seconds", "0.4", "--min-seconds", "0", "--device", "cpu", "--out", str(out)]) == 0
    side = json.loads((out / "clip.json").read_text())
    assert side["settings"]["cfg_scale"] == 11.0 and side["settings"]["eos_logit_scale"] == 0.6
    assert (out / "clip.wav").is_file()
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: tiny\ndescription: kl on mel statistics\nmetrics:\n"
                     "  - {metric: kl, key: kl, backend: mel_stats}\n")
    music = [json.loads(line) for line in (data / "corpus" / "manifests" / "t2m.jsonl").read_text().splitlines()][:2]
    root = data / "corpus" / "manifests"
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text("".join(json.dumps({"id": m["id"], "task": "t2m", "text": m["text"],
                                            "audio": str((root / m["audio"]).resolve())}) + "\n" for m in music))
    rc = main(["evaluate", "--suite", str(suite), "--manifest", str(manifest), "--ckpt", str(model),
               "--preset", "uni_moe_audio_t2m", "--out", str(tmp_path / "eval"), "--no-mlflow"])
    assert rc == 0, capsys.readouterr().err


def test_warmup_and_joint_fine_tune_the_imported_model(imported_for_tiny_codec, tmp_path):
    """init_from the imported folder: warmup (gates + shared experts) then joint, on real tiny shards, in the release format."""
    import lightning as L

    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.training.callbacks import StageFinalizer
    from unimoe.training.stages import JointStage, WarmupStage

    data, model = imported_for_tiny_codec
    _, meta = load_model(model)
    source = model
    for name, cls in (("warmup", WarmupStage), ("joint", JointStage)):
        stage = cls(init_from=str(source))
        dm = UniMoEDataModule(sources={"tts": str(data / "shards" / "tts"), "t2m": str(data / "shards" / "t2m")},
                              max_tokens=4096)
        gate_before = stage.model.blocks[0].ffn.router.gate.weight.detach().clone()
        trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path / name), num_sanity_val_steps=0, limit_val_batches=0,
                            enable_checkpointing=False, callbacks=[StageFinalizer()])
        trainer.fit(stage, dm)
        assert not torch.equal(stage.model.blocks[0].ffn.router.gate.weight, gate_before)
        # the data was laid out in the release's format (chat template + markers) by the model's own builders
        assert type(dm.maker(train=True).builder("t2m")).__name__ == "ReleaseT2MBuilder"
        source = tmp_path / name / "final"
        _, saved = load_model(source)
        assert saved.tasks["t2m"] == meta.tasks["t2m"] or spec_name(saved.tasks["t2m"]) == "uni_moe_audio_t2m"
        assert saved.config.moe.router["name"] == "uni_moe_audio_top_p"


def spec_name(spec):
    from unimoe.registry import spec_parts

    return spec_parts(spec)[0]
