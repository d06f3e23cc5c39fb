"""Custom ops around the fused top-k kernels: opaque to ``torch.compile`` (no graph break),
with a straight-through backward that stores no dense mask.

``qsparse::token_topk(x[n, d], k, qmax, eps, want_mask) -> (out[n, d], mask)``: out keeps
the k largest |x| per row (values fake-quantized to ``qmax`` levels when ``qmax > 0``, scale
``qmax / max(gamma, eps)``: ``QuantConfig.eps``), zeros elsewhere. ``mask`` is a bool [n, d] tensor when ``want_mask`` (needed only for the no-STE
backward ``dL/dX = dL/dOut * M``) and an empty tensor otherwise; with the STE the backward is
the identity, so nothing is saved at all.
``qsparse::block_topk(x[n, d], k, block_size, qmax, eps, want_mask)``: the same per block of
``block_size`` consecutive values (gamma of the quantizer still per row).
"""

from __future__ import annotations

import torch

# The top-k kernels (these and the decode GEMV's, qsparse.kernels.gemv) sort by the fp32 bits
# of |x| read as an integer (the key). For an input of a narrower format only
# 31 - (23 - mantissa bits) of them can be non-zero, and the radix passes look at no others:
# bf16 (7 mantissa bits) 15, fp16 (10) 18, fp32 31.
KEY_BITS: dict[torch.dtype, int] = {torch.bfloat16: 15, torch.float16: 18, torch.float32: 31}


def _empty_mask(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,), dtype=torch.bool)


def _out_buffer(x: torch.Tensor) -> torch.Tensor:
    """The kernel's output buffer. Triton's CPU interpreter casts fp32 to bf16/fp16 by
    truncation (the GPU rounds to nearest even), so there it writes fp32 and torch casts."""
    return (
        torch.empty_like(x, dtype=torch.float32) if x.device.type == "cpu" else torch.empty_like(x)
    )


@torch.library.custom_op("qsparse::token_topk", mutates_args=())
def token_topk_op(
    x: torch.Tensor, k: int, qmax: int, eps: float, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-row top-k (+ absmax quantization); x: [n, d] contiguous."""
    from ._topk_triton import launch_token_topk

    out = _out_buffer(x)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if want_mask else None
    if x.numel():
        launch_token_topk(
            x, out, mask, k, qmax, eps, select=k < x.shape[-1], key_bits=KEY_BITS[x.dtype]
        )
    return out.to(x.dtype), mask if mask is not None else _empty_mask(x)


@token_topk_op.register_fake
def _token_topk_fake(
    x: torch.Tensor, k: int, qmax: int, eps: float, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if want_mask else None
    return torch.empty_like(x), mask if mask is not None else _empty_mask(x)


@torch.library.custom_op("qsparse::block_topk", mutates_args=())
def block_topk_op(
    x: torch.Tensor, k: int, block_size: int, qmax: int, eps: float, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-block top-k (+ per-row absmax quantization); x: [n, d] contiguous."""
    from ._topk_triton import launch_block_topk

    out = _out_buffer(x)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if want_mask else None
    if x.numel():
        launch_block_topk(x, out, mask, k, block_size, qmax, eps, key_bits=KEY_BITS[x.dtype])
    return out.to(x.dtype), mask if mask is not None else _empty_mask(x)


@block_topk_op.register_fake
def _block_topk_fake(
    x: torch.Tensor, k: int, block_size: int, qmax: int, eps: float, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if want_mask else None
    return torch.empty_like(x), mask if mask is not None else _empty_mask(x)


def _setup_context(ctx, inputs, output) -> None:
    want_mask = inputs[-1]
    ctx.want_mask = want_mask
    if want_mask:
        ctx.save_for_backward(output[1])


def _token_backward(ctx, grad_out: torch.Tensor, _grad_mask: torch.Tensor | None):
    """STE: dL/dX = dL/dOut (identity); without STE: dL/dOut * M."""
    grad = grad_out * ctx.saved_tensors[0] if ctx.want_mask else grad_out
    return grad, None, None, None, None


def _block_backward(ctx, grad_out: torch.Tensor, _grad_mask: torch.Tensor | None):
    grad = grad_out * ctx.saved_tensors[0] if ctx.want_mask else grad_out
    return grad, None, None, None, None, None


token_topk_op.register_autograd(_token_backward, setup_context=_setup_context)
block_topk_op.register_autograd(_block_backward, setup_context=_setup_context)
