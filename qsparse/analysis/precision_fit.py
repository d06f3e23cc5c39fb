"""The scaling-law fit of one precision's sweep points, and parameter counts as text.

For each precision (full-precision weights, BitNet b1.58 ternary weights) the finished jobs
give points ``(N, S, L)``: N = ``params_total``, S from :func:`~qsparse.analysis.sweep.
law_sparsity`, L = ``val_loss``; :func:`fit_precision` fits the law of
:mod:`qsparse.analysis.scaling_law` to them, with bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scaling_law import BootstrapIntervals, ScalingLaw, bootstrap_scaling_law, fit_scaling_law
from .sweep import FULL_PRECISION, TERNARY, Sweep, SweepJob, law_sparsity

__all__ = [
    "PAPER_S_STAR",
    "PrecisionFit",
    "default_budget",
    "fit_precision",
    "format_params",
    "parse_params",
]

#: S* of the paper's fits (Q-Sparse §3), by precision.
PAPER_S_STAR = {FULL_PRECISION: 0.4558, TERNARY: 0.6125}


@dataclass
class PrecisionFit:
    """The fit of one precision's points, or why there is none (``reason``)."""

    precision: str
    jobs: list[SweepJob]
    n: np.ndarray
    s: np.ndarray
    loss: np.ndarray
    law: ScalingLaw | None = None
    intervals: BootstrapIntervals | None = None
    reason: str = ""

    @property
    def s_star(self) -> float | None:
        return None if self.law is None else self.law.optimal_sparsity()


def fit_precision(
    precision: str,
    jobs: Sequence[SweepJob],
    sparsity_mode: str = "overall",
    n_boot: int = 200,
    seed: int = 0,
) -> PrecisionFit:
    """Fit ``L(N, S)`` to one precision's finished jobs (needs >= 5 points, >= 2 sizes and
    >= 2 sparsities; otherwise ``law`` is ``None`` and ``reason`` says why)."""
    jobs = [j for j in jobs if j.status == "ok" and j.precision == precision]
    n = np.array([float(j.summary["params_total"]) for j in jobs])
    s = np.array([law_sparsity(j, sparsity_mode) for j in jobs])
    y = np.array([float(j.summary["val_loss"]) for j in jobs])
    out = PrecisionFit(precision, list(jobs), n, s, y)
    if len(jobs) < 5:
        out.reason = f"{len(jobs)} finished job(s); fitting 5 constants needs at least 5"
    elif len(set(n.tolist())) < 2:
        out.reason = "one model size only: alpha and E cannot be separated"
    elif len(set(np.round(s, 4).tolist())) < 2:
        out.reason = "one sparsity only: A(S) cannot be fitted"
    if out.reason:
        return out
    out.law = fit_scaling_law(n, s, y)
    if n_boot > 0:
        out.intervals = bootstrap_scaling_law(n, s, y, fit=out.law, n_boot=n_boot, seed=seed)
    return out


def default_budget(sweep: Sweep) -> float:
    """The median activated parameters of the finished jobs (the S* plot's Na)."""
    values = [float(j.summary.get("params_activated") or 0) for j in sweep.ok]
    values = [v for v in values if v > 0]
    return float(np.median(values)) if values else 1e6


def format_params(x: float) -> str:
    """A parameter count as ``"2.9B"``, ``"350M"``, ``"120K"`` (3 significant digits)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def parse_params(text: str) -> float:
    """``"2.9B"``, ``"350M"``, ``"120K"`` or ``"1e6"`` to a number of parameters."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1.0)
    value = float(t[:-1] if scale != 1.0 else t) * scale
    if value <= 0:
        raise ValueError(f"parameter budget {text!r} must be positive")
    return value
