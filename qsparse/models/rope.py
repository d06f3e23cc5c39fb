"""Rotary position embeddings (RoPE) of the qsparse Llama, HF's ``rotate_half`` convention.

The one RoPE of the project: training, evaluation and every decode path
(:class:`qsparse.generate.DecodeEngine` runs the model's own layers) use it. Shapes: ``B``
batch, ``H``/``H_kv`` query/key heads, ``T`` positions, ``D`` head dimension.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Split the last dim in halves ``[x1, x2]`` and return ``[-x2, x1]`` (HF convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [B, H, T, D] and ``k`` [B, H_kv, T, D] by position: ``x·cos + rot(x)·sin``.

    ``cos``/``sin`` are [B or 1, T, D] and broadcast over heads.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """Default RoPE tables. ``inv_freq[i] = theta^(-2i/D)``; for position p the angle vector is
    ``[p·inv_freq, p·inv_freq]`` (length D), returned as ``cos``/``sin`` [B, T, D].

    The frequencies are recomputed in fp32 on each call (D/2 numbers) rather than kept as a
    buffer, so casting the model to bf16 or initialising it on the meta device never degrades
    them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.theta ** (exponents / self.head_dim))

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [B or 1, T] -> (cos, sin), each [B or 1, T, D] in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
