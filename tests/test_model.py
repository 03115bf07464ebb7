"""The audio LM: losses against hand-computed cross entropy, KV-cache decoding against the
full forward, padding invariance, gradient checkpointing, and the building blocks against
plain reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unimoe.model.config import AudioLMConfig
from unimoe.model.delay import CodecSpecials
from unimoe.model.tasks import IGNORE_INDEX, Modality, TaskIds, build_task_builder, collate
from unimoe.model.kv_cache import StaticKVCache

TASK_IDS = TaskIds.legacy()  # what a builder uses without a model's table
from unimoe.model.transformer import Attention, AudioLM, KVCache, apply_rope, rope_cos_sin

torch.set_num_threads(2)


def make(preset: str = "tiny", seed: int = 0, **overrides) -> AudioLM:
    torch.manual_seed(seed)
    return AudioLM(AudioLMConfig.from_preset(preset, **overrides))


def codes(cfg: AudioLMConfig, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (cfg.num_codebooks, T), generator=g)


def mixed_sequences(cfg: AudioLMConfig):
    tts, t2m, v2m = (build_task_builder(n, cfg) for n in ("tts", "t2m", "v2m"))
    g = torch.Generator().manual_seed(3)
    return [
        tts.build(codes(cfg, 9, 1), text="hello there", prompt=codes(cfg, 4, 2), prompt_text="hi"),
        t2m.build(codes(cfg, 5, 3), text="calm piano"),
        v2m.build(codes(cfg, 7, 4), video=torch.rand(6, 3, 40, 48, generator=g), text="drums"),
        tts.build(codes(cfg, 3, 5), text="ok"),
    ]


# ---------------------------------------------------------------------- building blocks
def test_rope_matches_pairwise_rotation_and_is_relative():
    hd, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, hd)
    pos = torch.tensor([[0, 3, 7, 11, 100]])
    cos, sin = rope_cos_sin(pos, hd, theta, torch.float32)
    got = apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for t in range(5):
        for i in range(hd // 2):  # split-halves convention: (i, i + hd/2) rotate by pos * theta^(-2i/hd)
            a = pos[0, t].item() * theta ** (-2 * i / hd)
            x1, x2 = x[0, 0, t, i].item(), x[0, 0, t, i + hd // 2].item()
            want[0, 0, t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[0, 0, t, i + hd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # q.k depends only on the position difference
    q, k = torch.randn(hd), torch.randn(hd)

    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, theta, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, theta, torch.float32)
        return (apply_rope(q.view(1, 1, 1, -1), cq, sq) * apply_rope(k.view(1, 1, 1, -1), ck, sk)).sum()

    torch.testing.assert_close(dot(5, 2), dot(105, 102), atol=1e-4, rtol=1e-4)


def test_attention_matches_naive_gqa():
    cfg = AudioLMConfig.from_preset("tiny", num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    B, L, hd = 2, 6, cfg.head_size
    x = torch.randn(B, L, cfg.hidden_size)
    pos = torch.arange(L).expand(B, L)
    cos, sin = rope_cos_sin(pos, hd, cfg.rope_theta, torch.float32)
    got = attn(x, cos, sin)
    q = apply_rope(attn.q_proj(x).view(B, L, 4, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, L, 2, hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, L, 2, hd).transpose(1, 2)
    out = torch.zeros(B, 4, L, hd)
    for h in range(4):
        kv = h // 2  # heads 0,1 share kv head 0; heads 2,3 share kv head 1
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kv]
    want = attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_frame_embedding_is_the_sum_of_codebook_embeddings():
    model = make()
    cfg, V = model.config, model.config.audio_vocab_size
    c = codes(cfg, 3, 0).unsqueeze(0)  # [1, C, 3]
    mod = torch.full((1, 3), int(Modality.AUDIO))
    x = model.embed(torch.zeros(1, 3, dtype=torch.long), c, mod)
    table = model.audio_embed.weight
    want = sum(table[k * V + c[0, k]] for k in range(cfg.num_codebooks))  # [3, D]
    torch.testing.assert_close(x[0], want)
    # text positions use the text table, padding is zero
    mod = torch.tensor([[int(Modality.TEXT), int(Modality.PAD), int(Modality.AUDIO)]])
    ids = torch.tensor([[65, 66, 0]])
    x = model.embed(ids, c, mod)
    torch.testing.assert_close(x[0, 0], model.text_embed.weight[65])
    assert torch.equal(x[0, 1], torch.zeros(cfg.hidden_size))


# ---------------------------------------------------------------------- losses
def test_loss_is_hand_computed_ce_over_target_frames_only():
    """t2m: loss = sum over codebooks of the mean CE over the target segment's codes and EOS."""
    model = make().eval()
    cfg = model.config
    sp = CodecSpecials(cfg.codebook_size)
    T = 4
    target = codes(cfg, T, 7)
    seq = build_task_builder("t2m", cfg).build(target, text="rain")
    batch = collate([seq])
    out = model(batch)
    logits = out.logits[0]  # [L, C, V]
    s = seq.target_start  # index of the target BOS frame; text occupies [0, s)
    assert (seq.modality[:s] == Modality.TEXT).all()
    L = len(seq)
    want = 0.0
    for k, d in enumerate(cfg.delays):
        terms = []
        for pos in range(s + 1, L):  # predicted from position pos - 1
            j = pos - s  # step inside the delayed target segment
            if 1 + d <= j <= T + d:
                token = target[k, j - 1 - d].item()
            elif j == T + 1 + d:
                token = sp.eos
            else:
                continue  # BOS fill and PAD fill are not targets
            terms.append(-F.log_softmax(logits[pos - 1, k], -1)[token])
        assert len(terms) == T + 1
        want = want + torch.stack(terms).mean()
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    assert out.codebook_losses.shape == (cfg.num_codebooks,)
    torch.testing.assert_close(out.codebook_losses.sum(), out.loss)
    assert out.num_targets.tolist() == [T + 1] * cfg.num_codebooks
    # no label sits on text, on the BOS frame's own position, or after the end
    labels = batch.labels[0]
    assert (labels[:, : s] == IGNORE_INDEX).all() and (labels[:, L - 1 :] == IGNORE_INDEX).all()
    assert out.task_losses.keys() == {TASK_IDS["t2m"]}


