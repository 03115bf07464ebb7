"""The decoding loop against independent references: full recomputation without a cache at
every step, a naive greedy loop written here, the delay-pattern end rules, per-row routing
statistics replayed through the model, and the codes the codec receives."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import RecordingCodec, extend, prompts, tiny_model

from unimoe.generation import GenerationRequest, GenerationSettings, Generator, decode
from unimoe.generation.decode import ContextTooLong
from unimoe.generation.sampling import CodebookSampling
from unimoe.model.tasks import build_task_builder, collate

pytestmark = pytest.mark.usefixtures("single_thread")

NEG = float("-inf")


def sampling(temperature=1.0, top_k=0, top_p=1.0, C=4) -> CodebookSampling:
    return CodebookSampling.from_settings(GenerationSettings(temperature=temperature, top_k=top_k, top_p=top_p), C)


@torch.no_grad()
def full_logits(model, seq) -> torch.Tensor:
    """Next-frame logits of one sequence, recomputed from scratch (batch of one, no cache)."""
    return model(collate([seq], with_labels=False), logits="last").logits[0]


def bias_head(model, bias: torch.Tensor) -> None:
    """Add ``bias [C, V]`` to every next-frame prediction (steers EOS without training)."""
    original = model.head
    model.head = lambda hidden: original(hidden) + bias


@torch.no_grad()
def naive_greedy(model, cond, uncond, scale, max_frames, min_frames=0) -> torch.Tensor:
    """Greedy CFG decoding of one request, re-running the whole sequence each step, rules spelled out."""
    sp, delays = model.specials, model.config.delays
    C, D = len(delays), max(delays)
    frames = [[sp.bos] * C]
    eos_frame, step = None, 1
    while True:
        done = torch.tensor(frames[1:], dtype=torch.long).reshape(-1, C).T  # [C, step - 1]
        c = full_logits(model, extend(cond, done))
        g = c if uncond is None else (lambda u: u + scale * (c - u))(full_logits(model, extend(uncond, done)))
        tok = []
        for k in range(C):
            src = step - delays[k]
            if src <= 0:
                tok.append(sp.bos)
            elif eos_frame is not None and src == eos_frame:
                tok.append(sp.eos)
            elif eos_frame is not None and src > eos_frame:
                tok.append(sp.pad)
            else:
                row = g[k].clone()
                row[sp.bos] = row[sp.pad] = NEG
                if k != 0 or src - 1 < max(min_frames, 1) or int(row.argmax()) != sp.eos:
                    row[sp.eos] = NEG
                tok.append(int(row.argmax()))
        if eos_frame is None and (tok[0] == sp.eos or step - delays[0] == max_frames + 1):
            eos_frame = step - delays[0]
            tok = [sp.eos if step - delays[k] == eos_frame else t for k, t in enumerate(tok)]
        frames.append(tok)
        if eos_frame is not None and step == eos_frame + D:
            return torch.tensor(frames, dtype=torch.long).T  # [C, L]
        step += 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_logits_equal_full_recomputation_every_step(preset):
    model = tiny_model(preset)
    cond, uncond = prompts(model)  # three prompts of different lengths, with CFG rows
    out = decode(model, cond, uncond, sampling(), max_frames=[7, 9, 5], cfg_scale=3.0, keep_trace=True,
                 seeds=[0, 1, 2])
    history = {i: [] for i in range(3)}
    checked = 0
    for t in out.trace:
        for row, i in enumerate(t.requests):
            done = torch.stack(history[i], dim=1) if history[i] else torch.zeros(4, 0, dtype=torch.long)
            assert torch.allclose(t.cond_logits[row], full_logits(model, extend(cond[i], done)), atol=1e-4)
            assert torch.allclose(t.uncond_logits[row], full_logits(model, extend(uncond[i], done)), atol=1e-4)
            history[i].append(t.tokens[row])
            checked += 1
    assert checked == sum(s.shape[1] - 1 for s in out.segments)  # every step of every request was compared
    for i in range(3):  # the trace is the output
        assert torch.equal(torch.stack(history[i], 1), out.segments[i][:, 1:])


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_greedy_matches_naive_loop_and_is_deterministic(preset):
    model = tiny_model(preset, seed=3)
    cond, uncond = prompts(model)
    bias = torch.zeros(4, 19)
    bias[0, 16] = 0.25  # EOS of the deciding codebook sometimes wins: both end paths get exercised
    bias_head(model, bias)
    greedy = sampling(temperature=0.0)
    out = decode(model, cond, uncond, greedy, max_frames=[10] * 3, cfg_scale=2.5)
    for i in range(3):
        assert torch.equal(out.segments[i], naive_greedy(model, cond[i], uncond[i], 2.5, max_frames=10)), i
    again = decode(model, cond, uncond, greedy, max_frames=[10] * 3, cfg_scale=2.5)
    assert all(torch.equal(a, b) for a, b in zip(out.segments, again.segments))
    alone = decode(model, cond[1:2], uncond[1:2], greedy, max_frames=[10], cfg_scale=2.5)
    assert torch.equal(alone.segments[0], out.segments[1])  # batching does not change a request
    nocache = decode(model, cond, uncond, greedy, max_frames=[10] * 3, cfg_scale=2.5, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(out.segments, nocache.segments))
    assert "eos" in out.stop_reasons


def expected_tail(T: int, delays: list[int], sp) -> torch.Tensor:
    """Codebook k of a segment with T frames: BOS until its delay, EOS at T + 1 + d_k, PAD after."""
    L = T + 2 + max(delays)
    rows = []
    for d in delays:
        rows.append([sp.bos if t - d <= 0 else sp.eos if t - d == T + 1 else sp.pad if t - d > T + 1 else -1
                     for t in range(L)])
    return torch.tensor(rows)


def check_segment(seg: torch.Tensor, T: int, model) -> None:
    ref = expected_tail(T, model.config.delays, model.specials)
    assert seg.shape == ref.shape
    fixed = ref >= 0
    assert torch.equal(seg[fixed], ref[fixed])
    assert bool((seg[~fixed] < model.config.codebook_size).all())  # real codes everywhere else


def test_eos_when_argmax_respects_min_frames_and_delay():
    model = tiny_model("tiny")
    cond, _ = prompts(model)
    bias = torch.zeros(4, 19)
    bias[0, 16] = 100.0  # EOS always the argmax of codebook 0
    bias[1:, 16] = 200.0  # ...and of the others, which must never end a clip themselves
    bias_head(model, bias)
    for min_frames, T in ((0, 1), (5, 5)):
        out = decode(model, cond, None, sampling(temperature=0.0), max_frames=[20] * 3, min_frames=min_frames)
        assert out.num_frames == [T] * 3 and out.stop_reasons == ["eos"] * 3
        for seg in out.segments:
            check_segment(seg, T, model)


def test_eos_never_drawn_unless_argmax():
    model = tiny_model("tiny")
    cond, _ = prompts(model)
    bias = torch.zeros(4, 19)
    bias[:, 3] = 5.0
    bias[0, 16] = 4.5  # EOS: second best, ~38% of the mass at temperature 1
    bias_head(model, bias)
    out = decode(model, cond, None, sampling(), max_frames=[25] * 3,
                 seeds=[0, 1, 2])
    assert out.stop_reasons == ["max_frames"] * 3 and out.num_frames == [25] * 3
    for seg in out.segments:
        check_segment(seg, 25, model)


def test_eos_logit_scale_multiplies_the_guided_eos_logit_before_the_argmax_rule():
    """The release's ``eos_prob_mul_factor``: codebook 0's EOS logit (bias 100 over a code at 80) is
    scaled after guidance; at 0.6 it is 60 + the model's own logit, below the code, so EOS is never
    the argmax and the clip runs to its limit; unscaled it ends at the first allowed frame."""
    model = tiny_model("tiny")
    cond, _ = prompts(model)
    bias = torch.zeros(4, 19)
    bias[0, 16], bias[0, 3] = 100.0, 80.0
    bias_head(model, bias)
    ends = decode(model, cond, None, sampling(temperature=0.0), max_frames=[12] * 3)
    assert ends.stop_reasons == ["eos"] * 3 and ends.num_frames == [1] * 3
    for eos_logit_scale in (0.6, 0.0):
        runs = decode(model, cond, None, sampling(temperature=0.0), max_frames=[12] * 3, eos_logit_scale=eos_logit_scale)
        assert runs.stop_reasons == ["max_frames"] * 3 and runs.num_frames == [12] * 3
    assert decode(model, cond, None, sampling(temperature=0.0), max_frames=[12] * 3,
                  eos_logit_scale=1.1).num_frames == [1] * 3


def test_duration_guard_and_context_limit():
    model = tiny_model("tiny")
    cond, uncond = prompts(model)
    bias = torch.zeros(4, 19)
    bias[:, 16] = -1e4  # the model never wants to stop
    bias_head(model, bias)
    out = decode(model, cond, uncond, sampling(temperature=0.0), max_frames=[3, 7, 5], cfg_scale=2.0)
    assert out.num_frames == [3, 7, 5] and out.stop_reasons == ["max_frames"] * 3
    for seg, T in zip(out.segments, [3, 7, 5]):
        check_segment(seg, T, model)
    longest = max(len(s) for s in cond + uncond)
    short = tiny_model("tiny", max_seq_len=longest + 10)  # the longest prompt has room for 10 - 1 - 3 = 6 frames
    bias_head(short, bias)
    out = decode(short, cond, uncond, sampling(temperature=0.0), max_frames=[12] * 3, cfg_scale=2.0)
    for c, u, limit, n in zip(cond, uncond, out.max_frames, out.num_frames):
        assert limit == min(12, longest + 10 - max(len(c), len(u)) - 4) and n == limit  # prompt + T + EOS + delay tail
    assert min(out.max_frames) == 6
    with pytest.raises(ContextTooLong, match="max_seq_len"):
        decode(tiny_model("tiny", max_seq_len=longest + 4), cond, uncond, sampling(), max_frames=[5] * 3, cfg_scale=2.0)


@torch.no_grad()
def test_routing_statistics_equal_a_replay_through_the_model():
    model = tiny_model("tiny-moe", seed=5)
    cond, _ = prompts(model)
    out = decode(model, cond[:1], None, sampling(temperature=0.0), max_frames=[10])
    seg = out.segments[0]
    cache = model.new_cache(1, 256)
    model(collate(cond[:1], with_labels=False), cache=cache, logits="last")
    ref = torch.zeros(out.expert_sums.shape[1])
    for s in range(1, seg.shape[1] - 1):  # every fed-back frame (the last one is never fed)
        routing = model.step(seg[:, s].unsqueeze(0), cache).routing
        ref += torch.stack([info.mean_active_real for info in routing])
    assert int(out.expert_tokens[0]) == seg.shape[1] - 2
    assert torch.allclose(out.expert_sums[0], ref)
    off = decode(model, cond[:1], None, sampling(temperature=0.0), max_frames=[10], routing_stats=False)
    assert off.expert_sums is None and torch.equal(off.segments[0], seg)


def test_codec_receives_undelayed_frames():
    model = tiny_model("tiny-moe", seed=2)
    codec = RecordingCodec()
    settings = GenerationSettings(temperature=0.0, cfg_scale=3.0, max_seconds=0.12)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 16, (4, 6), generator=g)
    requests = [GenerationRequest(id="a", task="tts", text="a fairly long sentence to say", prompt_codes=prompt),
                GenerationRequest(id="b", task="t2m", text="piano")]
    clips = Generator(model, codec, settings).generate(requests)
    tts, t2m = build_task_builder("tts", model.config), build_task_builder("t2m", model.config)
    pairs = [tts.cfg_prefixes(text="a fairly long sentence to say", prompt=prompt), t2m.cfg_prefixes(text="piano")]
    out = decode(model, [c for c, _ in pairs], [u for _, u in pairs], sampling(temperature=0.0), max_frames=[12, 12],
                 cfg_scale=3.0)
    delays = model.config.delays
    assert len(codec.decoded) == 2
    for clip, seg, sent in zip(clips, out.segments, codec.decoded):
        T = seg.shape[1] - 2 - max(delays)
        undelayed = torch.stack([seg[k, 1 + d: 1 + d + T] for k, d in enumerate(delays)])  # drop BOS, shift back
        assert sent.shape == (1, 4, T) and torch.equal(sent[0], undelayed) and torch.equal(clip.codes, undelayed)
        assert clip.wav.shape == (T * codec.hop_length,) and clip.metadata["frames"] == T


def test_router_top_p_override_lowers_activated_experts():
    model = tiny_model("tiny-moe", seed=4)
    requests = [GenerationRequest(id="a", task="t2m", text="piano"),
                GenerationRequest(id="b", task="t2m", text="slow strings with a soft choir")]
    base = GenerationSettings(temperature=0.0, min_seconds=0.15, max_seconds=0.15, cfg_scale=3.0)
    meta = {}
    for p in (0.95, 0.3):
        clips = Generator(model, RecordingCodec(), base.replace(router_top_p=p)).generate(requests)
        meta[p] = [c.metadata for c in clips]
        assert all(m["router_top_p"] == p and m["frames"] == 15 for m in meta[p])
    for hi, lo in zip(meta[0.95], meta[0.3]):
        assert lo["activated_experts_per_token"] < hi["activated_experts_per_token"]
        assert lo["activated_params_per_token"] < hi["activated_params_per_token"]
        assert all(a <= b for a, b in zip(lo["activated_experts_per_layer"], hi["activated_experts_per_layer"]))
    assert all(b.ffn.top_p == 0.7 for b in model.blocks)  # the trained value is back
    assert not model.training
