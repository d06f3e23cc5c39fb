"""Fused GPU kernels. Each entry point returns ``None`` when no kernel applies, so callers fall
back to the pure-PyTorch reference in :mod:`qsparse.nn`."""

from __future__ import annotations

import torch


def fused_token_topk(
    x: torch.Tensor, k: int, ste: bool, act_bits: int | None
) -> torch.Tensor | None:
    """Per-token top-k (optionally after absmax quantization) on CUDA; ``None`` = use the reference."""
    return None


def fused_block_topk(
    x: torch.Tensor, k: int, block_size: int, ste: bool, act_bits: int | None
) -> torch.Tensor | None:
    """Per-block top-k on CUDA; ``None`` = use the reference."""
    return None