def test_prompt_text_and_padding_carry_no_loss_and_rows_are_independent():
    """A padded row's loss equals the same example alone (per-token losses, routing masks)."""
    for preset in ("tiny", "tiny-moe"):
        model = make(preset).eval()
        seqs = mixed_sequences(model.config)
        batch = collate(seqs)
        out = model(batch)
        for b, seq in enumerate(seqs):
            alone = model(collate([seq]))
            per_codebook = out.token_loss[b].sum(-1) / (batch.labels[b] != IGNORE_INDEX).sum(-1).clamp(min=1)
            torch.testing.assert_close(per_codebook.sum(), alone.loss, atol=1e-5, rtol=1e-5)
            n = len(seq)
            torch.testing.assert_close(out.logits[b, :n], alone.logits[0], atol=1e-4, rtol=1e-4)
            # loss positions = exactly the positions before target tokens
            tgt = seq.target_mask
            assert torch.equal(batch.labels[b, :, : n - 1] != IGNORE_INDEX, tgt[:, 1:])
            assert not tgt[:, : seq.target_start + 1].any()  # text, vision, prompt, BOS frame
        # the tts rows (0 and 3) form task 0: its loss is the per-codebook mean over both rows
        lab = batch.labels
        rows = [0, 3]
        per_cb = out.token_loss[rows].sum((0, 2)) / (lab[rows] != IGNORE_INDEX).sum((0, 2))
        torch.testing.assert_close(out.task_losses[TASK_IDS["tts"]], per_cb.sum(), atol=1e-5, rtol=1e-5)
        if preset == "tiny-moe":  # padding is not routed: statistics count real tokens only
            assert all(int(info.num_tokens) == int(batch.attention_mask.sum()) for info in out.routing)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_forward_backward_reaches_every_parameter(preset):
    model = make(preset).train()
    batch = collate(mixed_sequences(model.config))
    out = model(batch, logits="none")
    assert out.logits is None and torch.isfinite(out.loss)
    total = out.loss + (0.01 * out.aux.load_balance if out.aux is not None else 0)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if preset == "tiny-moe":
        assert out.aux.load_balance.requires_grad and len(out.routing) == model.config.num_layers
        assert all(info is not None for info in out.routing)
    else:
        assert all(info is None for info in out.routing)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    ref = make("tiny-moe").train()
    ckpt = make("tiny-moe", gradient_checkpointing=True).train()
    batch = collate(mixed_sequences(ref.config))
    results = []
    for model in (ref, ckpt):
        torch.manual_seed(11)  # router jitter draws the same noise
        out = model(batch, logits="none")
        (out.loss + out.aux.load_balance).backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_kv_cache_decoding_equals_full_forward_with_ragged_prompts(preset):
    """Prefill right-padded prompts of different lengths, then feed target frames one by one:
    every step's logits equal the full forward's at the same position."""
    model = make(preset).eval()
    cfg = model.config
    seqs = mixed_sequences(cfg)
    with torch.no_grad():
        full = [model(collate([s])).logits[0] for s in seqs]  # [L_b, C, V]
        prefixes = [s.prefix() for s in seqs]
        cache = model.new_cache(len(seqs), max_len=64)
        out = model(collate(prefixes, with_labels=False), cache=cache, logits="last")
        assert out.loss is None
        starts = [s.target_start for s in seqs]
        assert cache.lengths.tolist() == [p + 1 for p in starts]
        for b, s in enumerate(starts):
            torch.testing.assert_close(out.logits[b], full[b][s], atol=1e-4, rtol=1e-4)
        steps = min(len(s) - s.target_start - 1 for s in seqs)
        for i in range(1, steps):
            frame = torch.stack([s.audio_codes[:, s.target_start + i] for s in seqs])  # [B, C]
            logits = model.step(frame, cache).logits[:, 0]  # [B, C, V]
            for b, s in enumerate(starts):
                torch.testing.assert_close(logits[b], full[b][s + i], atol=1e-4, rtol=1e-4)
        assert cache.lengths.tolist() == [p + steps for p in starts]


