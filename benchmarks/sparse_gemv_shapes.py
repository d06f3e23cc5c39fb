"""Sweep: sparse decode GEMV launch shapes on the 1.3B preset's projection shapes (and
4096 -> 11008), S=0.6, batch 1, each against cuBLAS in the same run. What
:func:`qsparse.kernels.gemv.sparse_config_for` encodes was read off this table.

Weights are row-major ``Wt`` without column padding (``align=1``, as when the sweep was first
run), plus one row per shape with the default 64-column padding and ``cfg=None``. Every
config is checked against the reference. Times are per call in a CUDA graph cycling through
enough weight copies (at least 8 and 120 MB) that L2 cannot serve them.

    PYTHONPATH=$PWD python3 benchmarks/sparse_gemv_shapes.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._figures import emit, slug
from benchmarks._timing import time_graph
from qsparse.kernels import gemv as G

SHAPES = [
    ("qkv", 2048, 6144),
    ("o", 2048, 2048),
    ("gate_up", 2048, 10920),
    ("down", 5460, 2048),
    ("ref", 4096, 11008),
]
CONFIGS = {
    "bn64 w4 st3": G.GemvConfig(),
    "bn32 w4 st3": G.GemvConfig(block_n=32),
    "bn32 w2 st3": G.GemvConfig(block_n=32, num_warps=2),
    "bn64 split2": G.GemvConfig(split=2),
    "bn64 split4": G.GemvConfig(split=4),
    "bn32 split2": G.GemvConfig(block_n=32, split=2),
    "bn32 split4": G.GemvConfig(block_n=32, split=4),
    "bk64 bn32 st4": G.GemvConfig(block_k=64, block_n=32, num_stages=4),
    "bk64 bn64 split2 st4": G.GemvConfig(block_k=64, split=2, num_stages=4),
}


def _time_shape(name: str, kin: int, n: int) -> None:
    copies = max(8, int(120e6 // (kin * n * 2)))
    ws = [torch.randn(n, kin, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k = int(0.4 * kin)
    rows = G.compact_rows(x, k)
    t_dense = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    t_sel = time_graph([lambda: G.compact_rows(x, k)] * 8)
    print(
        f"{name} K={kin} N={n} ({copies} copies): dense {t_dense:.2f} us, selection {t_sel:.2f} us"
    )
    emit(f"shapes.{name}.dense_us", t_dense, "us")
    emit(f"shapes.{name}.selection_us", t_sel, "us")
    ref = G.sparse_gemv_reference(x, G.prepare_dense(ws[0], None, 1), k).float()

    def row(label: str, wts: list[torch.Tensor], cfg: G.GemvConfig | None) -> None:
        y = G.sparse_gemv(x, wts[0], k, cfg, n_out=n).float()
        err = ((y - ref).norm() / ref.norm()).item()
        t_ex = time_graph([lambda wt=wt: G.sparse_gemv(x, wt, k, cfg, rows=rows) for wt in wts])
        t_in = time_graph([lambda wt=wt: G.sparse_gemv(x, wt, k, cfg) for wt in wts])
        print(
            f"  {label:28s} excl {t_ex:6.2f} ({t_dense / t_ex:.2f}x) "
            f"incl {t_in:6.2f} ({t_dense / t_in:.2f}x) rel err {err:.1e}",
            flush=True,
        )
        emit(f"shapes.{name}.{slug(label)}.excl_us", t_ex, "us")
        emit(f"shapes.{name}.{slug(label)}.incl_us", t_in, "us")

    unpadded = [G.prepare_dense(w, None, 1) for w in ws]
    for label, cfg in CONFIGS.items():
        row(label, unpadded, cfg)
    del unpadded
    row("padded to 64, cfg=None", [G.prepare_dense(w) for w in ws], None)


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for name, kin, n in SHAPES:
        _time_shape(name, kin, n)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
