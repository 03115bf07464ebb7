"""A plain MusicGen-style decoder: the peer that ``unimoe bench generate`` measures decoding against.

Written from the description of AudioCraft's ``LMModel`` (MusicGen's decoder, AudioCraft 1.3)
in its MusicGen configuration, doing per decoding step what that model does, so that the
benchmark compares like with like without making AudioCraft a dependency:

* input = the sum of ``n_q`` separate codebook embeddings (vocabulary ``card + 1``: the extra
  token is the pattern's special token), plus a sinusoidal position embedding;
* pre-norm (LayerNorm) blocks without biases: one packed q/k/v projection, keys and values
  appended to the streaming state with ``torch.cat``, scaled dot-product attention, output
  projection; a GELU feed-forward of ``4 x dim``;
* a final LayerNorm and ``n_q`` separate output projections stacked to ``[B, n_q, card]``;
* sampling: ``softmax(logits / temperature)``, top-k by thresholding the probabilities at
  the k-th largest, renormalising and ``torch.multinomial``;
* the delay pattern: codebook ``k`` lags by ``delays[k]`` steps; positions outside the
  pattern are overwritten with the special token after each draw, and each step's tokens
  are written into the interleaved sequence with ``torch.where``.

Unconditional (no text conditioning, no CFG), batch-first, random weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ReferenceDecoderConfig:
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_scale: int = 4
    n_q: int = 8
    card: int = 1024
    max_period: float = 10_000.0


def sin_embedding(positions: Tensor, dim: int, max_period: float) -> Tensor:
    """``positions [B, T, 1]`` -> ``[B, T, dim]``: cosines then sines of geometric frequencies."""
    half = dim // 2
    steps = torch.arange(half, device=positions.device, dtype=torch.float32).view(1, 1, -1)
    period = torch.full([], max_period, device=positions.device, dtype=torch.float32)
    phase = positions.float() / (period ** (steps / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class StreamingSelfAttention(nn.Module):
    """Causal multi-head self-attention whose keys/values grow by concatenation while streaming."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.past_k: Tensor | None = None
        self.past_v: Tensor | None = None

    def reset(self) -> None:
        self.past_k = self.past_v = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        packed = self.in_proj(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = packed.permute(0, 2, 3, 1, 4).unbind(dim=1)  # [B, H, T, hd] each
        if self.past_k is not None:
            k = torch.cat([self.past_k, k], dim=2)
            v = torch.cat([self.past_v, v], dim=2)
        self.past_k, self.past_v = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # one query sees every past key
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class ReferenceLayer(nn.Module):
    def __init__(self, cfg: ReferenceDecoderConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_scale * cfg.dim
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.self_attn = StreamingSelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linear1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class ReferenceDecoder(nn.Module):
    """``ReferenceDecoder(cfg).generate(frames, delays)`` -> codes ``[B, n_q, frames]``."""

    def __init__(self, cfg: ReferenceDecoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ReferenceDecoderConfig()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"ReferenceDecoder: dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.special = cfg.card
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.layers = nn.ModuleList(ReferenceLayer(cfg) for _ in range(cfg.num_layers))
        self.out_norm = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linears = nn.ModuleList(nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_q))
        self.offset = 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset(self) -> None:
        self.offset = 0
        for layer in self.layers:
            layer.self_attn.reset()

    def forward(self, codes: Tensor) -> Tensor:
        """``codes [B, n_q, T]`` (continuing the stream) -> logits ``[B, n_q, T, card]``."""
        B, K, T = codes.shape
        x = sum(self.emb[k](codes[:, k]) for k in range(K))
        positions = torch.arange(T, device=codes.device).view(1, -1, 1) + self.offset
        x = x + sin_embedding(positions, self.cfg.dim, self.cfg.max_period)
        for layer in self.layers:
            x = layer(x)
        self.offset += T
        out = self.out_norm(x)
        return torch.stack([self.linears[k](out) for k in range(K)], dim=1)

    @torch.no_grad()
    def generate(self, frames: int, delays: Sequence[int], *, batch_size: int = 1, temperature: float = 1.0,
                 top_k: int = 250, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``frames`` frames through the delay pattern; returns undelayed codes ``[B, n_q, frames]``."""
        K, D = self.cfg.n_q, max(delays)
        if len(delays) != K:
            raise ValueError(f"ReferenceDecoder.generate: {len(delays)} delays for {K} codebooks")
        device = self.linears[0].weight.device
        steps = frames + D + 1  # step 0 is the all-special start frame
        src = torch.arange(steps, device=device).view(1, -1) - 1 - torch.tensor(list(delays), device=device).view(-1, 1)
        valid = (src >= 0) & (src < frames)  # [K, S]: positions the pattern fills with real codes
        unknown = -1
        sequence = torch.full((batch_size, K, steps), unknown, dtype=torch.long, device=device)
        sequence[:, :, 0] = self.special
        self.reset()
        previous = 0
        for offset in range(1, steps):
            logits = self(sequence[..., previous:offset])[:, :, -1]  # [B, K, card]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_k > 0:
                    kth = torch.topk(probs, top_k, dim=-1).values[..., [-1]]
                    probs = probs * (probs >= kth).float()
                    probs = probs / probs.sum(dim=-1, keepdim=True)
                token = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
                token = token.view(batch_size, K, 1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            token[~valid[:, offset : offset + 1].expand(batch_size, -1, -1)] = self.special
            current = sequence[..., offset : offset + 1]
            sequence[..., offset : offset + 1] = torch.where(current == unknown, token, current)
            previous = offset
        self.reset()
        index = (1 + torch.arange(frames, device=device).view(1, -1) + torch.tensor(list(delays), device=device).view(-1, 1))
        return sequence.gather(2, index.unsqueeze(0).expand(batch_size, -1, -1))


def timed_generate(model: ReferenceDecoder, frames: int, delays: Sequence[int], **kwargs) -> tuple[Tensor, float]:
    """``generate`` and its wall time in seconds (CUDA synchronised)."""
    device = model.linears[0].weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    codes = model.generate(frames, delays, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return codes, time.perf_counter() - start


def init_like_musicgen_(model: ReferenceDecoder) -> None:
    """Gaussian init with std 1/sqrt(fan_in) (MusicGen's ``weight_init: gaussian``); weights are random either way."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(m.in_features))
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=1 / math.sqrt(m.embedding_dim))
