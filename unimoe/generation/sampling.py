"""Turning next-frame logits ``[N, C, V]`` into one token per codebook, in one pass over all codebooks.

The order is the authors' release's (and AudioCraft's): guidance, special-token rules,
temperature, top-k, top-p, then a draw. Every codebook has its own temperature, top-k and
top-p, so the coarse codebook can be sampled conservatively and the fine ones freely.

Special tokens: BOS and PAD are never sampled (the delay pattern places them, see
:func:`unimoe.model.delay.forced_tokens`); EOS may only be sampled in the codebook that
decides the end (the least delayed one) and only while it is that codebook's argmax, so a
long tail of small EOS probability never cuts a clip short.

How (:class:`FrameSampler`): the specials are the last three ids, so the real codes are a
slice; ``topk`` over it gives every codebook's candidates in descending order (a partial
sort of ``max(top_k)`` entries instead of a full sort of ``V``), the EOS candidate is put in
front where it may be drawn (it is then the most likely token), top-k and top-p become masks
over the candidate ranks, and the draw is an inverse-CDF lookup with one uniform per row and
codebook. No Python loop over codebooks or rows, no host sync.

Randomness is counter-based (:func:`counter_uniforms`): the uniform of (request seed, step,
codebook) is a hash of the three, so a request's tokens do not depend on what else is in the
batch, the draws need no ``torch.Generator`` objects (which cannot be compiled or captured in a
CUDA graph), and every decoding path (eager or compiled, static or dynamic cache) draws the same
numbers. Bit-identical reruns of one request still need the same batch, since batched kernels
may round logits differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from unimoe.generation.settings import GenerationSettings
from unimoe.model.delay import CodecSpecials

NEG_INF = float("-inf")


def guide(cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (``cond`` when there is no uncond)."""
    if uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


