"""Task sequence builders, the CFG unconditional form, and collate."""

from __future__ import annotations

import random

import pytest
import torch

from unimoe.model.config import AudioLMConfig
from unimoe.model.delay import CodecSpecials, delayed_segment
from unimoe.model.tasks import (
    IGNORE_INDEX,
    Modality,
    Sequence,
    SequenceTooLong,
    TaskBuilder,
    TaskIds,
    build_task_builder,
    collate,
    task_class,
)
from unimoe.model.text_tokenizer import ByteTokenizer
from unimoe.registry import TASKS, RegistryError

CFG = AudioLMConfig.from_preset("tiny")
SP = CodecSpecials(CFG.codebook_size)
TOK = ByteTokenizer()


def codes(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.codebook_size, (CFG.num_codebooks, T), generator=torch.Generator().manual_seed(seed))


def text_block(instruction: str, content: str) -> list[int]:
    return [TOK.bos_id, *instruction.encode(), *content.encode(), TOK.eos_id]


def blocks(seq: Sequence) -> list[tuple[int, int]]:
    """Run-length (modality, length) of a sequence's positions."""
    out: list[tuple[int, int]] = []
    for m in seq.modality.tolist():
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + 1)
        else:
            out.append((m, 1))
    return out


def test_task_ids_extend_without_renumbering_and_legacy_order():
    ids = TaskIds(["t2m", "tts"])
    assert (ids["t2m"], ids["tts"], ids.name(1)) == (0, 1, "tts")
    grown = ids.extended(["v2m", "tts", "aa_new"])
    assert grown.names == ["t2m", "tts", "aa_new", "v2m"]  # appended in name order, old ids unchanged
    assert ids.extended(["tts"]) is ids
    with pytest.raises(KeyError, match="'nope' has no id"):
        ids["nope"]
    with pytest.raises(ValueError, match="distinct"):
        TaskIds(["tts", "tts"])
    # checkpoints from before stored ids were trained with this order
    assert TaskIds.legacy().names[:3] == ["tts", "t2m", "v2m"]

    class Echo(TaskBuilder):
        task, conditions, default_instruction = "zz_echo", ("text",), "echo: "

        def layout(self, conditions, keep):
            return [self.text_block(self.text_ids(conditions["text"], "text") if "text" in keep else [])]

    TASKS.register("zz_echo", Echo)
    try:
        assert TaskIds.legacy()["zz_echo"] == len(TaskIds.legacy()) - 1 >= 3
        seq = build_task_builder("zz_echo", CFG, task_ids=TaskIds(["zz_echo"])).build(codes(3), text="x")
        assert seq.task_id == 0  # the model's table decides, not the registry
        assert build_task_builder("t2m", CFG, task_ids=grown).build(codes(3), text="x").task_id == 0
    finally:
        TASKS._factories.pop("zz_echo")


def test_tasks_declare_what_they_need():
    tts, t2m, v2m = task_class("tts"), task_class("t2m"), task_class("v2m")
    assert (tts.domain, t2m.domain, v2m.domain) == ("speech", "music", "music")
    assert (tts.required, t2m.required, v2m.required) == (("text",), ("text",), ("video",))
    assert tts.speaker_prompt and not t2m.speaker_prompt and not v2m.speaker_prompt
    assert tts.accepts("prompt_text") and v2m.accepts("video") and not t2m.accepts("video")
    with pytest.raises(ValueError, match=r"t2m: 'text' \(the caption\) is required"):
        build_task_builder("t2m", CFG).build(codes(3))
    with pytest.raises(ValueError, match=r"v2m: 'video' \(frames"):
        build_task_builder("v2m", CFG).build(codes(3), text="x")
    with pytest.raises(RegistryError, match="unknown task builder 'nope'"):
        task_class("nope")


