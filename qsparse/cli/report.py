"""``qsparse-report SWEEP_DIR``: gather a sweep's jobs, fit the scaling law, print S*.

    qsparse-report multirun/scaling_cpu_demo
    qsparse-report multirun/s1 --budget 2.9B --sparsity ratio --wandb disabled

Reads every job's ``summary.json`` (and ``.hydra/overrides.yaml`` / ``config.yaml`` for its
settings), names failed and missing jobs, fits ``L(N, S) = E + (B + C exp(beta/(1-S))) /
N^alpha`` per precision with bootstrap intervals, prints S* at fixed activated parameters and
writes ``report.md``, ``runs.csv``, ``loss_vs_activated.png`` and ``loss_vs_sparsity.png``
into the sweep directory (or ``--out``), then logs them to the sweep's wandb group.

Exit status: 0 when every job finished, else the number of failed + missing jobs (at most
100); 2 for a usage error (no such sweep directory, bad budget).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsparse-report",
        description="Fit the Q-Sparse scaling law to a sweep and report S*.",
        epilog="Exit status: number of failed + missing jobs (0 = all finished), 2 = usage error.",
    )
    p.add_argument("sweep_dir", type=Path, help="multirun/<sweep_name> (or any folder of runs)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    p.add_argument(
        "--budget",
        default=None,
        help="activated-parameter budget Na for the S* plot and the loss at S*, e.g. 2.9B, "
        "350M, 1e6 (default: the median activated parameters of the sweep's jobs)",
    )
    p.add_argument(
        "--sparsity",
        choices=("overall", "ratio"),
        default="overall",
        help="S of the law: measured overall sparsity 1 - activated/total (default) or the "
        "configured top-k ratio",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--wandb",
        choices=("auto", "offline", "online", "disabled"),
        default="auto",
        help="log the table and plots to the sweep's wandb group (auto = offline unless "
        "WANDB_API_KEY is set)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry; returns (and exits with) the status described above."""
    args = _parser().parse_args(argv)
    from qsparse.analysis.precision_fit import parse_params
    from qsparse.analysis.report import make_report
    from qsparse.analysis.sweep import read_sweep

    try:
        budget = parse_params(args.budget) if args.budget is not None else None
        sweep = read_sweep(args.sweep_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"qsparse-report: {exc}", file=sys.stderr)
        return 2
    report = make_report(
        sweep,
        out_dir=args.out,
        budget=budget,
        sparsity_mode=args.sparsity,
        n_boot=args.bootstrap,
        wandb_mode=None if args.wandb == "auto" else args.wandb,
        seed=args.seed,
    )
    print("\n".join(report.lines))
    print("wrote " + ", ".join(str(p) for p in report.files.values()))
    if report.wandb_dir:
        print(f"wandb: {report.wandb_dir}")
    return min(report.problems, 100)


def _entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    _entry()
