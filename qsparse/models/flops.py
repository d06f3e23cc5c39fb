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

__all__ = ["training_flops_per_token"]


def training_flops_per_token(
    matmul_params: int, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """``6·matmul_params + 12·num_layers·hidden_size·seq_len`` (see the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len
