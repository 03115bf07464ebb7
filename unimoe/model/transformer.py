"""The audio language model: a decoder-only transformer over text, codec frames and video.

Reading order: :class:`Attention`, :class:`Block`, :class:`AudioLM` (RMSNorm and the
rotary helpers are in :mod:`unimoe.model.layers`, the decoding caches in
:mod:`unimoe.model.kv_cache`). One position of the sequence is a text token, a delayed codec
frame (the sum of its ``C`` codebook embeddings) or a visual soft token; one linear head
predicts all ``C`` codebooks of the next frame at once (``hidden -> C x V``). The FFN of a
block is a dense SwiGLU (specialists) or the Dynamic-Capacity MoE layer; both return
``(y, routing_info_or_None)``, so the block does not care which.

Incremental decoding writes keys/values into a preallocated cache with a length per row
(:mod:`unimoe.model.kv_cache`): prompts of different lengths are right-padded (the same
layout as training) and each row appends its new tokens at its own length, so no left
padding or position shifting is needed. :meth:`AudioLM.step` is the decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unimoe.model.batch import IGNORE_INDEX, Batch, Modality
from unimoe.model.config import AudioLMConfig
from unimoe.model.delay import CodecSpecials
from unimoe.model.kv_cache import KVCache, StaticKVCache
from unimoe.model.layers import RMSNorm, apply_rope, rope_cos_sin, rotate_half  # noqa: F401  (re-exported)
from unimoe.model.params import count_parameters, params_on_meta
from unimoe.model.vision import build_vision_encoder
from unimoe.moe.ffn import SwiGLU
from unimoe.moe.layer import build_moe_layer
from unimoe.moe.stats import ExpertCounts, LayerMeans, RoutingInfo, StatsMode, mean_over_layers

DecodeCache = KVCache | StaticKVCache


# ---------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Grouped-query attention (``num_kv_heads`` shared by ``num_heads``) with RoPE."""

    def __init__(self, cfg: AudioLMConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: DecodeCache | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, L, hd]
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_index, positions, k, v)  # [B, KV, kv_len, hd]
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        if L == 1 and mask is not None and torch.compiler.is_compiling():
            y = single_query_attention(q, k, v, mask)  # compiled decoding: inductor fuses it; a kernel call does not
        else:
            # Without a cache, right padding makes the plain causal mask exact for real tokens.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per row, written out: ``q [B, H, 1, hd]``, ``k, v [B, KV, T, hd]``,
    ``mask [B, 1, 1, T]`` bool -> ``[B, H, 1, hd]``.

    Grouped-query heads are a reshape (head ``h`` reads kv head ``h // (H / KV)``, as SDPA's
    ``enable_gqa``), so no key is copied. Under ``torch.compile`` this becomes two small matmuls
    and one fused softmax kernel, cheaper for a single query than the flash-attention kernel.
    """
    B, H, _, hd = q.shape
    KV = k.shape[1]
    scores = q.reshape(B, KV, H // KV, hd) @ k.transpose(-1, -2) * hd ** -0.5  # [B, KV, G, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).reshape(B, H, 1, hd)


class Block(nn.Module):
    """Pre-norm: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; ffn is SwiGLU or MoE."""

    def __init__(self, cfg: AudioLMConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_index)
        self.ffn = build_moe_layer(cfg.hidden_size, cfg.moe) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        token_mask: Tensor | None,
        task_ids: Tensor | None,
        cache: DecodeCache | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        stats: StatsMode = "full",
    ) -> tuple[Tensor, RoutingInfo | ExpertCounts | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, positions, mask)
        y, info = self.ffn(self.ffn_norm(x), token_mask, task_ids, stats=stats)
        return x + y, info


# ---------------------------------------------------------------------- the model
@dataclass
class AudioLMOutput:
    """What one forward returns. Losses are None without labels.

    ``loss`` is the audio cross entropy only: the sum over codebooks of each codebook's
    mean next-frame CE. MoE auxiliary losses are in ``aux``, unweighted and averaged over
    MoE layers (``mean_over_layers``), for the training stage to weight (annealed) and add
    (``MoEConfig.aux_loss(out.routing, step)`` gives the weighted sum); ``routing`` keeps
    each layer's RoutingInfo for statistics and global-batch balancing.
    """

    logits: Tensor | None
    """``[B, L, C, V]`` (logits="all"), ``[B, C, V]`` at each row's last real position ("last"), or None."""
    hidden: Tensor
    """Final-norm hidden states ``[B, L, D]``."""
    loss: Tensor | None = None
    codebook_losses: Tensor | None = None
    """``[C]`` mean CE of each codebook over its labelled positions (0 where none)."""
    task_losses: dict[int, Tensor] = field(default_factory=dict)
    """Task id -> sum over codebooks of that task's per-codebook mean CE (tasks present only)."""
    token_loss: Tensor | None = None
    """``[B, C, L]`` CE per position and codebook (0 where the label is ignored)."""
    num_targets: Tensor | None = None
    """``[C]`` labelled positions per codebook (the denominators of ``codebook_losses``)."""
    aux: LayerMeans | None = None
    """Unweighted MoE aux losses (load_balance, z_loss, entropy) averaged over MoE layers; zeros when dense."""
    routing: list[RoutingInfo | None] = field(default_factory=list)
    """Per layer: the MoE layer's RoutingInfo, or None for a dense FFN."""
    text_logits: Tensor | None = None
    """``[B, L, text_vocab]`` when the config has ``text_head`` and it was asked for."""


