"""Dense training FLOPs per token of a decoder: the one formula qsparse uses.

PaLM's count (Chowdhery et al. 2022, appendix B): ``6·N + 12·L·d·T`` per token, forward and
backward, where ``N`` counts the weights used in matrix multiplies (2 FLOPs per weight forward,
4 backward; the embedding lookup costs none, the lm head counts) and ``12·L·d·T`` the
attention score and value products (QKᵀ and AV: 2·2·d·T per layer forward, ×3 with backward)
at context ``T``, without halving for the causal mask. Sparsity is not subtracted: MFU
compares runs by the dense work. ``tests/test_llama.py`` checks the formula against
Lightning's :func:`lightning.fabric.utilities.throughput.measure_flops` (PyTorch's
``FlopCounterMode``), which counts by running the model; the formula is kept because the
throughput callback and the benchmarks need the count without a forward/backward pass of
the real model.
"""

from __future__ import annotations

import torch

__all__ = ["model_flops_per_token", "training_flops_per_token"]


def training_flops_per_token(
    matmul_params: int, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """``6·matmul_params + 12·num_layers·hidden_size·seq_len`` (see the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float | None:
    """Dense training FLOPs per token of ``model`` at context ``seq_len``.

    Uses the model's own helper when it has one (``model.flops_per_token(seq_len)`` or
    ``model.config.flops_per_token(seq_len)``); otherwise the same formula,
    :func:`training_flops_per_token`, with ``N`` the weights of every
    ``nn.Linear`` (lm_head included; embeddings are lookups) and the layer count and hidden
    size of ``model.config`` (no attention term without them).
    """
    for owner in (model, getattr(model, "config", None)):
        fn = getattr(owner, "flops_per_token", None)
        if callable(fn):
            try:
                return float(fn(seq_len))
            except TypeError:
                return float(fn(seq_len=seq_len))
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and hidden):
        layers = hidden = 0
    return training_flops_per_token(n, layers, hidden, seq_len)
