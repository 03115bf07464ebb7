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
after, and the request is done when the most delayed codebook has emitted its EOS.

The named steps of :func:`decode`: :func:`plan_decode` (checks and limits, before any
compute), :class:`DecodeState` (everything per live request on the device: frames so far,
end bookkeeping, noise, expert counts; :meth:`DecodeState.choose` is one step's sampling,
forcing and bookkeeping, without a host sync), a stepper that feeds the chosen frame back
(:class:`CachedStep` with a static or dynamic KV cache, or :class:`RecomputeStep`), and
:class:`Harvest`, which collects finished requests whenever the loop checks (every step on
a CPU; every ``check_every`` steps on a GPU, the only host syncs of the loop).

Caches: the static cache (:class:`~unimoe.model.kv_cache.StaticKVCache`, the default) keeps
every shape fixed, so finished rows stay in the batch, masked out of the MoE routing; the
dynamic one drops finished rows (``KVCache.select``) at each check. ``compile=True``
compiles the whole step (:mod:`unimoe.generation.compiled`).

Routing statistics: with ``stats="counts"`` every MoE layer returns the real experts of
each token (:class:`~unimoe.moe.stats.ExpertCounts`); one token per row makes them exact
per request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence as Seq

import torch
from torch import Tensor, nn

from unimoe.generation.batching import append_frames, select_rows
from unimoe.generation.sampling import CodebookSampling, FrameSampler, counter_uniforms, fold_seed, guide
from unimoe.model.delay import forced_tokens
from unimoe.model.kv_cache import mark_static_address
from unimoe.model.tasks import Batch, Sequence, collate
from unimoe.moe.stats import ExpertCounts

CacheKind = Literal["static", "dynamic"]
CACHE_KINDS: tuple[str, ...] = ("static", "dynamic")
SHAPE_BUCKET = 64
"""Static shapes (cache slots, frame buffer) are rounded up to a multiple of this, so a
compiled step is reused by requests of similar lengths."""


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
    """Decoding steps the longest request needed (its segment length minus its BOS frame)."""
    seconds: float
    expert_sums: Tensor | None = None
    """``[n, M]`` float: sum over decoded tokens (cond and uncond rows) of real experts used, per MoE layer."""
    expert_tokens: Tensor | None = None
    """``[n]`` tokens counted in ``expert_sums``; None for a dense model."""
    trace: list[StepTrace] = field(default_factory=list)
    steps_run: int = 0
    """Steps the loop ran (more than ``steps`` when it checks for finished requests every few steps)."""
    cache: str = "static"
    """``static``, ``dynamic`` or ``none`` (recomputation)."""
    compiled: bool = False


# ---------------------------------------------------------------------- step 1: the plan
@dataclass
class DecodePlan:
    """What one :func:`decode` call will do, checked before any compute."""

    n: int
    cfg_rows: bool
    limits: list[int]
    """Per request: the frame limit (``max_frames``, lowered where the prompt leaves less room)."""
    max_steps: int
    delays: list[int]
    eos_codebook: int
    min_frames: int
    cfg_scale: float
    eos_logit_scale: float = 1.0
    """Multiplies the deciding codebook's guided EOS logit (the release's ``eos_prob_mul_factor``)."""

    @property
    def rows_per_request(self) -> int:
        return 2 if self.cfg_rows else 1

    @property
    def tail(self) -> int:
        """``max(delays)``: steps from a request's EOS decision to its end."""
        return max(self.delays)


