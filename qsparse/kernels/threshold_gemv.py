"""Decode GEMV for a fixed-threshold site (TEAL, CATS-style): ``y = (x · 1[|x| > t]) Wᵀ``.

A top-k site (Q-Sparse) must find each token's k-th largest |x| before its GEMV can start (a
radix select in :func:`qsparse.kernels.gemv.sparse_gemv`); a threshold site knows its cut in
advance, so its list of kept inputs is one compare and one prefix sum. Batch 1:
:func:`threshold_rows` builds that list in one Triton program (``_threshold_list_kernel``) and
the sparse-input GEMV of :mod:`qsparse.kernels.gemv` streams exactly the listed weight rows,
reading the list's length on the device: no host sync, so the pair runs inside a CUDA graph
and the number of kept inputs may differ from token to token. Batch > 1 (every row keeps a
different set): the masked input through a dense product (cuBLAS).

``t`` is a one-element fp32 tensor on the input's device (a site's calibrated threshold kept
as a buffer), or a Python float. Reference: :func:`threshold_gemv_reference` (pure PyTorch,
any device); the kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from . import kernels_available
from .gemv import (
    GemvConfig,
    _cfg_from_ints,
    _cfg_ints,
    _check_x,
    _sparse_gemv_launch,
    _wt_dims,
    dense_layout,
    sparse_config_for_weights,
)

__all__ = ["threshold_gemv", "threshold_gemv_reference", "threshold_rows"]

#: the list kernel is one program over the whole input row (its prefix sum)
MAX_LIST_WIDTH = 16384


def _threshold_tensor(t: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"threshold: one value expected, got shape {tuple(t.shape)}")
        return t.reshape(1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(t)], dtype=torch.float32, device=device)


def threshold_rows(
    x: torch.Tensor, t: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of ``x[1, K]`` with ``|x| > t`` as a list, in
    :func:`qsparse.kernels.gemv.compact_rows`' format: (idx int32 [K], val fp32 [1, K], cnt
    int32 [1]); ``idx[:cnt]`` ascending, ``val[0, p] = x[0, idx[p]]``, entries past ``cnt``
    undefined. One Triton program, no host sync; ``K <= 16384``."""
    import triton

    from ._gemv_triton import _threshold_list_kernel

    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"threshold_rows: x must be [1, K], got {tuple(x.shape)}")
    width = x.shape[1]
    if width > MAX_LIST_WIDTH:
        raise ValueError(f"threshold_rows: K = {width} > {MAX_LIST_WIDTH} (one-program list)")
    x = x.contiguous()
    idx = torch.empty(width, dtype=torch.int32, device=x.device)
    val = torch.empty(1, width, dtype=torch.float32, device=x.device)
    cnt = torch.empty(1, dtype=torch.int32, device=x.device)
    block = triton.next_power_of_2(width)
    _threshold_list_kernel[(1,)](
        x,
        _threshold_tensor(t, x.device),
        idx,
        val,
        cnt,
        width,
        BLOCK=block,
        num_warps=16 if block >= 4096 else 4,
    )
    return idx, val, cnt


def threshold_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    t: torch.Tensor | float,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    n_out: int | None = None,
    expected_kept: int | None = None,
) -> torch.Tensor:
    """``y[B, N] = (x · 1[|x| > t]) @ W^T`` for ``x[B, K]`` and ``wt =`` :func:`~qsparse.kernels.
    gemv.prepare_dense` ``(W)``. Batch 1 on CUDA (or under ``TRITON_INTERPRET=1``): the list
    kernel then the sparse-input GEMV, which reads the list's length itself. ``cfg=None``:
    :func:`~qsparse.kernels.gemv.sparse_config_for_weights` at ``expected_kept`` inputs (default K/2;
    the launch shape only, any count is computed exactly). Elsewhere, and for batch > 1: the
    masked input through a dense product. ``n_out``: keep the first ``n_out`` columns. Runs
    inside the custom op ``qsparse::threshold_gemv`` (``torch.compile`` traces it whole)."""
    k_in = _wt_dims(wt)[0]
    _check_x(x, k_in)
    out_dtype = out_dtype or x.dtype
    t_vec = _threshold_tensor(t, x.device)
    if cfg is None:
        cfg = sparse_config_for_weights(wt, expected_kept or max(1, k_in // 2), x.shape[0])
    y = threshold_gemv_op(x.contiguous(), wt, t_vec, out_dtype, _cfg_ints(cfg))
    return y[:, :n_out] if n_out is not None else y


@torch.library.custom_op("qsparse::threshold_gemv", mutates_args=())
def threshold_gemv_op(
    x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, out_dtype: torch.dtype, cfg: list[int]
) -> torch.Tensor:
    """The launch behind :func:`threshold_gemv` (validated arguments; ``t`` fp32 [1]; ``cfg``:
    ``_cfg_ints``). Returns [B, N (padded)] in ``out_dtype``."""
    fused = x.shape[0] == 1 and x.shape[1] <= MAX_LIST_WIDTH
    if fused and kernels_available(x):
        rows = threshold_rows(x, t)
        return _sparse_gemv_launch(x, wt, -1, _cfg_from_ints(cfg), out_dtype, rows)
    masked = x * (x.float().abs() > t).to(x.dtype)
    return (masked.to(wt.dtype) @ dense_layout(wt)).to(out_dtype)


@threshold_gemv_op.register_fake
def _threshold_gemv_fake(x, wt, t, out_dtype, cfg):
    return x.new_empty((x.shape[0], _wt_dims(wt)[1]), dtype=out_dtype)


def threshold_gemv_reference(
    x: torch.Tensor, w: torch.Tensor, t: torch.Tensor | float
) -> torch.Tensor:
    """``(x · 1[|x| > t]) Wᵀ`` in fp32 for ``x[B, K]`` and ``w = nn.Linear.weight`` [N, K]."""
    xf = x.float()
    return (xf * (xf.abs() > _threshold_tensor(t, x.device))) @ w.float().t()
