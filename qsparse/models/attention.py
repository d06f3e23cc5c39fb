"""Scaled dot-product attention with grouped-query heads, shared by the model's attention
layer and the reference of the fused decode attention (:mod:`qsparse.kernels.decode_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gqa_attention"]


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA with grouped-query heads: q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, H, T, D];
    query head h uses kv head ``h // (H / H_kv)``. ``mask``: boolean [B or 1, 1, T, S]
    (True = attend), or None for causal (T > 1) / full (T = 1) attention."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and mask is not None:
        # masked SDPA may fall back to kernels without GQA support: repeat each kv head for
        # its H/H_kv query heads explicitly
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, enable_gqa=gqa
    )