@dataclass
class CodebookSampling:
    """Per-codebook sampling parameters as tensors: ``temperature [C]``, ``top_k [C]`` (0 = off), ``top_p [C]``.

    Build it on the host (``from_settings``): the facts a decoding step branches on (all
    greedy? how many candidates? any top-p?) are read once here, never per step.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    host: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            temps, ks, ps = self.temperature.tolist(), self.top_k.tolist(), self.top_p.tolist()
            sampled = [i for i, t in enumerate(temps) if t > 0]
            self.host = {
                "all_greedy": not sampled,
                "unit_temperature": all(t in (0.0, 1.0) for t in temps),
                "top_k": [ks[i] for i in sampled],
                "uses_top_p": any(ps[i] < 1.0 for i in sampled),
            }

    @classmethod
    def from_settings(cls, settings: GenerationSettings, num_codebooks: int, device=None) -> "CodebookSampling":
        return cls(
            temperature=torch.tensor(settings.per_codebook("temperature", num_codebooks), dtype=torch.float32, device=device),
            top_k=torch.tensor(settings.per_codebook("top_k", num_codebooks), dtype=torch.long, device=device),
            top_p=torch.tensor(settings.per_codebook("top_p", num_codebooks), dtype=torch.float32, device=device),
        )

    @property
    def greedy(self) -> Tensor:
        """``[C]`` bool: codebooks decoded by argmax (temperature 0)."""
        return self.temperature == 0

    def candidates(self, num_codes: int) -> int:
        """Real codes a sampled codebook can draw from: the largest top-k (all codes where it is off)."""
        ks = [k if k > 0 else num_codes for k in self.host["top_k"]]
        return min(max(ks, default=1), num_codes)

    def to(self, device) -> "CodebookSampling":
        return CodebookSampling(self.temperature.to(device), self.top_k.to(device), self.top_p.to(device), self.host)


class FrameSampler:
    """The sampling kernel of one decoding run: ``[N, C, V]`` logits -> ``[N, C]`` tokens.

    ``eos_codebook`` is the codebook that decides the end; ``allow_eos`` (``[N]`` or a 0-dim
    bool tensor) says whether EOS may be drawn now (``min_frames``).
    """

    def __init__(self, params: CodebookSampling, specials: CodecSpecials, eos_codebook: int, device) -> None:
        self.params = params.to(device)
        self.specials = specials
        self.eos_codebook = eos_codebook
        C = params.temperature.shape[0]
        K = specials.cardinality
        self.num_codes = K
        self.kmax = params.candidates(K)
        host = params.host
        self.all_greedy = host["all_greedy"]
        self.scale = not host["unit_temperature"]
        self.uses_top_k = any(0 < k < self.kmax + 1 for k in host["top_k"])
        self.uses_top_p = host["uses_top_p"]
        p = self.params
        self.temperature = torch.where(p.greedy, torch.ones_like(p.temperature), p.temperature).view(1, C, 1)
        self.greedy = p.greedy.view(1, C)
        self.k_limit = torch.where(p.top_k > 0, p.top_k, torch.full_like(p.top_k, K + 1)).view(1, C, 1)
        self.p_limit = torch.where(p.greedy | (p.top_p >= 1.0), torch.full_like(p.top_p, 2.0), p.top_p).view(1, C, 1)
        self.is_eos_codebook = (torch.arange(C, device=device) == eos_codebook).view(1, C)
        self.eos_token = torch.full((1, 1, 1), specials.eos, dtype=torch.long, device=device)
        self.slot = torch.arange(self.kmax + 1, device=device).view(1, 1, -1)  # candidate positions

    # ------------------------------------------------------------------ the pieces
    def _eos_rule(self, logits: Tensor, best_real: Tensor, allow_eos: Tensor) -> Tensor:
        """``[N]`` bool: EOS may be drawn (allowed now and the deciding codebook's argmax)."""
        eos = logits[:, self.eos_codebook, self.specials.eos]
        if self.scale:
            eos = eos / self.temperature[0, self.eos_codebook, 0]
        return allow_eos & (eos > best_real[:, self.eos_codebook])

    def candidates(self, logits: Tensor, allow_eos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(filtered [N, C, 1 + kmax], tokens [N, C, 1 + kmax], first [N, C])``.

        ``filtered`` are the temperature-scaled logits of the candidates with ``-inf`` where
        a rule removes them (its softmax is the distribution a token is drawn from); position
        0 is EOS (``-inf`` unless it may be drawn), then the real codes in descending order.
        ``first`` is the most likely allowed token (what temperature 0 takes).
        """
        real = logits[..., : self.num_codes]  # the specials are the last three ids
        if self.scale:
            real = real / self.temperature
        values, codes = real.topk(self.kmax, dim=-1)  # [N, C, kmax], descending
        keep_eos = self._eos_rule(logits, values[..., 0], allow_eos)  # [N]
        live = self.is_eos_codebook & keep_eos.unsqueeze(-1)  # [N, C]: the EOS candidate exists
        eos = logits[:, self.eos_codebook, self.specials.eos].view(-1, 1, 1)
        if self.scale:
            eos = eos / self.temperature[0, self.eos_codebook, 0]
        filtered = torch.cat([torch.where(live.unsqueeze(-1), eos, NEG_INF), values], dim=-1)
        tokens = torch.cat([self.eos_token.expand(codes.shape[0], codes.shape[1], 1), codes], dim=-1)
        first = torch.where(live, self.specials.eos, codes[..., 0])
        if self.uses_top_k or self.uses_top_p:
            rank = self.slot - 1 + live.unsqueeze(-1).long()  # rank among the allowed tokens (EOS first)
            remove = rank >= self.k_limit if self.uses_top_k else torch.zeros_like(rank, dtype=torch.bool)
            if self.uses_top_p:
                probs = filtered.masked_fill(remove, NEG_INF).softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                remove = (remove | (mass_before >= self.p_limit)) & (rank > 0)  # the most likely token survives
            filtered = filtered.masked_fill(remove, NEG_INF)
        return filtered, tokens, first

    def sample(self, logits: Tensor, allow_eos: Tensor, uniforms: Tensor | None) -> Tensor:
        """Tokens ``[N, C]`` from masked-off logits ``[N, C, V]``; ``uniforms [N, C]`` in (0, 1)."""
        if self.all_greedy:
            best, code = logits[..., : self.num_codes].max(dim=-1)  # [N, C]
            keep_eos = self._eos_rule(logits, best, allow_eos)
            return torch.where(self.is_eos_codebook & keep_eos.unsqueeze(-1), self.specials.eos, code)
        if uniforms is None:
            raise ValueError("FrameSampler.sample: sampled codebooks need uniforms (counter_uniforms)")
        filtered, tokens, first = self.candidates(logits, allow_eos)
        cdf = filtered.softmax(dim=-1).cumsum(dim=-1)  # [N, C, K']
        target = uniforms.unsqueeze(-1) * cdf[..., -1:]
        index = torch.searchsorted(cdf, target).clamp_max(cdf.shape[-1] - 1)  # inverse CDF: an exact draw
        drawn = tokens.gather(-1, index).squeeze(-1)
        return torch.where(self.greedy, first, drawn)

    def distribution(self, logits: Tensor, allow_eos: Tensor) -> Tensor:
        """``[N, C, V]``: the probability of every token under the rules (greedy codebooks: one-hot)."""
        N, C, V = logits.shape
        filtered, tokens, first = self.candidates(logits, allow_eos)
        probs = torch.zeros(N, C, V, device=logits.device).scatter(-1, tokens, filtered.softmax(dim=-1))
        onehot = torch.zeros_like(probs).scatter(-1, first.unsqueeze(-1), 1.0)
        return torch.where(self.greedy.unsqueeze(-1), onehot, probs)


# ---------------------------------------------------------------------- counter-based randomness
_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply), on int64 tensors holding values < 2**32.

    The multiplier is < 2**27, so no product overflows int64.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def fold_seed(seed: int) -> int:
    """Any Python int -> the 32-bit key :func:`counter_uniforms` hashes."""
    seed = int(seed) % (1 << 64)
    return (seed ^ (seed >> 32)) & _MASK32


def counter_uniforms(seeds: Tensor, steps: Tensor, num_codebooks: int) -> Tensor:
    """Uniforms in (0, 1) of every (seed, step, codebook): ``seeds [N]`` (folded, int64), ``steps [S]`` -> ``[N, S, C]``.

    Each value is a function of its three indices only: the same request draws the same
    numbers in any batch and on any decoding path.
    """
    device = seeds.device
    codebooks = torch.arange(num_codebooks, device=device, dtype=torch.long)
    s = _mix32(seeds.long() & _MASK32).view(-1, 1, 1)
    t = _mix32((steps.long() + 0x2545F491) & _MASK32).view(1, -1, 1)
    c = _mix32((codebooks + 0x68E31DA4) & _MASK32).view(1, 1, -1)
    h = _mix32(_mix32(s ^ t) ^ c)
    return ((h >> 8).float() + 0.5) / float(1 << 24)  # 24 random bits: exact in float32, never 0 or 1
