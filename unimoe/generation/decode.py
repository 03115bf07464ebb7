"""The decoding loop: one step per delayed frame, every codebook sampled at once.

Rows: the conditional prompts of the ``n`` requests, then (with CFG) their unconditional
prompts, right-padded into one batch. The KV cache keeps a length per row, so prompts of
different lengths prefill together and then advance in lockstep, one frame per step.

Step ``s`` predicts delayed frame ``s`` of every request's target segment (step 0 is the
all-BOS frame that ends the prompt). Codebook ``k`` of step ``s`` holds undelayed frame
``s - delays[k]``; the delay pattern fixes BOS before a stream starts and EOS/PAD after
it ends (:func:`unimoe.model.delay.forced_tokens`). The least delayed codebook decides the
end: when it draws EOS (only ever as its argmax), or reaches ``max_frames``, the request's
``eos_frame`` is set, the other codebooks are forced to EOS at their own delay and PAD
after, and the request is done when the most delayed codebook has emitted its EOS. Done
requests leave the batch (``cache.select``), so a batch costs what its live rows cost.

Routing statistics come from the MoE layers' :class:`~unimoe.moe.stats.RoutingInfo` of
every decoding step: rows are passed to the layers as ``task_ids`` (routing never reads
task ids; the statistics split by them), so ``tokens_per_expert_by_task`` holds exact
per-row expert counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unimoe.generation.batching import append_frames, select_rows
from unimoe.generation.sampling import CodebookSampling, guide, mask_specials, sample
from unimoe.model.delay import forced_tokens
from unimoe.model.tasks import Sequence, collate
from unimoe.moe.stats import RoutingInfo


class ContextTooLong(ValueError):
    """A prompt leaves no room for even one generated frame under ``AudioLMConfig.max_seq_len``."""


@dataclass
class StepTrace:
    """What one decoding step saw and chose (kept with ``keep_trace=True``, for tests and debugging)."""

    step: int
    requests: list[int]
    """Request indices of the live rows, in row order."""
    cond_logits: Tensor
    """``[n, C, V]`` model logits of the conditional rows (before guidance and masking)."""
    uncond_logits: Tensor | None
    tokens: Tensor
    """``[n, C]`` the delayed frame placed at this step (after forcing)."""


@dataclass
class DecodeOutput:
    """Per request (in input order): the delayed target segment and how decoding ended."""

    segments: list[Tensor]
    """``[C, T + 2 + max(delays)]`` long: BOS frame, T frames and EOS, delayed (what the model saw)."""
    num_frames: list[int]
    stop_reasons: list[str]
    """``"eos"`` (the model ended it) or ``"max_frames"`` (the duration guard did)."""
    max_frames: list[int]
    """The frame limit each request ran under (the setting, lowered to fit ``max_seq_len``)."""
    steps: int
    """Decoding steps run (the longest request's segment length minus its BOS frame)."""
    seconds: float
    expert_sums: Tensor | None = None
    """``[n, M]`` float: sum over decoded tokens (cond and uncond rows) of real experts used, per MoE layer."""
    expert_tokens: Tensor | None = None
    """``[n]`` tokens counted in ``expert_sums``; None for a dense model."""
    trace: list[StepTrace] = field(default_factory=list)


def row_expert_counts(routing: list[RoutingInfo | None], num_rows: int) -> Tensor | None:
    """Real experts each row's token used in each MoE layer: ``[rows, M]`` (None for a dense model).

    Needs the layers to have been called with ``task_ids`` = row index (one token per row),
    or -1 for positions to leave out.
    """
    cols = []
    for info in routing:
        if info is None:
            continue
        table = info.tokens_per_expert_by_task
        if table is None:
            raise ValueError("row_expert_counts: the MoE layers ran without row ids (task_ids)")
        real = table[:, info.real_experts].sum(-1).float()  # [rows seen]
        cols.append(torch.nn.functional.pad(real, (0, num_rows - real.shape[0])))
    return torch.stack(cols, dim=1) if cols else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(
    model,
    prompts: list[Sequence],
    uncond_prompts: list[Sequence] | None,
    sampling: CodebookSampling,
    *,
    max_frames: list[int],
    cfg_scale: float = 1.0,
    eos_logit_scale: float = 1.0,
    min_frames: int = 0,
    use_cache: bool = True,
    generators: list[torch.Generator] | None = None,
    routing_stats: bool = True,
    keep_trace: bool = False,
) -> DecodeOutput:
    """Generate the target segment of every prompt (``prefix()`` sequences ending in the BOS frame).

    ``uncond_prompts`` (same order, or None) enables CFG with ``cfg_scale``; ``eos_logit_scale``
    multiplies the deciding codebook's guided EOS logit (the release's ``eos_prob_mul_factor``). ``max_frames``
    is per request; ``min_frames`` forbids EOS earlier (at least one frame is always made).
    ``generators`` (one per request, on the model's device) make sampling independent of
    the batch. ``routing_stats=False`` skips the per-row expert counts (on a GPU they cost a
    host sync per MoE layer and step). The model should be in eval mode; the caller sets the
    router top-p.
    """
    cfg = model.config
    specials = model.specials
    delays = list(cfg.delays)
    D = max(delays)
    eos_cb = min(range(len(delays)), key=delays.__getitem__)  # the least delayed codebook decides the end
    d_eos = delays[eos_cb]
    n = len(prompts)
    if n == 0:
        raise ValueError("decode: no prompts")
    if uncond_prompts is not None and len(uncond_prompts) != n:
        raise ValueError(f"decode: {len(uncond_prompts)} uncond prompts for {n} prompts")
    if len(max_frames) != n or any(m < 1 for m in max_frames):
        raise ValueError(f"decode: max_frames must give one limit >= 1 per prompt, got {max_frames}")
    if generators is not None and len(generators) != n:
        raise ValueError(f"decode: {len(generators)} generators for {n} prompts")
    device = model.audio_head.weight.device
    cfg_rows = uncond_prompts is not None
    seqs = list(prompts) + (list(uncond_prompts) if cfg_rows else [])
    batch = collate(seqs, with_labels=False).to(device)

    # The duration guard, lowered where the prompt leaves less room under max_seq_len.
    limits = []
    for i in range(n):
        longest = max(len(prompts[i]), len(uncond_prompts[i]) if cfg_rows else 0)
        room = cfg.max_seq_len - longest - 1 - D  # full sequence = prompt + T frames + EOS + D
        if room < 1:
            raise ContextTooLong(f"prompt {i} has {longest} positions; with the delay tail ({D}) it leaves no "
                                 f"room for audio under max_seq_len={cfg.max_seq_len}")
        limits.append(min(max_frames[i], room))
    max_steps = max(limits) + 1 + D
    C = cfg.num_codebooks
    frames = torch.full((n, C, max_steps + 1), specials.pad, dtype=torch.long, device=device)  # delayed, per request
    frames[:, :, 0] = specials.bos
    sampling = sampling.to(device)

    alive = torch.arange(n, device=device)  # request index of each live row
    eos_frame = torch.full((n,), -1, dtype=torch.long, device=device)
    limit = torch.tensor(limits, dtype=torch.long, device=device)
    forced_end = torch.zeros(n, dtype=torch.bool, device=device)
    gens = list(generators) if generators is not None else None
    segments: list[Tensor | None] = [None] * n
    counted = cfg.moe is not None and routing_stats
    expert_sums = torch.zeros(n, sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)), device=device) if counted else None
    expert_tokens = torch.zeros(n, device=device) if counted else None
    trace: list[StepTrace] = []
    rows_per_request = 2 if cfg_rows else 1

    _sync(device)
    start = time.perf_counter()
    cache = model.new_cache(len(seqs), int(batch.lengths.max()) + max_steps) if use_cache else None
    logits = model(batch, cache=cache, logits="last").logits  # [R, C, V]: predicts step 1
    step = 1
    while True:
        m = alive.shape[0]
        cond, uncond = logits[:m], (logits[m:] if cfg_rows else None)
        guided = guide(cond, uncond, cfg_scale)
        if eos_logit_scale != 1.0:
            guided[:, eos_cb, specials.eos] *= eos_logit_scale
        src = step - d_eos  # undelayed frame index of the deciding codebook
        allow_eos = torch.full((m,), src - 1 >= max(min_frames, 1), dtype=torch.bool, device=device)
        tokens = sample(mask_specials(guided, specials, eos_cb, allow_eos), sampling, gens)  # [m, C]

        running = eos_frame[alive] < 0
        hit_limit = running & (src == limit[alive] + 1)
        ends = running & ((tokens[:, eos_cb] == specials.eos) | hit_limit)
        forced_end[alive] |= hit_limit & (tokens[:, eos_cb] != specials.eos)
        eos_frame[alive] = torch.where(ends, torch.full_like(ends, src, dtype=torch.long), eos_frame[alive])
        step_t = torch.full((m,), step, dtype=torch.long, device=device)
        forced, values = forced_tokens(step_t, eos_frame[alive], delays, specials)
        tokens = torch.where(forced, values, tokens)
        frames[alive, :, step] = tokens
        if keep_trace:
            trace.append(StepTrace(step, alive.tolist(), cond.detach().clone(),
                                   None if uncond is None else uncond.detach().clone(), tokens.clone()))

        done = (eos_frame[alive] >= 0) & (step >= eos_frame[alive] + D)  # the last codebook emitted EOS
        if bool(done.any()):
            for r in done.nonzero().flatten().tolist():
                i = int(alive[r])
                segments[i] = frames[i, :, : step + 1].clone()
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            rows = torch.cat([keep, keep + m]) if cfg_rows else keep
            alive = alive[keep]
            tokens = tokens[keep]
            if gens is not None:
                gens = [gens[r] for r in keep.tolist()]
            if cache is not None:
                cache.select(rows)
            batch = select_rows(batch, rows)
        if step >= max_steps:  # cannot happen: every request ends by its limit
            raise RuntimeError("decode: ran past the duration guard")

        # Next step: feed the chosen frame to the cond and uncond rows of each live request.
        m = alive.shape[0]
        row_ids = torch.arange(m * rows_per_request, device=device) if counted else None
        fed = tokens.repeat(rows_per_request, 1)  # [R, C]
        if cache is not None:
            out = model.step(fed, cache, task_ids=row_ids)
        else:
            full = append_frames(batch, frames[alive.repeat(rows_per_request), :, 1 : step + 1])
            if counted:
                task_ids = torch.full_like(full.task_ids, -1)
                task_ids.scatter_(1, (full.lengths - 1).unsqueeze(1), row_ids.unsqueeze(1))  # count the new token only
                full.task_ids = task_ids
            out = model(full, logits="last")
        logits = out.logits[:, -1] if out.logits.dim() == 4 else out.logits  # [R, C, V]
        if counted:
            per_row = row_expert_counts(out.routing, m * rows_per_request)  # [R, M]
            per_request = per_row.view(rows_per_request, m, -1).sum(0)  # [m, M]
            expert_sums[alive] += per_request
            expert_tokens[alive] += rows_per_request
        step += 1

    _sync(device)
    seconds = time.perf_counter() - start
    num_frames = [int(s.shape[1]) - 2 - D for s in segments]
    reasons = ["max_frames" if bool(forced_end[i]) else "eos" for i in range(n)]
    return DecodeOutput(segments=segments, num_frames=num_frames, stop_reasons=reasons, max_frames=limits,
                        steps=step, seconds=seconds, expert_sums=expert_sums, expert_tokens=expert_tokens, trace=trace)
