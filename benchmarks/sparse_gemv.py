"""Figure: sparse-input decode GEMV vs cuBLAS dense GEMV (4096 -> 11008, bf16).

Dense baseline: ``F.linear(x, W)`` (cuBLAS) with ``W`` [11008, 4096]. Sparse:
:func:`qsparse.kernels.gemv.sparse_gemv` on ``Wt`` [4096, 11008], keeping the top
``k = int((1 - S) * 4096)`` inputs per token: one small kernel lists the kept inputs, a second
streams exactly their weight rows. Both cycle through ``--buffers`` weight copies (90 MB each,
L2 is 50 MB) inside one CUDA graph; times are per call. "incl. top-k" runs the selection in
every call; "excl." passes a precomputed list. A launch-config sweep at batch 1 picks the
kernel shape.

    PYTHONPATH=$PWD python3 benchmarks/sparse_gemv.py

Goal (issue 5): >= 2.0x cuBLAS at S=0.6, batch 1 (ideal 2.5x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._timing import emit_vs_dense, gemv_setup, row, sweep, time_graph
from qsparse.kernels import gemv as G

SWEEP = [  # block_k, block_n (columns per program), panel width (None: row-major), split,
    # num_warps, num_stages (tiles in flight)
    (128, 64, None, 1, 4, 3),
    (128, 64, None, 1, 4, 4),
    (64, 64, None, 1, 4, 4),
    (32, 64, None, 1, 4, 6),
    (128, 64, None, 1, 8, 3),
    (256, 64, None, 1, 8, 3),
    (128, 128, None, 1, 8, 3),
    (64, 64, None, 2, 4, 4),
    (128, 64, 64, 1, 4, 4),  # 64-wide column panels
]


def main() -> None:
    args, ws = gemv_setup(__doc__)
    kin = args.in_features
    panels: dict[int | None, list[torch.Tensor]] = {}

    def weights(bn: int | None) -> list[torch.Tensor]:
        """The weight copies in one layout (None: row-major), one layout kept at a time."""
        if bn not in panels:
            panels.clear()  # 8 x 90 MB each
            panels[bn] = [G.prepare_dense(w, bn) for w in ws]
        return panels[bn]

    def dense_calls(x):
        return [lambda w=w: F.linear(x, w) for w in ws]

    def sparse_calls(x, k, cfg, rows=None, panel=None):
        return [lambda wt=wt: G.sparse_gemv(x, wt, k, cfg, rows=rows) for wt in weights(panel)]

    x1 = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k60 = int(0.4 * kin)
    wt0 = weights(None)[0]
    ref = G.sparse_gemv_reference(x1, wt0, k60)
    got = G.sparse_gemv(x1, wt0, k60)
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"# rel err vs reference at S=0.6: {err:.2e}")
    assert err < 1e-2

    best, best_panel = G.GemvConfig(), None
    if not args.quick:
        sel = []
        for radix, sw, bpp, db in [
            (True, 8, 1, 8),
            (True, 8, 1, 5),
            (True, 16, 1, 5),
            (True, 4, 1, 5),
            (True, 8, 1, 4),
            (False, 8, 2, 5),
        ]:
            fn = [
                lambda sw=sw, radix=radix, bpp=bpp, db=db: G.compact_rows(
                    x1, k60, sw, radix, bpp, db
                )
            ]
            t = time_graph(fn, reps=16, replays=10)
            name = f"radix {db}-bit digits" if radix else f"bisection {bpp} bit(s)/pass"
            print(f"# selection + list ({name}, one program, {sw} warps): {t:.2f} us")
            sel.append((t, radix, sw, bpp, db))
        _, radix, sw, bpp, db = min(sel)
        configs = [
            (
                G.GemvConfig(
                    block_k=bk,
                    block_n=bn,
                    split=split,
                    num_warps=nw,
                    num_stages=ns,
                    radix=radix,
                    select_warps=sw,
                    bits_per_pass=bpp,
                    digit_bits=db,
                    pdl=True,
                ),
                panel,
            )
            for bk, bn, panel, split, nw, ns in SWEEP
        ]
        best, best_panel = sweep(
            configs, lambda c: sparse_calls(x1, k60, c[0], panel=c[1]), "S=0.6", top=8
        )
    print(f"# config: {best}, panel width {best_panel}")
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
        cfg = best if batch == 1 else G.sparse_config_for(kin, args.out_features, k, batch)
        t_dense = time_graph(dense_calls(x))
        panel = best_panel if batch == 1 else None
        t_sp = time_graph(sparse_calls(x, k, cfg, panel=panel))
        rows = G.compact_rows(x, k, cfg.select_warps, cfg.radix, cfg.bits_per_pass, cfg.digit_bits)
        t_ex = time_graph(sparse_calls(x, k, cfg, rows, panel))
        timed = {"incl": t_sp, "excl": t_ex}
        emit_vs_dense(f"sparse_gemv.b{batch}_S{s}", (batch, s), t_dense, timed)


def _shape_row(name: str, kin: int, n: int) -> None:
    """One projection shape at S=0.6, batch 1, with the launch shape sparse_config_for picks."""
    copies = max(8, int(120e6 // (kin * n * 2)))  # > 2x the 50 MB L2 in all
    ws = [torch.randn(n, kin, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    wts = [G.prepare_dense(w) for w in ws]
    x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k = int(round(0.4 * kin))
    rows = G.compact_rows(x, k)
    t_dense = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    t_in = time_graph([lambda wt=wt: G.sparse_gemv(x, wt, k, n_out=n) for wt in wts])
    t_ex = time_graph([lambda wt=wt: G.sparse_gemv(x, wt, k, rows=rows, n_out=n) for wt in wts])
    timed = {"incl": t_in, "excl": t_ex}
    emit_vs_dense(f"sparse_gemv.1.3B_{name}", (name, f"{kin} -> {n}"), t_dense, timed)


def decode_shapes() -> None:
    """The four projection shapes of the 1.3B preset (hidden 2048, FFN 5460)."""
    head = ["projection", "K -> N", "cuBLAS dense us", "sparse incl. us", "sparse excl. us"]
    print(row(*head, "speed-up incl.", "speed-up excl."))
    print(row(*["---"] * 7))
    for name, kin, n in [
        ("qkv", 2048, 6144),
        ("o", 2048, 2048),
        ("gate_up", 2048, 10920),
        ("down", 5460, 2048),
    ]:
        _shape_row(name, kin, n)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
    decode_shapes()
