"""Figure: expert-block decode GEMV vs cuBLAS and vs the sparse-input GEMV, batch 1.

An MoE-converted FFN (``qsparse.moe``) whose experts are contiguous row blocks of
``Wt = W_downᵀ`` [F, d] computes a token's down projection from the experts its router picked
(:func:`qsparse.moe.expert_gemv.expert_gemv`: whole ``m``-row blocks, no per-element
selection). Baselines in the same run, at the same kept fraction ``f`` of the F inputs:

- cuBLAS ``F.linear(h, W_down)`` over all F inputs (dense);
- our sparse-input GEMV (:func:`qsparse.kernels.gemv.sparse_gemv`) keeping ``k = f·F``
  inputs, given the kept-row list (``excl.``: the list precomputed, as the expert list is)
  and selecting top-k itself (``incl.``).

Shapes: the 7B down projection (11008 -> 4096) and SmolLM2-135M's (1536 -> 576), experts of
32 neurons, kept fractions 0.25 / 0.4 / 0.5 (the experts picked at random: only the count
matters to the time). Weights rotate through ``--buffers`` copies so L2 cannot serve them;
times per call from CUDA-graph replays (``benchmarks/_timing.py``).

    PYTHONPATH=$PWD python3 benchmarks/expert_gemv.py            # GPU
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python3 benchmarks/expert_gemv.py --cpu-check

``--cpu-check`` runs no timing: it checks the kernel (Triton interpreter) against the torch
reference and against the sparse-input GEMV's reference on the same kept rows, on small
shapes, and exits. Measured on one H200 (2026-12-01): ``benchmarks/README.md`` (decode table)
and ``docs/moe.md``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qsparse.moe.expert_gemv import (
    ExpertGemvConfig,
    expert_gemv,
    expert_gemv_reference,
    expert_rows,
)

SHAPES = {"7B_down": (11008, 4096), "smollm2_down": (1536, 576)}
EXPERT_SIZE = 32
KEEP = (0.25, 0.4, 0.5)
CONFIGS = [
    ExpertGemvConfig(block_n=bn, split=sp, num_warps=nw)
    for bn in (32, 64, 128)
    for sp in (1, 2, 4, 8)
    for nw in (2, 4)
]


def pick_experts(n_experts: int, keep: float, seed: int = 0) -> torch.Tensor:
    """``round(keep · E)`` distinct experts (at least one), ascending, int32."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, round(keep * n_experts))
    return torch.randperm(n_experts, generator=g)[:n].sort().values.to(torch.int32)


def cpu_check() -> None:
    """Kernel == torch reference == the sparse-input GEMV's reference on the kept rows."""
    from qsparse.kernels.gemv import sparse_gemv_reference

    g = torch.Generator().manual_seed(0)
    for (f, d), m, cfg in [
        ((96, 40), 8, ExpertGemvConfig(block_n=16)),
        ((120, 24), 12, ExpertGemvConfig(block_n=16, split=3)),
    ]:
        wt = torch.randn(f, d, generator=g)
        h = torch.randn(1, f, generator=g)
        sel = pick_experts(f // m, 0.4)
        got = expert_gemv(h, wt, sel, m, cfg)
        ref = expert_gemv_reference(h, wt, sel, m)[0]
        kept = torch.zeros_like(h)
        rows = expert_rows(sel, m)
        kept[:, rows] = h[:, rows]
        other = sparse_gemv_reference(kept, wt, None)[0]
        err = max((got - ref).abs().max().item(), (got - other).abs().max().item())
        print(f"# cpu check F={f} d={d} m={m} {cfg}: max abs err {err:.2e}")
        assert err < 1e-4, err
    print("cpu check ok")


def measure(name: str, ws: list, wts: list, sparse_wts: list, h: torch.Tensor, keep: float):
    """One row: the four kernels on the same kept entries of ``h`` (experts of 32)."""
    from benchmarks._figures import emit
    from benchmarks._timing import row, sweep, time_graph
    from qsparse.kernels import gemv as G

    f, d = wts[0].shape
    out = torch.empty(d, device="cuda", dtype=torch.float32)
    sel = pick_experts(f // EXPERT_SIZE, keep).cuda()
    rows = expert_rows(sel, EXPERT_SIZE)
    hk = torch.zeros_like(h)
    hk[:, rows] = h[:, rows]  # the same kept entries for every kernel
    k = rows.numel()
    ref = expert_gemv_reference(h, wts[0], sel, EXPERT_SIZE).float()[0]
    got = expert_gemv(h, wts[0], sel, EXPERT_SIZE, out=out)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2

    def expert_calls(cfg: ExpertGemvConfig) -> list:
        return [lambda wt=wt: expert_gemv(h, wt, sel, EXPERT_SIZE, cfg, out) for wt in wts]

    # the fastest launch shape by time alone (configs do not order; equal times are common)
    best = sweep(CONFIGS, expert_calls, f"{name} keep {keep}", top=1)
    t_exp = time_graph(expert_calls(best))
    t_dense = time_graph([lambda w=w: F.linear(h, w) for w in ws])
    listed = G.compact_rows(hk, k)
    t_ex = time_graph(
        [lambda w=w: G.sparse_gemv(hk, w, k, rows=listed, n_out=d) for w in sparse_wts]
    )
    t_in = time_graph([lambda w=w: G.sparse_gemv(hk, w, k, n_out=d) for w in sparse_wts])
    cells = [f"{t:.1f}" for t in (t_dense, t_ex, t_in, t_exp)]
    ratios = [f"{t / t_exp:.2f}x" for t in (t_dense, t_ex, t_in)]
    print(row(name, keep, *cells, *ratios), flush=True)
    key = f"expert_gemv.{name}_keep{keep}"
    emit(f"{key}.vs_cublas", t_dense / t_exp)
    emit(f"{key}.vs_sparse_excl", t_ex / t_exp)
    emit(f"{key}.vs_sparse_incl", t_in / t_exp)
    emit(f"{key}.expert_us", t_exp, "us")
    emit(f"{key}.cublas_us", t_dense, "us")


def main() -> None:
    from benchmarks._timing import row
    from qsparse.kernels import gemv as G

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    torch.manual_seed(0)
    head = ["shape", "kept", "cuBLAS us", "sparse excl. us", "sparse incl. us", "expert us"]
    print(row(*head, "vs cuBLAS", "vs sparse excl.", "vs sparse incl."))
    print(row(*["---"] * 9))
    for name, (f, d) in SHAPES.items():
        copies = max(args.buffers, int(120e6 // (f * d * 2)))
        ws = [torch.randn(d, f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]  # [F, d]: expert blocks are row blocks
        sparse_wts = [G.prepare_dense(w) for w in ws]
        h = torch.randn(1, f, device="cuda", dtype=torch.bfloat16)
        for keep in KEEP:
            measure(name, ws, wts, sparse_wts, h, keep)
        del ws, wts, sparse_wts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
