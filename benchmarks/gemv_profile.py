"""Diagnostic: per-kernel GPU times (torch.profiler) of the decode GEMV pieces at batch 1,
4096 -> 11008, S=0.6, to see where a call's time goes (selection, list, GEMV, launch gaps).

    PYTHONPATH=$PWD python3 benchmarks/gemv_profile.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._figures import emit, slug
from benchmarks._timing import kernel_times
from qsparse.kernels import gemv as G


def main() -> None:
    torch.manual_seed(0)
    kin, n = 4096, 11008
    w = torch.randn(n, kin, device="cuda", dtype=torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    wt64 = G.prepare_dense(w, 64)
    codes, alpha = G.ternarize(w)
    packed = G.pack_ternary(codes)
    x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k = int(0.4 * kin)
    rows = G.compact_rows(x, k)
    cases = {
        "cuBLAS dense": lambda: F.linear(x, w),
        "copy of x (one-program floor)": lambda: x.clone(),
        "list radix 8-bit digits 8w": lambda: G.compact_rows(x, k, 8, True, digit_bits=8),
        "list radix 5-bit digits 8w": lambda: G.compact_rows(x, k, 8, True, digit_bits=5),
        "list radix 5-bit digits 16w": lambda: G.compact_rows(x, k, 16, True, digit_bits=5),
        "list bisection 1 bit/pass 8w": lambda: G.compact_rows(x, k, 8, False, 1),
        "list bisection 2 bits/pass 8w": lambda: G.compact_rows(x, k, 8, False, 2),
        "select_rows 8w": lambda: G.select_rows(x, k, 8),
        "sparse gemv excl (row-major)": lambda: G.sparse_gemv(x, wt, k, rows=rows),
        "sparse gemv excl, 64-wide panels": lambda: G.sparse_gemv(x, wt64, k, rows=rows),
        "ternary": lambda: G.ternary_gemv(x, packed, alpha, None, 8),
        "ternary sparse": lambda: G.ternary_gemv(x, packed, alpha, k, 8),
    }
    for width in (2048, 4096, 5632, 8192, 11008):  # selection warps by row width
        xw = torch.randn(1, width, device="cuda", dtype=torch.bfloat16)
        for warps in (4, 8, 16, 32):
            cases[f"list K={width} {warps}w"] = lambda xw=xw, w_=warps: G.compact_rows(
                xw, int(0.4 * xw.shape[1]), w_
            )
    for name, fn in cases.items():
        times = kernel_times(fn)
        parts = ", ".join(f"{kname}: {t:.2f}" for kname, t in times.items())
        print(f"{name}: total {sum(times.values()):.2f} us [{parts}]", flush=True)
        emit(f"profile.{slug(name)}.total_us", sum(times.values()), "us")


if __name__ == "__main__":
    main()
