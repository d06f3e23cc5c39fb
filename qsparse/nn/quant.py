"""Quantizers with straight-through gradients (fake quantization: values stay float).

- Activations, per token (Eq. 4-7): ``Q(x) = RoundClip(x * s, -2^(b-1), 2^(b-1)-1) / s`` with
  ``s = (2^(b-1)-1) / max(gamma, eps)``, gamma = max|x| over the last dim (b=8: 127/gamma).
- Weights, per tensor (Eq. 8-10, BitNet b1.58): ``Q_w(W) = RoundClip(W / a, -1, 1) * a`` with
  ``a = max(mean|W|, eps)``, so every entry is one of ``{-a, 0, +a}``.

The forward returns the dequantized value; the backward passes the gradient through unchanged
(STE), which is what training the latent full-precision weights needs.
"""

from __future__ import annotations

import torch


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``y``; backward sends the incoming gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of ``y`` (computed without grad from ``x``), gradient of the identity to ``x``."""
    return _StraightThrough.apply(x, y.detach())


def absmax_quantize(
    x: torch.Tensor, bits: int = 8, eps: float = 1e-5, ste: bool = True
) -> torch.Tensor:
    """Per-token absmax quantization of ``x[..., d]`` to ``bits`` bits (dequantized).

    Computed in fp32 and cast back to ``x.dtype``. Returns a tensor of the shape of ``x``.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    scale = qmax / xf.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    q = (xf * scale).round().clamp(-qmax - 1, qmax) / scale
    q = q.to(x.dtype)
    return straight_through(x, q) if ste else q


def ternary_scale(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """a = max(mean|W|, eps) over the whole tensor, as a 0-dim fp32 tensor."""
    return w.detach().float().abs().mean().clamp_min(eps)


def absmean_ternarize(w: torch.Tensor, eps: float = 1e-5, ste: bool = True) -> torch.Tensor:
    """BitNet b1.58 weights: ``round_clip(W / a, -1, 1) * a`` with ``a = mean|W|``.

    Returns a tensor shaped like ``w`` whose entries are exactly ``{-a, 0, +a}`` (in w.dtype).
    """
    a = ternary_scale(w, eps)
    q = ((w.detach().float() / a).round().clamp(-1, 1) * a).to(w.dtype)
    return straight_through(w, q) if ste else q