def test_kv_cache_multi_token_steps_and_row_selection():
    model = make().eval()
    seqs = mixed_sequences(model.config)[:2]
    with torch.no_grad():
        full = [model(collate([s])).logits[0] for s in seqs]
        cache = model.new_cache(2, max_len=64)
        model(collate([s.prefix() for s in seqs]), cache=cache, logits="none")
        chunk = torch.stack([s.audio_codes[:, s.target_start + 1 : s.target_start + 4] for s in seqs])  # [B, C, 3]
        logits = model.step(chunk, cache).logits  # [B, 3, C, V]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(logits[b], full[b][s.target_start + 1 : s.target_start + 4], atol=1e-4, rtol=1e-4)
        cache.select(torch.tensor([1]))  # drop row 0, continue row 1 alone
        s = seqs[1]
        nxt = model.step(s.audio_codes[:, s.target_start + 4].unsqueeze(0), cache).logits[0, 0]
        torch.testing.assert_close(nxt, full[1][s.target_start + 4], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="KVCache is full"):
            model.step(torch.zeros(1, model.config.num_codebooks, 60, dtype=torch.long), cache)


def test_cache_write_positions_follow_row_lengths():
    cache = KVCache(1, 2, 1, 2, 8)
    cache.lengths = torch.tensor([1, 3])
    cache._bound = 3
    pos = cache.positions(2)
    assert pos.tolist() == [[1, 2], [3, 4]]
    k = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2)
    cache.write(0, pos, k, k)
    assert cache.k[0, 0, 0, 1:3].tolist() == k[0, 0].tolist() and cache.k[0, 1, 0, 3:5].tolist() == k[1, 0].tolist()
    mask = cache.attention_mask(pos)  # [B, 1, S, 5]
    assert mask[0, 0].tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    assert mask[1, 0, 1].tolist() == [True] * 5


