"""Figure: TEAL's threshold through the sparse-input GEMV vs cuBLAS vs top-k + GEMV, at equal
kept fraction, on the 7B projection shapes (bf16, batch 1, S = 0.4 and 0.5: TEAL's points).

A TEAL site keeps ``|x| > t`` with ``t`` calibrated once (the S-quantile of ``|x|``); Q-Sparse
keeps the top ``k = int((1 - S) K)`` per token, which needs a selection pass (a radix select)
before the GEMV. The threshold needs none: its kept list is one compare and one prefix sum.
Per shape and S, each call inside a CUDA graph over ``--buffers`` weight copies (L2 cannot
serve them), times per call:

- ``dense``: ``F.linear(x, W)`` (cuBLAS), the baseline;
- ``topk``: ``sparse_gemv(x, Wt, k)``: top-k selection + list + GEMV;
- ``topk_carry``: the same with the threshold carried from the previous call (``hint=``);
- ``threshold``: :func:`qsparse.kernels.threshold_gemv.threshold_gemv`, the public path: the
  one-program list kernel, then the GEMV reading the list's length on the device (no host
  sync; the count differs from token to token);
- ``threshold_plain``: the same list kernel launched on its own, then the GEMV (no
  programmatic dependent launch, an index list and a value list instead of packed words):
  the public path before 2026-12-03, measured beside it;
- ``threshold_torch``: the same list built by PyTorch ops (:func:`threshold_rows_torch`: a
  compare, a cumsum, two scatters) and the count passed from the host, what the threshold
  path was before the list kernel;
- ``list_only``: ``sparse_gemv`` on a list built beforehand: the GEMV alone, the bound a
  threshold path can reach.

``t`` is the S-quantile of ``|x|`` over ``--calibration`` draws of the same distribution
(TEAL's calibration), so a call keeps about ``1 - S`` of its inputs; the kept fraction the
threshold calls reached is printed (``kept``).

Before timing, both threshold paths are checked against ``(x · 1[|x| > t]) Wᵀ`` in fp32; on
CPU under ``TRITON_INTERPRET=1`` (``--device cpu --check-only``) that check is all it runs.

    PYTHONPATH=$PWD python3 benchmarks/teal_gemv.py [--json out.json]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python3 benchmarks/teal_gemv.py --device cpu --check-only
    # end to end instead: dense / top-k / fixed thresholds
    PYTHONPATH=$PWD python3 benchmarks/teal_gemv.py --decode 7B,1.3B --sparsity 0.6

FIGURE lines per shape and S under ``teal_gemv.<shape>_S<S>``: ``dense_us``, ``topk`` /
``topk_us``, ``topk_carry`` / ``topk_carry_us``, ``threshold`` / ``threshold_us``,
``threshold_plain`` / ``threshold_plain_us``, ``threshold_torch`` / ``threshold_torch_us``,
``list_only`` / ``list_only_us``, ``kept_pct`` (kept inputs, %); a ratio is cuBLAS time over
the path's. With ``--decode``, per preset under
``teal_gemv.decode_<preset>``: ``<path>`` (ratio to dense), ``<path>.tokens_per_s`` and, for
the threshold paths, ``<path>.kept_pct``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks._figures import emit
from benchmarks._timing import row, time_graph
from qsparse.kernels import gemv as G
from qsparse.kernels.threshold_gemv import threshold_gemv, threshold_rows

SHAPES = {  # name: (in, out) of the fused 7B projections (as benchmarks/sparse_gemv_7b.py)
    "qkv": (4096, 12288),
    "o": (4096, 4096),
    "gate_up": (4096, 22016),
    "down": (11008, 4096),
}
CPU_SHAPES = {"qkv": (256, 192), "down": (320, 128)}
SPARSITIES = (0.4, 0.5)


def threshold_rows_torch(
    x: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept list of ``x[1, K]`` under ``|x| > t`` in :func:`~qsparse.kernels.gemv.
    compact_rows`' format: (idx int32 [K], val fp32 [1, K], cnt int32 [1]); ``idx[:cnt]``
    ascending, ``val[0, p] = x[0, idx[p]]``. Entries past ``cnt`` are 0. No host sync."""
    width = x.shape[-1]
    keep = x[0].abs() > t
    pos = torch.cumsum(keep, 0, dtype=torch.int32) - 1
    slot = torch.where(keep, pos, width).long()  # dropped inputs go to a spare last slot
    idx = torch.zeros(width + 1, dtype=torch.int32, device=x.device)
    idx.scatter_(0, slot, torch.arange(width, dtype=torch.int32, device=x.device))
    val = torch.zeros(width + 1, dtype=torch.float32, device=x.device)
    val.scatter_(0, slot, x[0].float())
    return idx[:width], val[:width][None], (pos[-1:] + 1)


