"""Top-k activation sparsifiers (pure-PyTorch reference; Q-Sparse Eq. 1-3, 12-13).

Selection rule, shared with the GPU kernels: per row keep the ``k`` entries of largest
``|x|`` (compared in fp32); among equal magnitudes the lower index wins. Exactly ``k``
entries are kept per row (or per block), ties included. Selection ignores gradients.
"""

from __future__ import annotations

import torch

from .quant import straight_through


def _selection_key(x: torch.Tensor) -> torch.Tensor:
    """An int64 key per entry that orders by (|x| desc, index asc) with no ties.

    The fp32 bit pattern of a non-negative float is monotonic in its value, so
    ``bits(|x|) << 32 | (d - 1 - i)`` is a total order that prefers lower indices on ties.
    """
    d = x.shape[-1]
    bits = x.detach().float().abs().view(torch.int32).to(torch.int64)
    rank = torch.arange(d - 1, -1, -1, device=x.device, dtype=torch.int64)
    return (bits << 32) | rank


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|x|`` per row of ``x[..., d]`` (ties: lower index).

    Returns a bool tensor shaped like ``x`` with exactly ``k`` True per row.
    """
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"top-k needs 1 <= k <= d, got k={k} for d={d}")
    if k == d:
        return torch.ones_like(x, dtype=torch.bool)
    idx = _selection_key(x).topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def block_topk_mask(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Mask keeping the ``k`` largest ``|x|`` in each block of ``block_size`` consecutive
    values of the last dim (``d % block_size == 0``); shape of ``x``."""
    d = x.shape[-1]
    if d % block_size:
        raise ValueError(
            f"sparsity.block_size={block_size} does not divide the hidden size {d}; "
            "pick a divisor (the paper uses 32)"
        )
    blocks = x.reshape(*x.shape[:-1], d // block_size, block_size)
    return topk_mask(blocks, k).reshape(x.shape)


def apply_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    ste: bool,
    values: torch.Tensor | None = None,
    rescale: bool = False,
) -> torch.Tensor:
    """Zero the entries of ``values`` (default ``x``) outside ``mask``.

    ``values`` is ``x`` after optional quantization (carrying its own STE). With ``ste`` the
    result's gradient w.r.t. ``x`` is the identity; without, it is masked by ``mask``.
    ``rescale`` multiplies kept entries by ``||x|| / ||x * mask||`` per row.
    """
    vals = x if values is None else values
    kept = vals.detach() * mask
    scale = None
    if rescale:
        xf = x.detach().float()
        kept_norm = (xf * mask).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = (xf.norm(dim=-1, keepdim=True) / kept_norm).to(x.dtype)
        kept = kept * scale
    if ste:
        return straight_through(x, kept)
    # no STE: gradient only through the kept entries, dL/d(X*M) * M
    out = vals * mask
    return out * scale if scale is not None else out


def token_topk(x: torch.Tensor, k: int, ste: bool = True, rescale: bool = False) -> torch.Tensor:
    """Keep the k largest |x| of each token (last dim), zero the rest.

    ``x``: [..., d] -> [..., d] with exactly k non-zeros per row (fewer only where x is 0).
    With ``ste`` the backward is the identity (paper Eq. 12-13: dL/dX = dL/d(X*M)).
    """
    return apply_mask(x, topk_mask(x, k), ste, rescale=rescale)


def block_topk(
    x: torch.Tensor, k: int, block_size: int, ste: bool = True, rescale: bool = False
) -> torch.Tensor:
    """Keep the k largest |x| inside every block of ``block_size`` values (e.g. 16:32)."""
    return apply_mask(x, block_topk_mask(x, k, block_size), ste, rescale=rescale)