def test_tts_layout_with_prompt():
    tts = build_task_builder("tts", CFG)
    target, prompt = codes(6, 1), codes(4, 2)
    seq = tts.build(target, text="good day", prompt=prompt, prompt_text="hi")
    text = text_block("text to speech: ", "hi good day")
    D = max(CFG.delays)
    assert blocks(seq) == [(Modality.TEXT, len(text)), (Modality.AUDIO, (4 + 2 + D) + (6 + 2 + D))]
    assert seq.text_ids[: len(text)].tolist() == text
    p0 = len(text)
    assert torch.equal(seq.audio_codes[:, p0 : p0 + 4 + 2 + D], delayed_segment(prompt, CFG.delays, SP))
    s = seq.target_start
    assert s == p0 + 4 + 2 + D
    assert torch.equal(seq.audio_codes[:, s:], delayed_segment(target, CFG.delays, SP))
    # targets: exactly the real codes and EOS of the target segment
    want = torch.zeros_like(seq.target_mask)
    for k, d in enumerate(CFG.delays):
        want[k, s + 1 + d : s + 1 + d + 6 + 1] = True
    assert torch.equal(seq.target_mask, want)
    assert seq.task_id == 0 and seq.video is None


def test_token_id_inputs_and_t2m_layout():
    t2m = build_task_builder("t2m", CFG)
    a = t2m.build(codes(3), text="soft rain")
    b = t2m.build(codes(3), text=list(b"soft rain"))
    c = t2m.build(codes(3), text=torch.tensor(list(b"soft rain")))
    assert torch.equal(a.text_ids, b.text_ids) and torch.equal(a.text_ids, c.text_ids)
    assert a.text_ids[: a.target_start].tolist() == text_block("text to music: ", "soft rain")
    assert a.task_id == 1