def test_static_cache_writes_in_place_and_reads_what_the_dynamic_one_reads(monkeypatch):
    dyn, static = KVCache(2, 2, 1, 4, 8), StaticKVCache(2, 2, 1, 4, 8, rope_theta=10_000.0)
    buffers = [static.k0.data_ptr(), static.v1.data_ptr()]
    for cache in (dyn, static):
        cache.lengths = torch.tensor([1, 3]) if cache is dyn else cache.lengths.copy_(torch.tensor([1, 3]))
        cache._bound = 3
    pos = static.positions(2)
    assert pos.tolist() == dyn.positions(2).tolist() == [[1, 2], [3, 4]]
    k = torch.arange(16, dtype=torch.float32).view(2, 1, 2, 4)
    for layer in (0, 1):
        kd, vd = dyn.write(layer, pos, k + layer, -k)
        ks, vs = static.write(layer, pos, k + layer, -k)
        assert torch.equal(kd, ks) and torch.equal(vd, vs) and ks.shape[2] == 5  # eager: the used prefix only
    assert [static.k0.data_ptr(), static.v1.data_ptr()] == buffers  # written in place
    assert torch.equal(static.attention_mask(pos), dyn.attention_mask(pos))
    cos, sin = static.rope(pos)
    ref_cos, ref_sin = rope_cos_sin(pos, 4, 10_000.0, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)  # the table holds what RoPE computes
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # while tracing: every slot, fixed shapes
    assert static.write(0, pos, k, k)[0].shape[2] == 8 and static.attention_mask(pos).shape[-1] == 8
    monkeypatch.undo()
    static.advance(5)
    with pytest.raises(ValueError, match="StaticKVCache is full"):
        static.attention_mask(static.positions(1))
    with pytest.raises(TypeError, match="keeps its rows"):
        static.select(torch.tensor([0]))


def test_text_head_is_optional_and_bad_inputs_fail_clearly():
    model = make(text_head=True)
    batch = collate(mixed_sequences(model.config)[:1])
    out = model(batch, text_logits=True, logits="last")
    assert out.text_logits.shape == (1, batch.seq_len, model.text_vocab_size)
    assert out.logits.shape == (1, model.config.num_codebooks, model.config.audio_vocab_size)
    with pytest.raises(ValueError, match="text_head"):
        make()(batch, text_logits=True)
    with pytest.raises(ValueError, match="logits must be"):
        model(batch, logits="first")
    v2m_batch = collate(mixed_sequences(model.config)[2:3])
    with pytest.raises(ValueError, match="vision encoder"):
        make(vision=None)(v2m_batch)
    v2m_batch.video = None
    with pytest.raises(ValueError, match="no video frames"):
        model(v2m_batch)
    with pytest.raises(ValueError, match="delays"):
        AudioLMConfig.from_preset("tiny", delays=[0, 1])
    with pytest.raises(ValueError, match="num_kv_heads"):
        AudioLMConfig.from_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown AudioLMConfig preset"):
        AudioLMConfig.from_preset("huge")


def test_adaptive_top_p_changes_moe_compute_only():
    model = make("tiny-moe").eval()
    batch = collate(mixed_sequences(model.config))
    with torch.no_grad():
        base = model(batch, logits="none")
        model.set_top_p(0.999)
        more = model(batch, logits="none")
        model.set_top_p(None)
        again = model(batch, logits="none")
    def mean_active(out):
        return sum(float(i.mean_active_real) for i in out.routing) / len(out.routing)

    assert mean_active(more) > mean_active(base)
    torch.testing.assert_close(again.loss, base.loss)


def test_config_parses_from_yaml_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--model", type=AudioLMConfig)
    cfg = parser.parse_string(
        "model:\n  hidden_size: 32\n  num_layers: 1\n  num_codebooks: 2\n  codebook_size: 8\n  delays: [0, 2]\n"
        "  moe: {num_routed_experts: 2, routed_intermediate_size: 16, shared_intermediate_size: 8,"
        " router: {name: top_p, top_p: 0.5}}\n  vision: null\n"
    )
    config = parser.instantiate(cfg).model
    assert isinstance(config, AudioLMConfig) and config.moe.num_routed_experts == 2 and config.delays == [0, 2]
    model = AudioLM(config)
    assert model.blocks[0].is_moe and model.blocks[0].ffn.top_p == 0.5


def test_single_query_attention_equals_sdpa():
    from unimoe.model.transformer import single_query_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.arange(7).view(1, 1, 1, 7) <= torch.tensor([2, 6, 4]).view(3, 1, 1, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)
