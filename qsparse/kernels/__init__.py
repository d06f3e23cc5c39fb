"""Fused GPU kernels (Triton) beside the PyTorch references they are tested against.

Training entry points, called by :class:`qsparse.nn.linear.ActivationSparsifier`:

- :func:`fused_token_topk` / :func:`fused_block_topk`: top-k selection on ``|x|`` (exactly k
  per row/block, ties to the lower index) fused with per-token absmax quantization; a
  straight-through backward that saves nothing (or a bool mask when ``ste=False``).
- :func:`fused_ternary_weight`: BitNet b1.58 absmean ternarization in two passes with an
  identity backward.

Each returns ``None`` when no kernel applies (CPU tensor, Triton missing, unsupported dtype or
shape, ``QSPARSE_KERNELS=0``), so the caller runs the reference (``QSPARSE_KERNELS`` takes 1
or 0: :mod:`qsparse.env_flags`). Setting ``TRITON_INTERPRET=1`` before import also routes CPU
tensors through the kernels (Triton's interpreter; tests only).

Inference kernels (sparse-input GEMV, 2-bit ternary GEMV) live in :mod:`qsparse.kernels.gemv`;
a fixed-threshold site's GEMV (TEAL) in :mod:`qsparse.kernels.threshold_gemv`; the attention
of one decode position (RoPE, cache write, attention) in :mod:`qsparse.kernels.decode_attention`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..env_flags import flag_at_import

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: the Triton kernels run where they apply; ``QSPARSE_KERNELS=0`` in the environment (read at
#: import) or setting this to False runs the PyTorch references everywhere
ENABLED: bool = flag_at_import("QSPARSE_KERNELS", True)
MAX_ROW = 32768  # widest row the token kernel holds in registers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernels_available(x: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``x`` (CUDA, or CPU under the interpreter)."""
    if not (ENABLED and HAS_TRITON):
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def _qmax(act_bits: int | None) -> int:
    if act_bits is None:
        return 0
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 16:
        raise ValueError(f"quant.act_bits must be an int in [2, 16] or None, got {act_bits!r}")
    return 2 ** (act_bits - 1) - 1


def _applies(x: torch.Tensor, k: int, width: int) -> bool:
    return (
        kernels_available(x)
        and x.dtype in _DTYPES
        and x.dim() >= 1
        and x.numel() > 0
        and 1 <= k <= width
    )


def fused_token_topk(
    x: torch.Tensor, k: int, ste: bool, act_bits: int | None, eps: float = 1e-5
) -> torch.Tensor | None:
    """Per-token top-k of ``x[..., d]`` (after absmax quantization to ``act_bits`` with scale
    ``Q / max(gamma, eps)``, ``eps`` = ``QuantConfig.eps``).

    Returns ``out[..., d]`` with exactly ``k`` entries per row kept (largest fp32 |x|, lower
    index on ties; values ``Q(x)`` when ``act_bits``), or ``None`` when no kernel applies.
    Backward: identity with ``ste``, else masked by the selection.
    """
    qmax = _qmax(act_bits)
    d = x.shape[-1] if x.dim() else 0
    if not _applies(x, k, d) or d > MAX_ROW:
        return None
    x2 = x.reshape(-1, d)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out, _ = torch.ops.qsparse.token_topk(x2, k, qmax, float(eps), not ste)
    return out.view(x.shape)


def fused_block_topk(
    x: torch.Tensor,
    k: int,
    block_size: int,
    ste: bool,
    act_bits: int | None,
    eps: float = 1e-5,
) -> torch.Tensor | None:
    """Top-k inside each block of ``block_size`` consecutive values of ``x[..., d]``.

    ``block_size`` must be a power of two dividing ``d``; otherwise (or when no kernel
    applies) returns ``None``. Quantization scale gamma is per row, as in the reference.
    """
    qmax = _qmax(act_bits)
    d = x.shape[-1] if x.dim() else 0
    if (
        not _applies(x, k, block_size)
        or block_size < 2
        or block_size & (block_size - 1)
        or d % block_size
        or d > MAX_ROW
    ):
        return None
    x2 = x.reshape(-1, d)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out, _ = torch.ops.qsparse.block_topk(x2, k, block_size, qmax, float(eps), not ste)
    return out.view(x.shape)


def fused_ternary_weight(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor | None:
    """``round_clip(W / a, -1, 1) * a`` with ``a = max(mean|W|, eps)`` (BitNet b1.58), in
    ``w.dtype``, identity backward (STE); ``None`` when no kernel applies."""
    if not kernels_available(w) or w.dtype not in _DTYPES or w.numel() == 0:
        return None
    return torch.ops.qsparse.ternary_weight(w.contiguous(), eps)


from . import quant as _quant  # noqa: E402,F401  (registers qsparse::ternary_weight)
from . import topk as _topk  # noqa: E402,F401  (registers the custom ops)

__all__ = [
    "HAS_TRITON",
    "fused_block_topk",
    "fused_ternary_weight",
    "fused_token_topk",
    "kernels_available",
]
