"""Key/value caches for incremental decoding: a dynamic one and a static (fixed-shape) one.

Both hold keys/values for every layer (``[B, kv_heads, max_len, head_dim]`` each), allocated
once and written in place, and a length per row: a step of ``S`` tokens writes row ``b``'s
tokens at slots ``lengths[b] .. lengths[b] + S - 1`` (which are also their RoPE positions), so
right-padded prompts of different lengths prefill together and then decode in lockstep.
Slots past a row's length may hold stale values; the attention mask never reads them and the
next step overwrites them. Use under ``torch.no_grad()``.

* :class:`KVCache` (dynamic): attention reads only the prefix that is in use (a host-side
  bound, no device sync) and rows can be dropped (:meth:`KVCache.select`) when their requests
  finish, so a batch costs what its live rows cost. Shapes change every step.
* :class:`StaticKVCache`: its buffers never change shape or address, rows are never dropped,
  and while ``torch.compile`` traces a step attention reads all ``max_len`` slots under a mask,
  so the step is compiled once and replayed as a CUDA graph. Run eagerly it reads only the
  used prefix (a host-side bound that compiled code never touches): a full-length read costs
  attention time for nothing when there is no graph to keep fixed. It is an ``nn.Module`` whose
  buffers are marked as static addresses, and it carries the rotary table of its slots, so a
  step looks positions up instead of recomputing sines.

The interface the attention layers use is the same: ``positions(S)``, ``attention_mask``,
``write``, ``advance``, and ``rope(positions)`` (None = compute RoPE from the positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unimoe.model.layers import rope_table


class KVCache:
    """Dynamic cache: reads the used prefix, drops finished rows (see the module doc)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._bound = 0  # host-side upper bound of lengths.max(): avoids a device sync per step

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def positions(self, steps: int) -> Tensor:
        """Cache slots (= RoPE positions) of the next ``steps`` tokens of each row: ``[B, S]``."""
        if self._bound + steps > self.max_len:
            raise ValueError(
                f"KVCache is full: {self._bound} positions used + {steps} new > max_len {self.max_len}; "
                f"allocate a longer cache (model.new_cache(..., max_len=...))"
            )
        return self.lengths.unsqueeze(1) + torch.arange(steps, device=self.lengths.device)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """No table: the model computes RoPE from the positions."""
        return None

    def attention_mask(self, positions: Tensor) -> Tensor:
        """``[B, 1, S, kv_len]`` bool: query at position p sees cache slots ``<= p``."""
        kv_len = self._bound + positions.shape[1]
        slots = torch.arange(kv_len, device=positions.device)
        return (slots.view(1, 1, 1, -1) <= positions.view(positions.shape[0], 1, -1, 1))

    def write(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, kv_heads, S, hd]`` at ``positions [B, S]``; return the readable prefix."""
        index = positions.view(positions.shape[0], 1, -1, 1).expand_as(k)
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))
        kv_len = self._bound + positions.shape[1]
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def advance(self, steps: int, input_lengths: Tensor | None = None) -> None:
        """After a step of ``steps`` tokens: rows grow by ``input_lengths [B]`` (default all)."""
        self.lengths += steps if input_lengths is None else input_lengths.to(self.lengths)
        self._bound = min(self.max_len, self._bound + steps)

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. drop finished requests."""
        self.k, self.v, self.lengths = self.k[:, rows], self.v[:, rows], self.lengths[rows]

    def reset(self) -> None:
        self.lengths.zero_()
        self._bound = 0


class StaticKVCache(nn.Module):
    """Fixed-shape cache for compiled decoding (see the module doc).

    ``cos`` / ``sin`` are the rotary table of every slot (the values
    :func:`~unimoe.model.layers.rope_cos_sin` gives, ``rope_scaling`` included). The caller sizes ``max_len`` for prompt +
    every decoded step: a write past it is an index error, not a silent wrap.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        rope_theta: float,
        rope_scaling: dict | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # One buffer per layer (not a view of one big tensor): compiled in-place writes then stay
        # in place instead of being functionalised into copies of the whole cache.
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device).unsqueeze(1), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)
        cos, sin = rope_table(max_len, head_dim, rope_theta, dtype=dtype, device=device, scaling=rope_scaling)
        self.register_buffer("cos", cos, persistent=False)  # [max_len, hd]
        self.register_buffer("sin", sin, persistent=False)
        self.max_len = max_len
        self._bound = 0  # eager only: host-side upper bound of lengths.max() (compiled steps neither read nor move it)
        for buffer in self.buffers():  # CUDA graphs may keep pointers to these: never reallocated
            mark_static_address(buffer)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def _window(self, steps: int) -> int:
        """Slots attention reads: all of them while compiling (fixed shapes), else the used prefix."""
        if torch.compiler.is_compiling():
            return self.max_len
        if self._bound + steps > self.max_len:
            raise ValueError(f"StaticKVCache is full: {self._bound} positions used + {steps} new > max_len {self.max_len}")
        return self._bound + steps

    def positions(self, steps: int) -> Tensor:
        return self.lengths.unsqueeze(1) + self.slots[:steps]

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin [B, 1, S, hd]`` of ``positions [B, S]``, looked up in the table."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def attention_mask(self, positions: Tensor) -> Tensor:
        """``[B, 1, S, window]`` bool: query at position p sees slots ``<= p``."""
        slots = self.slots[: self._window(positions.shape[1])]
        return slots.view(1, 1, 1, -1) <= positions.view(positions.shape[0], 1, -1, 1)

    def write(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")  # buffers: what the module's .to() moved
        if k.dtype != keys.dtype:
            k, v = k.to(keys.dtype), v.to(values.dtype)
        keys[self.rows, :, positions] = k.transpose(1, 2)  # [B, S, KV, hd] at (row, slot)
        values[self.rows, :, positions] = v.transpose(1, 2)
        window = self._window(positions.shape[1])
        if window == self.max_len:
            return keys, values
        return keys[:, :, :window], values[:, :, :window]

    def advance(self, steps: int, input_lengths: Tensor | None = None) -> None:
        if input_lengths is None:
            self.lengths.add_(steps)
        else:
            self.lengths.add_(input_lengths.to(self.lengths.dtype))
        if not torch.compiler.is_compiling():
            self._bound = min(self.max_len, self._bound + steps)

    def select(self, rows: Tensor) -> None:
        raise TypeError("StaticKVCache keeps its rows for its whole life (fixed shapes); finished rows stay "
                        "and are masked. Use the dynamic KVCache to drop rows")

    def reset(self) -> None:
        self.lengths.zero_()
        self._bound = 0


def mark_static_address(tensor: Tensor) -> None:
    """Tell torch.compile / CUDA graphs that ``tensor`` keeps its storage (as HF's StaticCache does)."""
    marker = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if marker is not None:
        marker(tensor)
