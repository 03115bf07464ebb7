"""Turning next-frame logits ``[N, C, V]`` into one token per codebook.

The order is the authors' release's (and AudioCraft's): guidance, special-token rules,
temperature, top-k, top-p, then a draw. Every codebook has its own temperature, top-k and
top-p, so the coarse codebook can be sampled conservatively and the fine ones freely.

Special tokens: BOS and PAD are never sampled (the delay pattern places them, see
:func:`unimoe.model.delay.forced_tokens`); EOS may only be sampled in the codebook that
decides the end (the least delayed one) and only while it is that codebook's argmax, so a
long tail of small EOS probability never cuts a clip short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unimoe.generation.settings import GenerationSettings
from unimoe.model.delay import CodecSpecials


def guide(cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (``cond`` when there is no uncond)."""
    if uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


def mask_specials(logits: Tensor, specials: CodecSpecials, eos_codebook: int, allow_eos: Tensor) -> Tensor:
    """BOS/PAD never; EOS only in ``eos_codebook``, for rows with ``allow_eos [N]``, when it is the argmax.

    ``logits [N, C, V]`` -> a masked copy (``-inf`` where a token may not be drawn).
    """
    out = logits.clone()
    out[:, :, specials.pad] = float("-inf")
    out[:, :, specials.bos] = float("-inf")
    eos_is_top = out[:, eos_codebook].argmax(-1) == specials.eos  # [N]
    keep_eos = allow_eos & eos_is_top
    eos_logit = out[:, eos_codebook, specials.eos].clone()  # a copy: the next line overwrites the view
    out[:, :, specials.eos] = float("-inf")
    out[:, eos_codebook, specials.eos] = torch.where(keep_eos, eos_logit, torch.full_like(eos_logit, float("-inf")))
    return out


@dataclass
class CodebookSampling:
    """Per-codebook sampling parameters as tensors: ``temperature [C]``, ``top_k [C]`` (0 = off), ``top_p [C]``."""

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor

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

    def to(self, device) -> "CodebookSampling":
        return CodebookSampling(self.temperature.to(device), self.top_k.to(device), self.top_p.to(device))


def filter_logits(logits: Tensor, params: CodebookSampling) -> Tensor:
    """Temperature, then top-k, then top-p, per codebook: ``[N, C, V]`` -> logits with ``-inf`` where removed.

    The result's softmax is exactly the distribution a token is drawn from. Top-k keeps the
    k highest-ranked tokens (ties broken by the sort); top-p keeps, in descending order of
    probability, every token whose preceding mass is below p (so at least one token).
    Greedy codebooks (temperature 0) are returned unscaled; :func:`sample` takes their argmax.
    """
    N, C, V = logits.shape
    temp = torch.where(params.greedy, torch.ones_like(params.temperature), params.temperature)
    scaled = logits.float() / temp.view(1, C, 1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [N, C, V]
    rank = torch.arange(V, device=logits.device).view(1, 1, V)
    k = torch.where(params.top_k > 0, params.top_k, torch.full_like(params.top_k, V)).view(1, C, 1)
    remove = rank >= k  # [N, C, V] in sorted order
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = params.top_p.view(1, C, 1)
    remove = remove | ((mass_before >= p) & (p < 1.0))
    remove[..., 0] = False  # the most likely token always survives
    return scaled.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample(logits: Tensor, params: CodebookSampling, generators: list[torch.Generator] | None = None) -> Tensor:
    """Draw one token per row and codebook from masked logits ``[N, C, V]`` -> ``[N, C]`` long.

    Sampling is the Gumbel-max trick on :func:`filter_logits` (an exact draw from its
    softmax). With ``generators`` (one per row) each row's noise comes from its own stream,
    so a request's tokens do not depend on what else is in the batch.
    """
    N, C, V = logits.shape
    greedy_tokens = logits.argmax(dim=-1)  # [N, C]
    if bool(params.greedy.all()):
        return greedy_tokens
    filtered = filter_logits(logits, params)
    if generators is None:
        u = torch.rand(N, C, V, device=logits.device)
    else:
        if len(generators) != N:
            raise ValueError(f"sample: {len(generators)} generators for {N} rows")
        u = torch.stack([torch.rand(C, V, generator=g, device=logits.device) for g in generators])
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
    drawn = (filtered + gumbel).argmax(dim=-1)  # [N, C]
    return torch.where(params.greedy.view(1, C), greedy_tokens, drawn)
