"""QSparseLinear: one linear layer for dense | top-k | BitLinear b1.58 | both.

A projection input passes an :class:`ActivationSparsifier` (optional RMSNorm -> optional
absmax b-bit quantization -> top-k mask), then multiplies the (optionally ternarized)
weight: ``Y = (Q(N(X)) * M) Q_w(W)^T + b`` with ``M = TopK(|N(X)|)`` (Eq. 4-10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import PATTERNS, WEIGHT_QUANT, check_choice, keep_count
from .quant import absmax_quantize, absmean_ternarize, straight_through
from .topk import apply_mask, block_topk_mask, topk_mask


class ActivationSparsifier(nn.Module):
    """The activation pipeline of one projection-input site.

    ``x``: [..., dim] -> [..., dim]. Steps: RMSNorm (``subln``), per-token absmax
    quantization to ``act_bits`` (mask still chosen from the unquantized values), top-k
    (``token_topk``: k per row; ``block_topk``: k per block; ``threshold``: keep
    ``|x| > threshold``, a persistent scalar buffer set by calibration, 0 = keep every non-zero),
    straight-through gradient.

    ``ratio`` may change during training (:func:`qsparse.set_sparsity_ratio`); ``target_ratio``
    remembers the configured value. ``forward`` reads only k, an int set with the ratio (a
    float ratio read in ``forward`` made inductor recompile at every step); compiled models
    are called in :func:`qsparse.nn.sites.dynamic_sparsity` so that k stays symbolic. While ``track_stats`` is
    on, the number of zero outputs and of outputs are accumulated in int64 buffers (no host
    sync) for :mod:`qsparse.stats`.
    """

    def __init__(
        self,
        dim: int,
        ratio: float = 0.0,
        pattern: str = "token_topk",
        block_size: int = 32,
        ste: bool = True,
        rescale: bool = False,
        act_bits: int | None = None,
        subln: bool = False,
        eps: float = 1e-5,
        norm_eps: float = 1e-6,
        threshold_momentum: float | None = None,
    ) -> None:
        super().__init__()
        check_choice("sparsity.pattern", pattern, PATTERNS)
        if pattern == "block_topk" and dim % block_size:
            raise ValueError(
                f"sparsity.block_size={block_size} does not divide the input size {dim}; "
                "pick a divisor (the paper uses 32)"
            )
        self.dim = dim
        self.pattern = pattern
        self.block_size = block_size
        self.ste = ste
        self.rescale = rescale
        self.act_bits = act_bits
        self.eps = eps
        self.norm = nn.RMSNorm(dim, eps=norm_eps) if subln else None
        if pattern == "threshold":  # saved with the model (export's extra weights)
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        # tracked thresholds (training): the last training batch's |x| quantile at the ratio,
        # applied by track_threshold() once the batch is done
        self.threshold_momentum = threshold_momentum
        self._batch_quantile: torch.Tensor | None = None
        self.target_ratio = float(ratio)
        self.ratio = ratio  # validates it against dim and sets k
        self.track_stats = False
        # integer counters: ``model.to(dtype)`` casts floating buffers (a bf16 count stops
        # growing at 256) but leaves integer ones alone
        self.register_buffer("zeros_seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("values_seen", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def ratio(self) -> float:
        """S, the fraction zeroed; setting it recomputes k (``ValueError`` if k would be 0)."""
        return self._ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        value = float(value)
        k = None
        if self.pattern not in ("none", "threshold") and value != 0.0:
            width = self.block_size if self.pattern == "block_topk" else self.dim
            k = keep_count(width, value)
            k = None if k == width else k
        self._ratio, self._k = value, k

    def keep(self) -> int | None:
        """k per row (token_topk) or per block (block_topk); ``None`` when nothing is dropped
        (an int attribute: see :func:`qsparse.nn.sites.dynamic_sparsity`)."""
        return self._k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        k = self.keep()
        out = None
        if self.pattern == "threshold":
            out = self._thresholded(x)
        elif x.is_cuda and not self.rescale:
            out = self._fused(x, k)
        if out is None:
            out = self._reference(x, k)
        if self.track_stats:
            with torch.no_grad():
                self.zeros_seen += (out == 0).sum()
                self.values_seen += out.numel()
        return out

    def _fused(self, x: torch.Tensor, k: int | None) -> torch.Tensor | None:
        """The Triton path (same values as :meth:`_reference`); ``None`` where no kernel
        applies."""
        if k is None:  # quantize only: top-k with k = d
            if self.act_bits is None:
                return None
            return kernels.fused_token_topk(x, self.dim, True, self.act_bits, self.eps)
        if self.pattern == "token_topk":
            return kernels.fused_token_topk(x, k, self.ste, self.act_bits, self.eps)
        return kernels.fused_block_topk(x, k, self.block_size, self.ste, self.act_bits, self.eps)

    def _reference(self, x: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            if self.act_bits is None:
                return x
            return absmax_quantize(x, self.act_bits, self.eps, ste=True)
        if self.pattern == "token_topk":
            mask = topk_mask(x, k)
        else:
            mask = block_topk_mask(x, k, self.block_size)
        values = None
        if self.act_bits is not None:
            values = absmax_quantize(x, self.act_bits, self.eps, ste=True)
        return apply_mask(x, mask, self.ste, values=values, rescale=self.rescale)

    def _thresholded(self, x: torch.Tensor) -> torch.Tensor:
        """``x * 1[|x| > t]`` (TEAL/CATS), quantized first when ``act_bits`` is set. In
        training with ``threshold_momentum``, also notes the batch's |x| quantile at the ratio
        for :meth:`track_threshold` (the mask uses ``t`` as it is: a recomputed forward, e.g.
        under activation checkpointing, sees the same threshold)."""
        tracking = self.training and self.threshold_momentum and self.ratio > 0
        # an evaluation forward drops what a training batch left pending
        self._batch_quantile = _abs_quantile(x.detach(), self.ratio) if tracking else None
        mask = self.threshold_mask(x)
        values = None
        if self.act_bits is not None:
            values = absmax_quantize(x, self.act_bits, self.eps, ste=True)
        return apply_mask(x, mask, self.ste, values=values, rescale=self.rescale)

    def threshold_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``|x| > t`` (bool, x's shape), the threshold rounded to x's dtype first."""
        return x.detach().abs() > self.threshold.to(x.dtype)

    @torch.no_grad()
    def set_threshold_from(self, x: torch.Tensor) -> torch.Tensor:
        """Set the threshold to the ratio's |x| quantile of ``x`` (a calibration pass); returns
        it."""
        return self.threshold.copy_(_abs_quantile(x, self.ratio))

    @property
    def pending_quantile(self) -> torch.Tensor | None:
        """The last training batch's |x| quantile at the ratio, not yet applied (or None)."""
        return self._batch_quantile

    def track_threshold(self, q: torch.Tensor | None = None) -> bool:
        """Move the threshold towards ``q`` (default: :attr:`pending_quantile`; e.g. its mean
        over data-parallel ranks): ``t = (1 - m) t + m q``, the first batch (``t = 0``) sets
        ``t = q``. Clears the pending quantile. True when it moved."""
        q = self._batch_quantile if q is None else q
        self._batch_quantile = None
        if q is None:
            return False
        with torch.no_grad():
            m = float(self.threshold_momentum)
            t = self.threshold
            t.copy_(torch.where(t > 0, (1 - m) * t + m * q.to(t.dtype), q.to(t.dtype)))
        return True

    def reset_stats(self) -> None:
        self.zeros_seen.zero_()
        self.values_seen.zero_()

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"pattern={self.pattern}", f"ratio={self.ratio}"]
        if self.pattern == "block_topk":
            parts.append(f"block_size={self.block_size}")
        if self.pattern == "threshold":
            parts.append(f"threshold={float(self.threshold):.4g}")
        if not self.ste:
            parts.append("ste=False")
        if self.act_bits is not None:
            parts.append(f"act_bits={self.act_bits}")
        return ", ".join(parts)