def plan_decode(model, prompts: list[Sequence], uncond_prompts: list[Sequence] | None, *, max_frames: list[int],
                min_frames: int, cfg_scale: float, seeds: Seq[int] | None, eos_logit_scale: float = 1.0) -> DecodePlan:
    """Check the inputs and compute the per-request frame limits (:class:`ContextTooLong` if none fits)."""
    cfg = model.config
    n = len(prompts)
    if n == 0:
        raise ValueError("decode: no prompts")
    if uncond_prompts is not None and len(uncond_prompts) != n:
        raise ValueError(f"decode: {len(uncond_prompts)} uncond prompts for {n} prompts")
    if len(max_frames) != n or any(m < 1 for m in max_frames):
        raise ValueError(f"decode: max_frames must give one limit >= 1 per prompt, got {max_frames}")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"decode: {len(seeds)} seeds for {n} prompts")
    delays = list(cfg.delays)
    D = max(delays)
    limits = []
    for i in range(n):
        longest = max(len(prompts[i]), len(uncond_prompts[i]) if uncond_prompts is not None else 0)
        room = cfg.max_seq_len - longest - 1 - D  # full sequence = prompt + T frames + EOS + D
        if room < 1:
            raise ContextTooLong(f"prompt {i} has {longest} positions; with the delay tail ({D}) it leaves no "
                                 f"room for audio under max_seq_len={cfg.max_seq_len}")
        limits.append(min(max_frames[i], room))
    return DecodePlan(n=n, cfg_rows=uncond_prompts is not None, limits=limits, max_steps=max(limits) + 1 + D,
                      delays=delays, eos_codebook=min(range(len(delays)), key=delays.__getitem__),
                      min_frames=min_frames, cfg_scale=cfg_scale, eos_logit_scale=eos_logit_scale)


def bucket(length: int, cap: int) -> int:
    """``length`` rounded up to a multiple of :data:`SHAPE_BUCKET`, at most ``cap`` (and never below ``length``)."""
    return max(length, min(cap, SHAPE_BUCKET * math.ceil(length / SHAPE_BUCKET)))


