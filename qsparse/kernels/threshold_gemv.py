"""Decode GEMV for a fixed-threshold site (TEAL, CATS-style): ``y = (x · 1[|x| > t]) Wᵀ``.

A top-k site (Q-Sparse) must find each token's k-th largest |x| before its GEMV can start (a
radix select in :func:`qsparse.kernels.gemv.sparse_gemv`); a threshold site knows its cut in
advance, so its list of kept inputs is one compare and one prefix sum. Batch 1:
:func:`threshold_rows` builds that list in one Triton program (``_threshold_list_kernel``,
computing the site input from its producer when given one: the RMSNorm in front of q|k|v and
gate|up) and the sparse-input GEMV of :mod:`qsparse.kernels.gemv` streams exactly the listed
weight rows, launched as the list's programmatic dependent (resident and waiting when the list
is written, not launched after it) and reading the list's length on the device: no host
sync, so the pair runs inside a CUDA graph and the number of kept inputs may differ from
token to token. With bf16 inputs the list holds one packed word per kept input (value bits
and index), as the top-k list does. Batch > 1 (every row keeps a different set): the masked
input through a dense product (cuBLAS).

``t`` is a one-element fp32 tensor on the input's device (a site's calibrated threshold kept
as a buffer), or a Python float. Reference: :func:`threshold_gemv_reference` (pure PyTorch,
any device); the kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from . import kernels_available
from .gemv import (
    NO_PRODUCER,
    PRODUCERS,
    GemvConfig,
    Producer,
    _cfg_from_ints,
    _cfg_ints,
    _check_x,
    _pdl_ok,
    _prod_args,
    _sparse_gemv_launch,
    _wait_opts,
    _wt_dims,
    dense_layout,
    select_warps_for,
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
    x: torch.Tensor,
    t: torch.Tensor | float,
    pdl: bool = False,
    packed: bool = False,
    producer: Producer = NO_PRODUCER,
    wait: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of the site input ``v[1, K]`` with ``|v| > t`` as a list, in
    :func:`qsparse.kernels.gemv.compact_rows`' format: (idx int32 [K], val fp32 [1, K], cnt
    int32 [1]); ``idx[:cnt]`` ascending, ``val[0, p] = v[0, idx[p]]``, entries past ``cnt``
    undefined. ``v`` is x, or what ``producer`` makes of x (computed in the kernel: x is then
    the RMSNorm's input, or [1, 2K] for a GLU). ``packed`` (bf16 v): ``idx[p] = bf16 bits of
    the value << 16 | index`` and ``val`` is empty. ``pdl``: let a kernel launched next as a
    programmatic dependent start early; ``wait``: launch it as a programmatic dependent of the
    kernel before it (:data:`~qsparse.kernels.gemv.PDL_CHAIN`). One Triton program, no host sync; ``K <= 16384``."""
    import triton

    from ._gemv_triton import _threshold_list_kernel

    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"threshold_rows: x must be [1, K], got {tuple(x.shape)}")
    width = x.shape[1] // 2 if producer.kind.endswith("_glu") else x.shape[1]
    if width > MAX_LIST_WIDTH:
        raise ValueError(f"threshold_rows: K = {width} > {MAX_LIST_WIDTH} (one-program list)")
    if packed and x.dtype != torch.bfloat16:
        raise ValueError(f"threshold_rows: packed=True needs a bf16 x, got {x.dtype}")
    x = x.contiguous()
    idx = torch.empty(width, dtype=torch.int32, device=x.device)
    val = torch.empty(0 if packed else 1, width, dtype=torch.float32, device=x.device)
    cnt = torch.empty(1, dtype=torch.int32, device=x.device)
    code, w, eps = _prod_args(producer, x)
    _threshold_list_kernel[(1,)](
        x,
        _threshold_tensor(t, x.device),
        idx,
        idx if packed else val,  # packed: val is empty and never written
        cnt,
        width,
        BLOCK=triton.next_power_of_2(width),
        PDL=pdl and _pdl_ok(x),
        PACKED=packed,
        w_ptr=w if w.numel() else cnt,
        eps=eps,
        PROD=code,
        BF16=x.dtype == torch.bfloat16,
        num_warps=select_warps_for(width, 0, 1024),
        **_wait_opts(x, wait),
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
    producer: Producer = NO_PRODUCER,
) -> torch.Tensor:
    """``y[B, N] = (v · 1[|v| > t]) @ W^T`` for the site input ``v[B, K]`` and ``wt =``
    :func:`~qsparse.kernels.gemv.prepare_dense` ``(W)``; ``v = x``, or ``producer``'s output
    of x (the RMSNorm in front of the site, or act(g) * u of x = [g | u]: computed by the list
    kernel at batch 1, by PyTorch elsewhere). Batch 1 on CUDA (or under
    ``TRITON_INTERPRET=1``): the list kernel, then the sparse-input GEMV as its programmatic
    dependent, which reads the list's length itself (packed list words for bf16). ``cfg=None``:
    :func:`~qsparse.kernels.gemv.sparse_config_for_weights` at ``expected_kept`` inputs
    (default K/2; the launch shape only, any count is computed exactly). Elsewhere, and for
    batch > 1: the masked input through a dense product. ``n_out``: keep the first ``n_out``
    columns. Runs inside the custom op ``qsparse::threshold_gemv`` (``torch.compile`` traces it
    whole)."""
    if producer.kind != "none" and (x.dim() != 2 or x.shape[0] != 1 or not producer.fuses(x)):
        x, producer = producer.reference(x), NO_PRODUCER
    k_in = _wt_dims(wt)[0]
    _check_x(x, producer.width(k_in))
    out_dtype = out_dtype or x.dtype
    t_vec = _threshold_tensor(t, x.device)
    if cfg is None:
        cfg = sparse_config_for_weights(wt, expected_kept or max(1, k_in // 2), x.shape[0])
    code, w, eps = _prod_args(producer, x)
    y = threshold_gemv_op(x.contiguous(), wt, t_vec, out_dtype, _cfg_ints(cfg), code, w, eps)
    return y[:, :n_out] if n_out is not None else y


@torch.library.custom_op("qsparse::threshold_gemv", mutates_args=())
def threshold_gemv_op(
    x: torch.Tensor,
    wt: torch.Tensor,
    t: torch.Tensor,
    out_dtype: torch.dtype,
    cfg: list[int],
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The launch behind :func:`threshold_gemv` (validated arguments; ``t`` fp32 [1]; ``cfg``:
    ``_cfg_ints``; ``prod``/``prod_w``/``eps``: the producer, ``_prod_args``). Returns [B, N
    (padded)] in ``out_dtype``."""
    producer = Producer(PRODUCERS[prod], prod_w if prod == 1 else None, eps)
    width = x.shape[1] // producer.width(1)
    if x.shape[0] == 1 and width <= MAX_LIST_WIDTH and kernels_available(x):
        config = _cfg_from_ints(cfg)

        def list_rows(pdl: bool, packed: bool):
            return threshold_rows(x, t, pdl, packed, producer, wait=config.pdl)

        return _sparse_gemv_launch(x, wt, -1, config, out_dtype, None, list_rows=list_rows)
    v = producer.reference(x)
    masked = v * (v.float().abs() > t).to(v.dtype)
    return (masked.to(wt.dtype) @ dense_layout(wt)).to(out_dtype)


@threshold_gemv_op.register_fake
def _threshold_gemv_fake(x, wt, t, out_dtype, cfg, prod, prod_w, eps):
    return x.new_empty((x.shape[0], _wt_dims(wt)[1]), dtype=out_dtype)


def threshold_gemv_reference(
    x: torch.Tensor, w: torch.Tensor, t: torch.Tensor | float
) -> torch.Tensor:
    """``(x · 1[|x| > t]) Wᵀ`` in fp32 for ``x[B, K]`` and ``w = nn.Linear.weight`` [N, K]."""
    xf = x.float()
    return (xf * (xf.abs() > _threshold_tensor(t, x.device))) @ w.float().t()