def calibrate(kin: int, sparsity: float, draws: int, device: str) -> float:
    """``t``: the ``sparsity``-quantile of ``|x|`` over ``draws`` rows of the input
    distribution (bf16 normal)."""
    x = torch.randn(draws, kin, device=device, dtype=torch.bfloat16).float().abs()
    return float(torch.quantile(x.flatten()[: 2**24], sparsity))


def check(kin: int, n: int, t: float, device: str) -> None:
    """Threshold list + sparse GEMV vs ``(x · 1[|x| > t]) Wᵀ`` on fresh inputs."""
    w = torch.randn(n, kin, device=device, dtype=torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    for _ in range(3):
        x = torch.randn(1, kin, device=device, dtype=torch.bfloat16)
        masked = x.float() * (x.float().abs() > t)
        ref = masked @ w.float().t()
        rows = threshold_rows_torch(x, t)
        count = int(rows[2])
        assert torch.equal(rows[0][:count].long(), masked[0].nonzero().flatten())
        for path, got in (
            ("threshold_torch", G.sparse_gemv(x, wt, count, n_out=n, rows=rows)),
            ("threshold", threshold_gemv(x, wt, t, n_out=n)),
            ("threshold_plain", G.sparse_gemv(x, wt, count, n_out=n, rows=threshold_rows(x, t))),
        ):
            err = ((got.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (path, kin, n, err)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=256, help="input rows calibrating t")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--check-only", action="store_true", help="the correctness check on small shapes only"
    )
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--decode",
        default="",
        help="only decode end to end: comma list of presets (dense / top-k / fixed thresholds, "
        "batch 1, compiled step)",
    )
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.decode:
        for preset in args.decode.split(","):
            decode(preset, args.decode_tokens, args.sparsity[-1], args.device)
        return
    if args.check_only:
        for name, (kin, n) in CPU_SHAPES.items():
            for s in args.sparsity:
                check(kin, n, calibrate(kin, s, args.calibration, args.device), args.device)
                print(f"teal_gemv check {name} {kin}->{n} S={s:g}: threshold list + GEMV ok")
        return
    results = []
    head = ("shape", "S", "dense us", "top-k us (x)", "top-k carry us (x)", "threshold us (x)")
    tail = ("threshold, plain us (x)", "threshold, torch list us (x)", "list only us (x)")
    print(row(*head, *tail, "kept"))
    print(row(*["---"] * 10))
    for name, (kin, n) in SHAPES.items():
        ws = [
            torch.randn(n, kin, device=args.device, dtype=torch.bfloat16) * 0.02
            for _ in range(args.buffers)
        ]
        for s in args.sparsity:
            results.append(measure(name, ws, s, args.calibration, args.device))
        del ws
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