class QSparseLinear(nn.Linear):
    """``nn.Linear`` with an optional input :class:`ActivationSparsifier` (``act``) and
    optional absmean ternary weights (``weight_quant="ternary"``, BitLinear b1.58).

    ``x``: [..., in_features] -> [..., out_features]. The latent ``weight`` stays in full
    precision for the optimizer; the forward uses ``Q_w(W)`` with a straight-through gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act: ActivationSparsifier | None = None,
        weight_quant: str = "none",
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(act, weight_quant, eps)

    def _setup(self, act: ActivationSparsifier | None, weight_quant: str, eps: float) -> None:
        if weight_quant not in WEIGHT_QUANT:
            raise ValueError(f"quant.weights={weight_quant!r} is not supported; use {WEIGHT_QUANT}")
        if act is not None and act.dim != self.in_features:
            raise ValueError(
                f"sparsifier dim {act.dim} does not match in_features {self.in_features}"
            )
        self.act = act
        self.weight_quant = weight_quant
        self.eps = eps

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        act: ActivationSparsifier | None = None,
        weight_quant: str = "none",
        eps: float = 1e-5,
    ) -> QSparseLinear:
        """Wrap an existing ``nn.Linear`` reusing its Parameter objects (no copy), so
        optimizer state, tied weights and loaded checkpoints stay attached."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(act, weight_quant, eps)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in the forward: ``W`` or its ternary form ``{-a, 0, +a}``."""
        if self.weight_quant == "ternary":
            fused = (
                kernels.fused_ternary_weight(self.weight, self.eps) if self.weight.is_cuda else None
            )
            return (
                fused if fused is not None else absmean_ternarize(self.weight, self.eps, ste=True)
            )
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", weight_quant={self.weight_quant}" if self.weight_quant != "none" else "")


__all__ = ["ActivationSparsifier", "QSparseLinear", "straight_through"]


#: entries of |x| a tracked threshold's quantile reads at most (evenly strided beyond): its
#: error in probability is about sqrt(p (1 - p) / 2^18) < 0.1%
QUANTILE_SAMPLE = 1 << 18


def _abs_quantile(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``ratio`` quantile of |x| (fp32 scalar): the ``ceil(ratio n)``-th smallest of ``n``
    entries, read every ``ceil(numel / 2^18)``-th entry of the flattened tensor. On CUDA by a
    full sort: ``torch.kthvalue`` runs one thread block per slice there, some 20x slower than a
    sort on one long row (pytorch/pytorch#75599), and threshold training calls this at every
    site of every micro-batch."""
    a = x.reshape(-1)
    step = -(-a.numel() // QUANTILE_SAMPLE)
    a = a[::step].float().abs()
    kth = min(a.numel(), max(1, math.ceil(ratio * a.numel())))
    if a.is_cuda:
        return torch.sort(a).values[kth - 1]
    return torch.kthvalue(a, kth).values
