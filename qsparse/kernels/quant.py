"""BitNet b1.58 weight ternarization as one custom op (two Triton passes, no host sync).

``qsparse::ternary_weight(w, eps) -> q`` with ``q = clamp(rint(W / a), -1, 1) * a`` and
``a = max(mean|W|, eps)`` over the whole tensor, in ``w.dtype``. Pass 1 writes one partial
sum of |W| per program, a tiny ``torch.sum`` adds them in a fixed order (deterministic, no
atomics), pass 2 quantizes reading ``a`` from device memory. Backward: identity (STE to the latent weights), nothing saved.
"""

from __future__ import annotations

import torch

BLOCK = 8192


def _launch(w: torch.Tensor, eps: float) -> torch.Tensor:
    import triton

    from ._quant_triton import _absmean_partial_kernel, _ternary_kernel

    # the CPU interpreter casts by truncation: let torch do the final cast there
    out = (
        torch.empty_like(w, dtype=torch.float32) if w.device.type == "cpu" else torch.empty_like(w)
    )
    n = w.numel()
    nprog = triton.cdiv(n, BLOCK)
    partial = torch.empty(nprog, dtype=torch.float32, device=w.device)
    _absmean_partial_kernel[(nprog,)](w, partial, n, BLOCK=BLOCK, num_warps=8)
    total = partial.sum()
    _ternary_kernel[(nprog,)](w, out, total, n, eps, BLOCK=BLOCK, num_warps=8)
    return out.to(w.dtype)


@torch.library.custom_op("qsparse::ternary_weight", mutates_args=())
def ternary_weight_op(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Dequantized ternary weights {-a, 0, +a} shaped like ``w`` (contiguous)."""
    if w.numel() == 0:
        return torch.empty_like(w)
    return _launch(w, eps)


@ternary_weight_op.register_fake
def _ternary_fake(w: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(w)


def _backward(ctx, grad: torch.Tensor):
    return grad, None


ternary_weight_op.register_autograd(_backward)