class AudioLM(nn.Module):
    """The UniMoE-Audio language model. ``AudioLM(AudioLMConfig.from_preset("tiny"))``."""

    def __init__(self, config: AudioLMConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.specials = CodecSpecials(cfg.codebook_size)
        self.text_vocab_size = cfg.resolved_text_vocab_size()
        C, V, D = cfg.num_codebooks, cfg.audio_vocab_size, cfg.hidden_size
        self.text_embed = nn.Embedding(self.text_vocab_size, D)
        # One table for all codebooks (row k*V + code): a frame embedding is a single
        # embedding_bag sum instead of C lookups and C [B, L, D] temporaries.
        self.audio_embed = nn.Embedding(C * V, D)
        self.register_buffer("codebook_offsets", torch.arange(C) * V, persistent=False)
        self.vision = None
        if cfg.vision is not None:
            self.vision = build_vision_encoder(cfg.vision, hidden_size=D)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.audio_head = nn.Linear(D, C * V, bias=False)
        # A tied text head has no weight of its own: text logits use text_embed.weight (text_logits_of).
        self.text_head = nn.Linear(D, self.text_vocab_size, bias=False) if cfg.text_head and not cfg.tie_text_head else None
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.vision_every_batch = False  # set by unimoe.training.parallel: run the encoder on every rank, every batch
        self._init_own_weights()

    def _init_own_weights(self) -> None:
        """Normal(0, init_std) for embeddings/projections, residual outputs scaled by 1/sqrt(2 L).

        FFN modules (SwiGLU / MoE) keep the initialisation their constructors chose.
        """
        std = self.config.init_std
        for emb in (self.text_embed, self.audio_embed):
            nn.init.normal_(emb.weight, std=std)
        for head in (self.audio_head, self.text_head):
            if head is not None:
                nn.init.normal_(head.weight, std=std)
        for block in self.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.o_proj.weight, std=std / (2 * self.config.num_layers) ** 0.5)

    # ------------------------------------------------------------------ pieces
    def embed(self, text_ids: Tensor, audio_codes: Tensor, modality: Tensor, video: Tensor | None = None) -> Tensor:
        """Input embeddings ``[B, L, D]``: text rows, summed codebook rows, or visual tokens; 0 at padding.

        VISION positions are filled from ``video`` in row-major order (0 without video).
        """
        B, L = modality.shape
        C = self.config.num_codebooks
        is_text = (modality == Modality.TEXT).unsqueeze(-1)
        is_audio = (modality == Modality.AUDIO).unsqueeze(-1)
        text = self.text_embed(torch.where(is_text.squeeze(-1), text_ids, 0))
        codes = torch.where(is_audio.transpose(1, 2), audio_codes, self.specials.pad)  # [B, C, L]
        rows = (codes + self.codebook_offsets.view(1, C, 1)).transpose(1, 2).reshape(B * L, C)
        audio = F.embedding_bag(rows, self.audio_embed.weight, mode="sum").view(B, L, -1)
        x = torch.where(is_text, text, torch.where(is_audio, audio, torch.zeros_like(audio)))
        is_vision = modality == Modality.VISION
        if video is not None:
            if self.vision is None:
                raise ValueError("batch has video frames but the model has no vision encoder (AudioLMConfig.vision)")
            tokens = self.vision(video)  # [N, T_v, D]
            n_slots = int(is_vision.sum())
            if n_slots != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"batch has {n_slots} vision positions but the encoder produced {tokens.shape[0]} x {tokens.shape[1]} tokens"
                )
            x = x.masked_scatter(is_vision.unsqueeze(-1), tokens.to(x.dtype))
        elif self.vision is not None and self.vision_every_batch:
            # Sharded training: the encoder's weights are gathered and its gradients reduced by
            # collectives every rank must join, so a batch without video runs one blank clip, weighted 0.
            frames, (h, w) = self.vision.input_frames, self.vision.input_size
            blank = x.new_zeros(1, frames, 3, h, w, dtype=torch.float32)
            x = x + 0.0 * self.vision(blank).sum().to(x.dtype)
        return x

    def embed_audio(self, codes: Tensor) -> Tensor:
        """Embeddings ``[B, S, D]`` of audio frames ``codes [B, C, S]`` (what :meth:`embed` gives audio positions)."""
        B, C, S = codes.shape
        rows = (codes + self.codebook_offsets.view(1, C, 1)).transpose(1, 2).reshape(B * S, C)
        return F.embedding_bag(rows, self.audio_embed.weight, mode="sum").view(B, S, -1)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty dynamic cache for ``batch_size`` rows (default length ``config.max_seq_len``)."""
        ref = self.audio_head.weight
        return KVCache(
            self.config.num_layers, batch_size, self.config.num_kv_heads, self.config.head_size,
            max_len or self.config.max_seq_len, dtype=dtype or ref.dtype, device=device or ref.device,
        )

    def new_static_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None, device=None
    ) -> StaticKVCache:
        """An empty fixed-shape cache (compiled decoding); ``max_len`` must hold prompt + every step."""
        ref = self.audio_head.weight
        return StaticKVCache(
            self.config.num_layers, batch_size, self.config.num_kv_heads, self.config.head_size, max_len,
            rope_theta=self.config.rope_theta, rope_scaling=self.config.rope_scaling,
            dtype=dtype or ref.dtype, device=device or ref.device,
        )

    def backbone(
        self,
        x: Tensor,
        *,
        token_mask: Tensor | None = None,
        task_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: DecodeCache | None = None,
        input_lengths: Tensor | None = None,
        stats: StatsMode = "full",
    ) -> tuple[Tensor, list[RoutingInfo | ExpertCounts | None]]:
        """Embeddings ``[B, L, D]`` -> final-norm hidden ``[B, L, D]`` and per-layer routing.

        With a cache the positions come from it and the cache advances by
        ``input_lengths`` (default: every row by L); otherwise ``position_ids`` (default arange).
        ``stats`` is what the MoE layers report (``"counts"``: experts per token only).
        """
        B, L, _ = x.shape
        mask = positions = None
        rope = None
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows but the input has {B}")
            positions = cache.positions(L)
            mask = cache.attention_mask(positions)
            rope = cache.rope(positions)
            rope_pos = positions
        else:
            rope_pos = position_ids if position_ids is not None else torch.arange(L, device=x.device).expand(B, L)
        cos, sin = rope if rope is not None else rope_cos_sin(
            rope_pos, self.config.head_size, self.config.rope_theta, x.dtype, self.config.rope_scaling
        )
        routing: list[RoutingInfo | ExpertCounts | None] = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and cache is None:
                x, info = checkpoint(block, x, cos, sin, token_mask, task_ids, use_reentrant=False)
            else:
                x, info = block(x, cos, sin, token_mask, task_ids, cache, positions, mask, stats=stats)
            routing.append(info)
        if cache is not None:
            cache.advance(L, input_lengths)
        return self.norm(x), routing

    def head(self, hidden: Tensor) -> Tensor:
        """``[..., D] -> [..., C, V]`` float32 logits for all codebooks of the next frame."""
        C, V = self.config.num_codebooks, self.config.audio_vocab_size
        return self.audio_head(hidden).float().unflatten(-1, (C, V))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        batch: Batch,
        *,
        cache: DecodeCache | None = None,
        logits: Literal["all", "last", "none"] = "all",
        text_logits: bool = False,
        stats: StatsMode = "full",
    ) -> AudioLMOutput:
        """Run a collated :class:`Batch` (training, evaluation, or a prefill into ``cache``).

        Losses are computed when ``batch.labels`` is set, on the labelled positions only
        (the head is not applied to text, vision, prompt or padding positions for the loss),
        so training should pass ``logits="none"``: full logits are ``B x L x C x V`` floats.
        ``logits="last"`` gives each row's next-frame logits after a prefill. ``stats="counts"``
        (decoding) makes the MoE layers report experts per token only; ``aux`` is then None.
        """
        if batch.video is None and bool((batch.modality == Modality.VISION).any()):
            raise ValueError("batch has vision positions but no video frames")
        self.begin_forward()
        x = self.embed(batch.text_ids, batch.audio_codes, batch.modality, batch.video)
        token_mask = batch.attention_mask
        hidden, routing = self.backbone(
            x, token_mask=token_mask, task_ids=batch.task_ids, position_ids=batch.position_ids,
            cache=cache, input_lengths=token_mask.sum(1) if cache is not None else None, stats=stats,
        )
        out = AudioLMOutput(logits=None, hidden=hidden, routing=routing)
        out.aux = mean_over_layers(routing) if stats == "full" else None
        if logits == "all":
            out.logits = self.head(hidden)
        elif logits == "last":
            last = token_mask.sum(1) - 1  # right padding: the last real position of each row
            out.logits = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        elif logits != "none":
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        if text_logits:
            out.text_logits = self.text_logits_of(hidden)
        if batch.labels is not None:
            self._loss(out, batch.labels, batch.task_ids, full_logits=out.logits if logits == "all" else None)
        return out

    def text_logits_of(self, hidden: Tensor) -> Tensor:
        """``[..., D] -> [..., text_vocab]`` float32 logits of the text head (tied or not)."""
        if not self.config.text_head:
            raise ValueError("text logits need AudioLMConfig.text_head=True")
        weight = self.text_embed.weight if self.config.tie_text_head else self.text_head.weight
        return F.linear(hidden, weight).float()

    def step(
        self,
        codes: Tensor,
        cache: DecodeCache,
        *,
        task_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        stats: StatsMode = "full",
    ) -> AudioLMOutput:
        """Decode: append audio frames ``codes [B, C]`` (or ``[B, C, S]``) to every row of ``cache``.

        Returns logits ``[B, S, C, V]`` for the frame after each appended one. ``token_mask``
        (``[B]`` or ``[B, S]`` bool) keeps rows out of the MoE routing (finished requests of a
        fixed-shape batch: no expert compute, not counted); ``stats="counts"`` makes the MoE
        layers report only experts per token (:class:`~unimoe.moe.stats.ExpertCounts`), which
        is all decoding needs, and leaves ``aux`` None.
        """
        if codes.dim() == 2:
            codes = codes.unsqueeze(-1)
        B, C, S = codes.shape
        if C != self.config.num_codebooks:
            raise ValueError(f"codes has {C} codebooks, the model {self.config.num_codebooks}")
        if task_ids is not None and task_ids.dim() == 1:
            task_ids = task_ids.unsqueeze(1).expand(B, S)
        if token_mask is not None and token_mask.dim() == 1:
            token_mask = token_mask.unsqueeze(1).expand(B, S)
        self.begin_forward()
        hidden, routing = self.backbone(self.embed_audio(codes), token_mask=token_mask, task_ids=task_ids, cache=cache,
                                        stats=stats)
        aux = mean_over_layers(routing) if stats == "full" else None
        return AudioLMOutput(logits=self.head(hidden), hidden=hidden, routing=routing, aux=aux)

    def _loss(self, out: AudioLMOutput, labels: Tensor, task_ids: Tensor | None, full_logits: Tensor | None) -> None:
        """Per-codebook mean CE over labelled positions, summed over codebooks; per task too."""
        B, C, L = labels.shape
        if C != self.config.num_codebooks:
            raise ValueError(f"labels has {C} codebooks, the model {self.config.num_codebooks}")
        labels_t = labels.transpose(1, 2)  # [B, L, C]
        selected = (labels_t != IGNORE_INDEX).any(-1)  # [B, L]
        target = labels_t[selected]  # [N, C]
        if full_logits is not None:
            logits = full_logits[selected]  # [N, C, V]
        else:
            logits = self.head(out.hidden[selected])
        N, V = target.shape[0], logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(N * C, V), target.reshape(N * C), ignore_index=IGNORE_INDEX, reduction="none")
        ce = ce.view(N, C)
        valid = (target != IGNORE_INDEX).to(ce.dtype)
        counts = valid.sum(0)  # [C]
        out.codebook_losses = ce.sum(0) / counts.clamp(min=1)
        out.loss = out.codebook_losses.sum()
        out.num_targets = counts
        token_loss = ce.new_zeros(B, L, C)
        token_loss[selected] = ce
        out.token_loss = token_loss.transpose(1, 2)
        if task_ids is not None and N > 0:
            tasks = task_ids[selected]  # [N]
            num_tasks = int(tasks.max()) + 1
            sums = ce.new_zeros(num_tasks, C).index_add_(0, tasks, ce)
            cnts = ce.new_zeros(num_tasks, C).index_add_(0, tasks, valid)
            per_task = (sums / cnts.clamp(min=1)).sum(1)  # [num_tasks]
            present = (cnts.sum(1) > 0).tolist()
            out.task_losses = {t: per_task[t] for t in range(num_tasks) if present[t]}

    def begin_forward(self) -> None:
        """Called once per model-level forward (not per checkpointed recompute): routers with a
        feedback controller apply the update measured in the previous forward here."""
        for block in self.blocks:
            if block.is_moe:
                block.ffn.router.begin_forward()

    def set_top_p(self, top_p: float | None) -> None:
        """Override the top-p of every MoE layer (adaptive compute at inference); None restores it."""
        for block in self.blocks:
            if block.is_moe:
                block.ffn.top_p = top_p

    def set_expert_budget(self, experts_per_token: float | None) -> None:
        """Hold a mean number of real experts per token in every MoE layer (a feedback controller on
        the routers' threshold, :mod:`unimoe.moe.budget`); None removes it."""
        for block in self.blocks:
            if block.is_moe:
                block.ffn.router.set_budget(experts_per_token)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, active: int | str | None = None) -> int:
        """Parameter count: total (``active=None``) or touched by one token (see :mod:`unimoe.model.params`)."""
        return count_parameters(self, active=active)


def meta_model(config: AudioLMConfig) -> AudioLM:
    """The model of ``config`` with meta parameters: for counting and shape inspection only (no memory)."""
    with params_on_meta():
        return AudioLM(config)