def decode(preset: str, new_tokens: int, sparsity: float, device: str) -> None:
    """End to end (``--decode PRESET``): greedy decode tokens/s at batch 1 (random weights,
    bf16, compiled step, CUDA graph: ``qsparse-generate``'s own measurement,
    :func:`qsparse.cli.generate.measure`) of dense, Q-Sparse top-k and fixed thresholds at
    ``sparsity`` (``qsparse_threshold``, calibrated on the decoded positions), in one process;
    the ratios to dense and what the threshold sites kept."""
    from qsparse.cli.generate import _parser
    from qsparse.cli.generate import measure as decode_rows

    args = _parser().parse_args(
        [
            *("--preset", preset, "--device", device, "--batch", "1"),
            *("--new-tokens", str(new_tokens), "--sparsity", str(sparsity), "--compile"),
        ]
    )
    rows = decode_rows(args, ["dense", "qsparse", "qsparse_threshold"])
    names = ("dense", "qsparse", "threshold")
    found = {n: (r[1], r[3]) for n, r in zip(names, rows, strict=True)}
    key = f"teal_gemv.decode_{preset}"
    dense = found["dense"][0]
    for name, (tps, kept) in found.items():
        emit(f"{key}.{name}.tokens_per_s", tps, "tokens/s")
        emit(f"{key}.{name}", tps / dense)
        if kept is not None:
            emit(f"{key}.{name}.kept_pct", 100 * kept, "%")
    print(
        f"RATIO teal_gemv decode {preset} S={sparsity:g} vs dense: "
        + ", ".join(f"{n} {t / dense:.2f}x" for n, (t, _) in found.items())
    )


def measure(name: str, ws: list[torch.Tensor], s: float, draws: int, device: str) -> dict:
    """Time every path (module docstring) on the weights ``ws`` at sparsity ``s``; print the
    table row and the FIGURE lines; return the row's numbers."""
    n, kin = ws[0].shape
    wts = [G.prepare_dense(w) for w in ws]
    k = int((1 - s) * kin)
    t = calibrate(kin, s, draws, device)
    check(kin, n, t, device)
    xs = [torch.randn(1, kin, device=device, dtype=torch.bfloat16) for _ in ws]
    counts = [int((x.float().abs() > t).sum()) for x in xs]  # host-known (docstring)
    lists = [threshold_rows_torch(x, t) for x in xs]
    t_dev = torch.tensor([t], dtype=torch.float32, device=device)
    hint = G.new_hint(16, device)

    def timed(fn, weights):
        return time_graph(
            [
                lambda w=w, x=x, c=c, r=r: fn(x, w, c, r)
                for w, x, c, r in zip(weights, xs, counts, lists, strict=True)
            ]
        )

    dense = timed(lambda x, w, c, r: F.linear(x, w), ws)
    times = {
        "topk": timed(lambda x, wt, c, r: G.sparse_gemv(x, wt, k, n_out=n), wts),
        "topk_carry": timed(lambda x, wt, c, r: G.sparse_gemv(x, wt, k, n_out=n, hint=hint), wts),
        "threshold": timed(
            lambda x, wt, c, r: threshold_gemv(x, wt, t_dev, n_out=n, expected_kept=k), wts
        ),
        "threshold_plain": timed(
            lambda x, wt, c, r: G.sparse_gemv(x, wt, c, n_out=n, rows=threshold_rows(x, t_dev)),
            wts,
        ),
        "threshold_torch": timed(
            lambda x, wt, c, r: G.sparse_gemv(x, wt, c, n_out=n, rows=threshold_rows_torch(x, t)),
            wts,
        ),
        "list_only": timed(lambda x, wt, c, r: G.sparse_gemv(x, wt, c, n_out=n, rows=r), wts),
    }
    kept = sum(counts) / (len(counts) * kin)
    cells = [f"{v:.1f} ({dense / v:.2f}x)" for v in times.values()]
    print(row(f"{name} {kin}->{n}", f"{s:g}", f"{dense:.1f}", *cells, f"{kept:.3f}"))
    key = f"teal_gemv.{name}_S{s:g}"
    emit(f"{key}.dense_us", dense, "us")
    emit(f"{key}.kept_pct", 100 * kept, "%")
    for path, v in times.items():
        emit(f"{key}.{path}", dense / v)
        emit(f"{key}.{path}_us", v, "us")
    print(
        f"RATIO teal_gemv {name} S={s:g}: "
        + ", ".join(f"{p} {dense / v:.2f}x" for p, v in times.items())
    )
    return dict(shape=name, kin=kin, n=n, sparsity=s, k=k, kept=kept, t=t, dense_us=dense) | {
        f"{p}_us": v for p, v in times.items()
    }


if __name__ == "__main__":
    main()
