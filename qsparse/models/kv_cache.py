"""The key/value cache of every decode path and the attention mask over it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .rope import RotaryEmbedding

if TYPE_CHECKING:
    from .config import LlamaConfig

__all__ = ["KVCache", "causal_mask", "static_mask"]


class KVCache:
    """Preallocated key/value cache for generation, the one cache of every decode path.

    Per layer it holds ``k``/``v`` tensors [B, H_kv, max_len, D]. Two ways to track the
    write position:

    - ``static=False``: ``length`` (a Python int) positions are written; :meth:`update`
      returns the written prefix [B, H_kv, length + T, D] (shapes grow step by step).
    - ``static=True``: the position is the device tensor ``pos`` [1] and :meth:`update`
      returns the whole buffers [B, H_kv, max_len, D] (the caller masks keys past the
      query). Every step then has the same shapes and no host sync, so one captured CUDA
      graph (or one ``torch.compile`` graph) serves every position. It also holds the RoPE
      tables of every position, ``rope = (cos, sin)`` [max_len, D] in the cache's dtype
      (:class:`~qsparse.models.rope.RotaryEmbedding` of the config, computed once here), which
      the forward reads by position instead of recomputing them per step (and per layer, where
      a compiler inlines the computation into each consumer).

    :meth:`positions` gives the positions of the next T tokens, :meth:`advance` moves past
    them (``LlamaModel.forward`` calls both).
    """

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        static: bool = False,
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0
        self.static = static
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if static:
            rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
            cos, sin = rotary(torch.arange(max_len, device=device)[None], dtype)
            self.rope = (cos[0], sin[0])
        self._slots: torch.Tensor | None = None  # static: positions the current forward writes

    def reset(self) -> None:
        """Start over at position 0 (the buffers are kept; old entries are masked/overwritten)."""
        self.length = 0
        self.pos.zero_()

    def positions(self, t: int) -> torch.Tensor:
        """Positions [T] of the next ``t`` tokens (``pos + arange(t)`` when static)."""
        if self.static:
            self._slots = self.pos + torch.arange(t, device=self.pos.device)
            return self._slots
        return torch.arange(self.length, self.length + t, device=self.pos.device)

    def rope_at(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE tables (cos, sin) [1, T, D] of ``positions`` [T] read from :attr:`rope`, or
        None where this cache holds none in ``dtype`` (not static, or another dtype)."""
        if self.rope is None or self.rope[0].dtype != dtype:
            return None
        return self.rope[0][positions][None], self.rope[1][positions][None]

    def slots(self, t: int) -> torch.Tensor:
        """Positions [T] the current static forward writes (what :meth:`positions` returned),
        for a layer that writes the cache itself (the fused decode attention).

        Raises:
            ValueError: not static, or :meth:`positions` was not called for ``t`` tokens.
        """
        if not self.static or self._slots is None or self._slots.numel() != t:
            raise ValueError(
                "KVCache: call positions(T) on a static cache before writing T positions"
            )
        return self._slots

    def advance(self, t: int) -> None:
        """Mark ``t`` more positions as written."""
        if self.static:
            self.pos.add_(t)
        else:
            self.length += t

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` [B, H_kv, T, D] at the next T positions of layer ``layer_idx`` and
        return the cached keys/values: [B, H_kv, length+T, D], or the whole [B, H_kv, max_len,
        D] buffers when static (after :meth:`positions`)."""
        if self.static:
            slots = self.slots(k.shape[2])
            self.keys[layer_idx].index_copy_(2, slots, k)
            self.values[layer_idx].index_copy_(2, slots, v)
            return self.keys[layer_idx], self.values[layer_idx]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: {end} positions needed but max_len is {self.max_len}."
            )
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def causal_mask(
    q_len: int,
    past: int,
    key_padding: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, T, S] (True = attend) or None when ``is_causal`` suffices.

    Query i (absolute position past+i) sees key j iff ``j <= past + i`` and key j is not
    padding; every query always sees itself so no row is fully masked (padding positions get
    finite, ignored outputs instead of NaN).
    """
    if key_padding is None and past == 0:
        return None  # plain causal: SDPA's is_causal
    s = past + q_len
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if key_padding is not None:
        keep = key_padding[:, None, None, :s].bool()  # [B, 1, 1, S]
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask


def static_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean mask [1, 1, T, max_len] (True = attend) over a static cache's whole buffer:
    query at ``positions[i]`` sees the keys at positions ``<= positions[i]``."""
    keys = torch.arange(max_len, device=positions.device)
    return (keys[None, :] <= positions[:, None])[None, None]