# ---------------------------------------------------------------------- step 2: the state
class DecodeState:
    """Everything decoding tracks per live request, on the device (tensors updated in place and
    marked as static addresses, so a compiled step mutates them and a CUDA graph keeps them).
    A plain object, not an ``nn.Module``: a step reads its attributes dozens of times.

    Rows are requests (``requests[r]`` is row ``r``'s request index); the model's batch
    has ``rows_per_request`` rows per request (cond, then uncond). ``frames [m, C, S + 1]``
    are the delayed segments so far, ``eos_frame [m]`` the undelayed frame at which EOS was
    decided (-1 while running), ``step`` the step whose frame :meth:`choose` picks next.
    """

    PER_ROW = ("frames", "eos_frame", "forced_end", "limit", "tokens", "uniforms", "expert_sums", "expert_tokens",
               "collected")
    """The tensors with one entry per live row (sliced together when rows leave)."""

    def __init__(self, model, plan: DecodePlan, sampler: FrameSampler, seeds: Seq[int], *, frame_slots: int,
                 count_experts: bool, keep_trace: bool) -> None:
        device = model.audio_head.weight.device
        cfg, sp = model.config, model.specials
        n, C = plan.n, cfg.num_codebooks
        self.plan, self.sampler, self.specials = plan, sampler, sp
        self.requests = list(range(n))
        self.keep_trace = keep_trace
        self.trace: list[StepTrace] = []
        frames = torch.full((n, C, frame_slots), sp.pad, dtype=torch.long, device=device)
        frames[:, :, 0] = sp.bos
        self.frames = frames
        self.eos_frame = torch.full((n,), -1, dtype=torch.long, device=device)
        self.forced_end = torch.zeros(n, dtype=torch.bool, device=device)
        self.limit = torch.tensor(plan.limits, dtype=torch.long, device=device)
        self.delays = torch.tensor(plan.delays, dtype=torch.long, device=device)
        self.step = torch.ones((), dtype=torch.long, device=device)
        self.tokens = torch.zeros(n, C, dtype=torch.long, device=device)
        self.collected = torch.zeros(n, dtype=torch.bool, device=device)
        self.ready = torch.zeros((), dtype=torch.bool, device=device)
        """Some row finished and is not collected yet: the loop's one-scalar check."""
        uniforms = None
        if not sampler.all_greedy:
            folded = torch.tensor([fold_seed(s) for s in seeds], dtype=torch.long, device=device)
            uniforms = counter_uniforms(folded, torch.arange(frame_slots, device=device), C)  # [n, S + 1, C]
        self.uniforms = uniforms
        self.count_experts = count_experts
        M = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        self.expert_sums = torch.zeros(n, M, device=device) if count_experts else None
        self.expert_tokens = torch.zeros(n, device=device) if count_experts else None
        self.min_start = max(plan.min_frames, 1)  # EOS may end the clip once frame min_start exists
        for name in self.PER_ROW + ("delays", "step", "ready"):
            if getattr(self, name) is not None:
                mark_static_address(getattr(self, name))

    @property
    def rows(self) -> int:
        return len(self.requests)

    def done(self) -> Tensor:
        """``[m]`` bool: the most delayed codebook has emitted its EOS."""
        return (self.eos_frame >= 0) & (self.step >= self.eos_frame + self.plan.tail)

    def choose(self, logits: Tensor) -> None:
        """Pick step ``step``'s frame from the model's ``logits [rows * R, C, V]``: guidance, sampling,
        the delay pattern's forced tokens and the end bookkeeping; written to ``frames`` and ``tokens``."""
        plan, sp = self.plan, self.specials
        m = self.rows
        cond = logits[:m]
        uncond = logits[m:] if plan.cfg_rows else None
        live_before = None
        if self.keep_trace:
            ending_or_running = (self.eos_frame < 0) | (self.step <= self.eos_frame + plan.tail)  # not done before this step
            live_before = ending_or_running.nonzero().flatten().tolist()
        src = self.step - plan.delays[plan.eos_codebook]  # undelayed frame of the deciding codebook
        allow_eos = (src - 1) >= self.min_start
        uniforms = None if self.uniforms is None else self.uniforms.index_select(1, self.step.view(1)).squeeze(1)
        guided = guide(cond, uncond, plan.cfg_scale)  # [m, C, V]
        if plan.eos_logit_scale != 1.0:
            guided[:, plan.eos_codebook, sp.eos] *= plan.eos_logit_scale
        drawn = self.sampler.sample(guided, allow_eos, uniforms)  # [m, C]

        running = self.eos_frame < 0
        hit_limit = running & (src == self.limit + 1)
        eos_drawn = drawn[:, plan.eos_codebook] == sp.eos
        ends = running & (eos_drawn | hit_limit)
        self.forced_end.logical_or_(hit_limit & ~eos_drawn)
        self.eos_frame.copy_(torch.where(ends, src, self.eos_frame))
        forced, values = forced_tokens(self.step, self.eos_frame, self.delays, sp)
        tokens = torch.where(forced, values, drawn)
        self.frames.index_copy_(2, self.step.view(1), tokens.unsqueeze(-1))
        self.tokens.copy_(tokens)
        self.ready.copy_((self.done() & ~self.collected).any())
        if self.keep_trace:
            self.trace.append(StepTrace(int(self.step), [self.requests[r] for r in live_before],
                                        cond[live_before].clone(), None if uncond is None else uncond[live_before].clone(),
                                        tokens[live_before].clone()))

    def count(self, routing: list, live: Tensor) -> None:
        """Add one step's experts per token (``ExpertCounts`` per MoE layer, ``[rows * R]``) to the live requests."""
        if not self.count_experts:
            return
        per_row = torch.stack([info.real_per_token for info in routing if info is not None], dim=1)  # [m * R, M]
        R = self.plan.rows_per_request
        self.expert_sums.add_(per_row.view(R, self.rows, -1).sum(0))  # masked rows selected nothing
        self.expert_tokens.add_(live.float(), alpha=R)

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (dynamic cache, recomputation): every per-row buffer follows."""
        for name in self.PER_ROW:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])
        self.requests = [self.requests[r] for r in rows.tolist()]


# ---------------------------------------------------------------------- step 3: feeding frames back
class CachedStep(nn.Module):
    """One decoding step with a KV cache: feed the chosen frame, get logits, choose the next frame.

    Everything it touches is a buffer or a parameter, so ``torch.compile`` can take it whole
    (and replay it as a CUDA graph with the static cache). Rows already done are kept out of
    the MoE routing (``token_mask``), so they cost no expert compute and are not counted.
    """

    def __init__(self, model, cache, state: DecodeState) -> None:
        super().__init__()
        self.model, self.state = model, state
        self.cache = cache  # an nn.Module (static) or a plain object (dynamic)
        self.moe = model.config.moe is not None

    @property
    def drops_rows(self) -> bool:
        return not isinstance(self.cache, nn.Module)

    def prefill(self, batch: Batch) -> Tensor:
        return self.model(batch, cache=self.cache, logits="last", stats="counts").logits  # [rows * R, C, V]

    def forward(self) -> None:
        state = self.state
        R = state.plan.rows_per_request
        fed = state.tokens if R == 1 else state.tokens.repeat(R, 1)
        if self.moe:
            live = ~state.done()
            out = self.model.step(fed, self.cache, token_mask=live.repeat(R), stats="counts")
            state.count(out.routing, live)
        else:  # a dense model: nothing to route or count
            out = self.model.step(fed, self.cache, stats="counts")
        state.step.add_(1)
        state.choose(out.logits[:, 0])

    def keep(self, rows: Tensor) -> None:
        R = self.state.plan.rows_per_request
        self.cache.select(torch.cat([rows + r * self.state.rows for r in range(R)]))
        self.state.keep(rows)


class RecomputeStep(nn.Module):
    """One decoding step without a cache: the whole sequence is run again (the reference the cache is tested against).

    Finished rows are dropped at every step (the loop checks every step on this path).
    """

    drops_rows = True

    def __init__(self, model, batch: Batch, state: DecodeState) -> None:
        super().__init__()
        self.model, self.state, self.batch = model, state, batch

    def prefill(self, batch: Batch) -> Tensor:
        return self.model(batch, logits="last", stats="counts").logits

    def forward(self) -> None:
        state = self.state
        R = state.plan.rows_per_request
        live = ~state.done()
        step = int(state.step)  # a host sync: this path is a reference, not a fast path
        full = append_frames(self.batch, state.frames[:, :, 1 : step + 1].repeat(R, 1, 1))
        out = self.model(full, logits="last", stats="counts")
        last = (full.lengths - 1).unsqueeze(1)  # the fed frame is each row's last position
        counts = [None if info is None else ExpertCounts(info.real_per_token.view(full.batch_size, -1).gather(1, last)[:, 0])
                  for info in out.routing]
        state.count(counts, live)
        state.step.add_(1)
        state.choose(out.logits)

    def keep(self, rows: Tensor) -> None:
        R = self.state.plan.rows_per_request
        self.batch = select_rows(self.batch, torch.cat([rows + r * self.state.rows for r in range(R)]))
        self.state.keep(rows)


# ---------------------------------------------------------------------- step 4: collecting results
class Harvest:
    """Finished requests' segments, stop reasons and expert counts, collected at each check."""

    def __init__(self, plan: DecodePlan) -> None:
        self.plan = plan
        self.segments: list[Tensor | None] = [None] * plan.n
        self.reasons: list[str | None] = [None] * plan.n
        self.expert_sums: list[Tensor | None] = [None] * plan.n
        self.expert_tokens: list[Tensor | None] = [None] * plan.n
        self.collected: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self.collected) == self.plan.n

    def collect(self, state: DecodeState) -> Tensor | None:
        """Take every newly finished row; returns ``[m]`` bool of rows still running, or None when
        nothing finished since the last call (then the check cost one scalar read)."""
        if not bool(state.ready):
            return None
        done = state.done()
        rows = (done & ~state.collected).nonzero().flatten().tolist()
        state.collected.logical_or_(done)
        state.ready.fill_(False)
        if rows:
            ends = (state.eos_frame[rows] + self.plan.tail).tolist()
            forced = state.forced_end[rows].tolist()
            for r, end, was_forced in zip(rows, ends, forced):
                i = state.requests[r]
                if i in self.collected:
                    continue
                self.collected.add(i)
                self.segments[i] = state.frames[r, :, : end + 1].clone()
                self.reasons[i] = "max_frames" if was_forced else "eos"
                if state.count_experts:
                    self.expert_sums[i] = state.expert_sums[r].clone()
                    self.expert_tokens[i] = state.expert_tokens[r].clone()
        return ~done


