"""Figure: sparse-input decode GEMV vs cuBLAS dense GEMV (4096 -> 11008, bf16).

Dense baseline: ``F.linear(x, W)`` (cuBLAS) with ``W`` [11008, 4096]. Sparse:
:func:`qsparse.kernels.gemv.sparse_gemv` on ``Wt`` [4096, 11008], keeping the top
``k = int((1 - S) * 4096)`` inputs per token and reading only their weight rows. Both cycle
through ``--buffers`` weight copies (90 MB each, L2 is 50-60 MB) inside one CUDA graph; times
are per call. "incl. top-k" runs the selection kernel in every call; "excl." passes a
precomputed selection. A small launch-config sweep at batch 1 picks the kernel shape.

    PYTHONPATH=$PWD python3 benchmarks/sparse_gemv.py

Goal (issue 5): >= 2.0x cuBLAS at S=0.6, batch 1 (ideal 2.5x).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks._timing import gemv_setup, row, time_graph
from qsparse.kernels import gemv as G


def main() -> None:
    args, ws = gemv_setup(__doc__)
    kin = args.in_features
    wts = [G.prepare_dense(w) for w in ws]

    def dense_calls(x):
        return [lambda w=w: F.linear(x, w) for w in ws]

    def sparse_calls(x, k, cfg, meta=None):
        return [lambda wt=wt: G.sparse_gemv(x, wt, k, cfg, meta=meta) for wt in wts]

    x1 = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k60 = int(0.4 * kin)
    # correctness of what we time
    ref = G.sparse_gemv_reference(x1, wts[0], k60)
    got = G.sparse_gemv(x1, wts[0], k60)
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"# rel err vs reference at S=0.6: {err:.2e}")
    assert err < 1e-2

    best = G.GemvConfig()
    if not args.quick:
        results = []
        for bk, bn, split, nw in itertools.product(
            (32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4,)
        ):
            cfg = G.GemvConfig(block_k=bk, block_n=bn, split=split, num_warps=nw)
            try:
                t = time_graph(sparse_calls(x1, k60, cfg), reps=2, replays=10)
            except Exception as e:  # noqa: BLE001  (a shape the compiler rejects)
                print(f"# skip {cfg}: {type(e).__name__}")
                continue
            results.append((t, cfg))
        results.sort(key=lambda r: r[0])
        for t, cfg in results[:5]:
            print(f"# sweep {t:.2f} us {cfg}")
        best = results[0][1]
    print(f"# config: {best}")
    print(
        row(
            "batch",
            "S",
            "cuBLAS dense us",
            "sparse incl. top-k us",
            "sparse excl. top-k us",
            "speed-up incl.",
            "speed-up excl.",
        )
    )
    print(row(*["---"] * 7))
    for batch, s in [(1, 0.6), (1, 0.5), (1, 0.7), (1, 0.8), (2, 0.6), (4, 0.6), (8, 0.6)]:
        x = torch.randn(batch, kin, device="cuda", dtype=torch.bfloat16)
        k = int(round((1 - s) * kin))
        cfg = best if batch == 1 else G.GemvConfig(block_k=64, block_n=128, split=best.split)
        t_dense = time_graph(dense_calls(x))
        t_sp = time_graph(sparse_calls(x, k, cfg))
        meta = G.select_rows(x, k)
        t_ex = time_graph(sparse_calls(x, k, cfg, meta))
        print(
            row(
                batch,
                s,
                f"{t_dense:.1f}",
                f"{t_sp:.1f}",
                f"{t_ex:.1f}",
                f"{t_dense / t_sp:.2f}x",
                f"{t_dense / t_ex:.2f}x",
            ),
            flush=True,
        )
        print(
            f"RATIO sparse_gemv_b{batch}_S{s} incl_topk {t_dense / t_sp:.2f} excl {t_dense / t_ex:.2f}"
        )
    t_dense = time_graph(dense_calls(x1))
    t_ours = time_graph(sparse_calls(x1, None, best))
    print(f"# our kernel with every row kept (k=None): {t_ours:.1f} us vs cuBLAS {t_dense:.1f} us")


if __name__ == "__main__":
    main()