def test_v2m_resamples_frames_and_lays_out_vision_tokens():
    v2m = build_task_builder("v2m", CFG)
    video = (torch.rand(9, 3, 50, 70) * 255).to(torch.uint8)
    seq = v2m.build(codes(5), video=video, text="upbeat")
    vit = CFG.vision
    frames = vit["num_frames"]
    n_tokens = (frames // vit["temporal_patch_size"]) * (vit["image_size"] // (vit["patch_size"] * vit["merge_size"])) ** 2
    text = text_block("video to music: ", "upbeat")
    assert blocks(seq)[:2] == [(Modality.VISION, n_tokens), (Modality.TEXT, len(text))]
    assert seq.video.shape == (frames, 3, vit["image_size"], vit["image_size"])
    assert seq.video.dtype == torch.float32 and 0 <= seq.video.min() and seq.video.max() <= 1
    # uniform frame sampling keeps the first and last frames
    small = v2m.frames(torch.arange(9.0).view(9, 1, 1, 1).expand(9, 3, 32, 32) / 8)
    assert small[:, 0, 0, 0].mul(8).round().tolist() == [0, 3, 5, 8]
    no_caption = v2m.build(codes(5), video=video)
    assert no_caption.text_ids[n_tokens : no_caption.target_start].tolist() == text_block("video to music: ", "")


@pytest.mark.parametrize("task", ["tts", "t2m", "v2m"])
def test_dropped_conditions_equal_the_generation_uncond_prefix(task):
    builder = build_task_builder(task, CFG)
    inputs = {
        "tts": dict(text="hello", prompt=codes(3, 4), prompt_text="hey"),
        "t2m": dict(text="jazz trio"),
        "v2m": dict(video=torch.rand(4, 3, 32, 32), text="calm"),
    }[task]
    target = codes(5, 9)
    for drop, cond in ((True, False), (False, True)):
        trained = builder.build(target, drop_condition=drop, **inputs).prefix()
        prompt = builder.prefix(cond=cond, **inputs)
        for field in ("text_ids", "audio_codes", "modality", "target_mask"):
            assert torch.equal(getattr(trained, field), getattr(prompt, field)), field
        assert trained.target_start == prompt.target_start
        assert (trained.video is None) == (prompt.video is None)
    cond, uncond = builder.cfg_prefixes(**inputs)
    assert len(uncond) < len(cond)
    assert (uncond.modality != Modality.VISION).all()
    assert uncond.text_ids[: uncond.target_start].tolist() == text_block(builder.instruction, "")
    # the prefix ends with the all-BOS frame and has no targets
    assert (cond.audio_codes[:, -1] == SP.bos).all() and not cond.target_mask.any()


def test_uncond_keep_and_drop_probability():
    tts = build_task_builder({"name": "tts", "cond_drop_prob": 0.3, "uncond_keep": ["prompt"]}, CFG)
    prompt = codes(3, 1)
    uncond = tts.prefix(cond=False, text="words", prompt=prompt)
    assert blocks(uncond)[0] == (Modality.TEXT, len(text_block("text to speech: ", "")))
    assert (uncond.modality == Modality.AUDIO).sum() == 3 + 2 + max(CFG.delays) + 1  # prompt kept
    rng = random.Random(0)
    full = len(tts.build(codes(4), text="words", drop_condition=False))
    lengths = [len(tts.build(codes(4), text="words", rng=rng)) for _ in range(400)]
    dropped = sum(n < full for n in lengths) / len(lengths)
    assert 0.24 < dropped < 0.36  # p = 0.3, sd ~ 0.023
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [len(tts.build(codes(4), text="w", rng=rng_a)) for _ in range(20)] == [
        len(tts.build(codes(4), text="w", rng=rng_b)) for _ in range(20)
    ]


def test_collate_pads_right_and_shifts_labels():
    t2m = build_task_builder("t2m", CFG)
    v2m = build_task_builder("v2m", CFG)
    seqs = [t2m.build(codes(2), text="a"), v2m.build(codes(6), video=torch.rand(4, 3, 32, 32)), t2m.build(codes(4), text="bb")]
    batch = collate(seqs, pad_to_multiple_of=8)
    L = batch.seq_len
    assert L % 8 == 0 and L >= max(len(s) for s in seqs)
    assert batch.lengths.tolist() == [len(s) for s in seqs]
    assert batch.video.shape == (1, *seqs[1].video.shape)
    for b, s in enumerate(seqs):
        n = len(s)
        assert batch.attention_mask[b].tolist() == [True] * n + [False] * (L - n)
        assert (batch.modality[b, n:] == Modality.PAD).all()
        assert (batch.task_ids[b] == s.task_id).all()
        assert batch.position_ids[b, :n].tolist() == list(range(n))
        for k in range(CFG.num_codebooks):
            for t in range(L):
                is_target = t + 1 < n and bool(s.target_mask[k, t + 1])
                want = s.audio_codes[k, t + 1].item() if is_target else IGNORE_INDEX
                assert batch.labels[b, k, t].item() == want
    moved = batch.to("cpu")
    assert torch.equal(moved.labels, batch.labels)


def test_bad_inputs_name_the_field():
    tts = build_task_builder("tts", CFG)
    with pytest.raises(ValueError, match="'target'.*C=4"):
        tts.build(torch.zeros(3, 5, dtype=torch.long), text="x")
    with pytest.raises(ValueError, match=r"'prompt' has codes outside \[0, 16\)"):
        tts.build(codes(3), text="x", prompt=torch.full((4, 2), 16))
    with pytest.raises(TypeError, match="'target' must be an integer tensor"):
        tts.build(codes(3).float(), text="x")
    with pytest.raises(ValueError, match="'text'"):
        tts.build(codes(3))
    with pytest.raises(TypeError, match="unexpected input.*'caption'"):
        tts.build(codes(3), text="x", caption="y")
    with pytest.raises(ValueError, match="token ids outside"):
        tts.build(codes(3), text=[1, 99999])
    with pytest.raises(ValueError, match="v2m: 'video'"):
        build_task_builder("v2m", CFG).build(codes(3), video=torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="AudioLMConfig.vision"):
        build_task_builder("v2m", CFG.replace(vision=None))
    with pytest.raises(SequenceTooLong, match="max_seq_len=40"):
        build_task_builder("t2m", CFG.replace(max_seq_len=40)).build(codes(30), text="x")
    with pytest.raises(ValueError, match="uncond_keep"):
        build_task_builder({"name": "t2m", "uncond_keep": ["prompt"]}, CFG)
    v2m = build_task_builder("v2m", CFG)
    a = v2m.build(codes(2), video=torch.rand(4, 3, 32, 32))
    b = Sequence(a.text_ids, a.audio_codes, a.modality, a.target_mask, a.task_id, a.target_start, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="videos in one batch must share a shape"):
        collate([a, b])
    with pytest.raises(ValueError, match="target_start"):
        Sequence(a.text_ids, a.audio_codes, a.modality, a.target_mask, a.task_id, 0, a.video)