# ---------------------------------------------------------------------- the loop
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
    cache: CacheKind = "static",
    compile: bool = False,
    seeds: Seq[int] | None = None,
    routing_stats: bool = True,
    keep_trace: bool = False,
    check_every: int | None = None,
) -> DecodeOutput:
    """Generate the target segment of every prompt (``prefix()`` sequences ending in the BOS frame).

    ``uncond_prompts`` (same order, or None) enables CFG with ``cfg_scale``; ``eos_logit_scale``
    multiplies the deciding codebook's guided EOS logit (the release's ``eos_prob_mul_factor``). ``max_frames``
    is per request; ``min_frames`` forbids EOS earlier (at least one frame is always made).
    ``seeds`` (one per request, default ``0 .. n-1``) fix each request's random stream
    independently of the batch. ``cache``: ``static`` (fixed shapes) or ``dynamic`` (drops
    finished rows); ``use_cache=False`` recomputes everything each step. ``compile`` compiles
    the step (static cache only). ``check_every``: steps between checks for finished
    requests (default 1 on a CPU, 16 on a GPU). The model should be in eval mode; the caller
    sets the router top-p or expert budget.
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"decode: cache must be one of {CACHE_KINDS}, got {cache!r}")
    if compile and (not use_cache or cache != "static"):
        raise ValueError("decode: compile=True needs the static KV cache (use_cache=True, cache='static')")
    if compile and keep_trace:
        raise ValueError("decode: keep_trace records host-side data every step; it cannot run compiled")
    plan = plan_decode(model, prompts, uncond_prompts, max_frames=max_frames, min_frames=min_frames,
                       cfg_scale=cfg_scale, seeds=seeds, eos_logit_scale=eos_logit_scale)
    cfg = model.config
    device = model.audio_head.weight.device
    check_every = 1 if not use_cache else check_every or (16 if device.type == "cuda" else 1)
    if check_every < 1:
        raise ValueError(f"decode: check_every must be >= 1, got {check_every}")
    batch = collate(list(prompts) + (list(uncond_prompts) if plan.cfg_rows else []), with_labels=False).to(device)
    sampler = FrameSampler(sampling, model.specials, plan.eos_codebook, device)
    slots = bucket(plan.max_steps + 1, cfg.max_seq_len + 1) if use_cache and cache == "static" else plan.max_steps + 1
    state = DecodeState(model, plan, sampler, list(seeds) if seeds is not None else list(range(plan.n)),
                        frame_slots=slots, count_experts=cfg.moe is not None and routing_stats, keep_trace=keep_trace)

    _sync(device)
    start = time.perf_counter()
    if not use_cache:
        stepper: CachedStep | RecomputeStep = RecomputeStep(model, batch, state)
    elif cache == "static":
        # Every row is fed until the batch ends (finished rows too, masked): the longest prompt sets the size.
        length = bucket(int(batch.lengths.max()) + plan.max_steps, cfg.max_seq_len)
        stepper = CachedStep(model, model.new_static_cache(batch.batch_size, length), state)
    else:
        stepper = CachedStep(model, model.new_cache(batch.batch_size, int(batch.lengths.max()) + plan.max_steps), state)
    advance = stepper
    if compile:
        from unimoe.generation.compiled import compile_step

        advance = compile_step(stepper, device)
    state.choose(stepper.prefill(batch))  # step 1
    harvest = Harvest(plan)
    steps_run = 1
    while True:
        step = steps_run  # == int(state.step), known on the host without a sync
        if step % check_every == 0 or step >= plan.max_steps:
            running = harvest.collect(state)
            if harvest.complete:
                break
            if running is not None and stepper.drops_rows and not bool(running.all()):
                stepper.keep(running.nonzero().flatten())
        if step >= plan.max_steps:  # cannot happen: every request ends by its limit
            raise RuntimeError("decode: ran past the duration guard")
        advance()
        steps_run += 1
    _sync(device)
    seconds = time.perf_counter() - start

    D = plan.tail
    segments = harvest.segments
    counted = state.count_experts
    return DecodeOutput(
        segments=segments, num_frames=[int(s.shape[1]) - 2 - D for s in segments], stop_reasons=harvest.reasons,
        max_frames=plan.limits, steps=max(int(s.shape[1]) - 1 for s in segments), seconds=seconds,
        expert_sums=torch.stack(harvest.expert_sums) if counted else None,
        expert_tokens=torch.stack(harvest.expert_tokens) if counted else None,
        trace=state.trace, steps_run=steps_run, cache=cache if use_cache else "none", compiled=compile,
    )
