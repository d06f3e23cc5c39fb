"""Cross-layer sparsity allocation: layers get different sparsities at uniform S's budget.

TEAL's greedy (:mod:`qsparse.methods.allocation`, ``sparsity.allocation=greedy``) keeps every
decoder layer at the weighted sparsity ``S`` and spreads it over the layer's four sites.
Layers differ in how much a given sparsity costs them, so ``sparsity.allocation=cross_layer``
also moves sparsity between layers while the whole model's activated parameters stay those of
uniform ``S``:

1. **Curves.** Per layer ``l``, the within-layer greedy runs from ``s = 0`` up to the layer
   cap ``C`` (``sparsity.layer_cap``) on the layer's dense inputs (captured once, as greedy
   does) and keeps its trace: after step ``j`` the layer sits at
   ``S_l^j = Σ s·w / Σ w`` with site ratios ``s^j`` and block error ``e_l^j``. The greedy
   at any ``S`` is this trace cut at ``S``, so one search per layer serves every budget
   (the curves are cached without ``S``).
2. **Comparable errors.** ``r_l = e_l / n_l`` with ``n_l = mean_tokens ||y_l||₂``, the norm of
   the layer's dense output (the residual stream after it) on the same tokens. Every later
   layer and the head read the stream through an RMSNorm, which divides by its norm, so an
   error ``δ`` added at layer ``l`` moves what they see by about ``||δ|| / ||y_l||``.
   Dividing by the layer's own update ``||y_l - x_l||`` instead would rank a layer as
   sensitive just because its update is small next to the stream, although its error is then
   small for everything downstream too. (The positions with massive activations, the first
   of each sequence, lie outside the last quarter the error is read on.)
3. **Objective.** ``minimise Σ_l r_l(S_l)²  subject to  Σ_l S_l·W_l = S·Σ_l W_l,
   0 <= S_l <= C``, ``W_l`` the layer's weights in d² units (so the constraint is the one on
   activated parameters). Squares, because the errors of different layers come from
   independent masks and add about orthogonally (``||Σ δ_l||² ≈ Σ ||δ_l||²``), and a loss near
   its minimum grows with the square of a small perturbation.
4. **Allocation.** Each layer's points ``(R, c) = (S_l^j·W_l, (r_l^j)²)`` are replaced by
   their lower convex hull from ``(0, 0)``; the hull segments of all layers are taken in
   order of increasing slope (marginal cost per d² of weight removed) until the removed
   weight is ``S·Σ W``, the last segment cut to land on it exactly. On convex curves this
   is the optimum of the separable problem. A layer's site ratios at ``S_l`` are its trace
   at ``S_l`` (linear between the two neighbouring steps): every layer but the one cut sits
   on a step, i.e. exactly on the within-layer greedy's result at its ``S_l``.

Limits: each layer's error is measured with every other layer dense (as TEAL's), so
interactions between layers are ignored, and ``Σ r²`` is a proxy for the model's loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_text
from .allocation import STEP, greedy_allocation, layer_searches

#: one layer's trace: [(S_l, r_l, site -> s), ...] from (0, 0, zeros), S_l increasing
Trace = list[tuple[float, float, dict[str, float]]]


def lower_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of ``(x, y)`` points, in increasing ``x`` (Andrew's monotone
    chain; collinear points dropped, so the slopes strictly increase)."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-2], hull[-1]
            if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def cross_layer_budgets(
    curves: Sequence[Sequence[tuple[float, float]]], weights: Sequence[float], target: float
) -> list[float]:
    """Layer sparsities ``S_l`` minimising ``Σ_l c_l(S_l)`` at ``Σ_l S_l·W_l = target·Σ_l W_l``
    (module docstring, step 4).

    Args:
        curves: per layer, ``(S_l, c_l)`` points (cost ``c_l`` at layer sparsity ``S_l``;
            ``(0, 0)`` is added); the largest ``S_l`` given is the layer's cap.
        weights: per layer, ``W_l`` (any unit shared by all layers).
        target: the model's weighted sparsity ``S``.

    Raises ``ValueError`` when the caps cannot hold the budget.
    """
    if len(curves) != len(weights) or not curves:
        raise ValueError("cross_layer_budgets needs one curve per layer weight")
    budget = target * sum(weights)
    segments: list[tuple[float, int, float]] = []  # (slope, layer, weight removed)
    for layer, (curve, w) in enumerate(zip(curves, weights, strict=True)):
        hull = lower_hull([(0.0, 0.0), *((s * w, c) for s, c in curve if s > 0)])
        for (ax, ay), (bx, by) in zip(hull, hull[1:], strict=False):
            segments.append(((by - ay) / (bx - ax), layer, bx - ax))
    removed = [0.0] * len(curves)
    left = budget
    for _, layer, length in sorted(segments):
        if left <= 0:
            break
        take = min(length, left)
        removed[layer] += take
        left -= take
    if left > 1e-9 * max(budget, 1.0):
        reach = sum(removed) / sum(weights)
        raise ValueError(
            f"the layer caps reach S={reach:.4f} at most, below the target {target}: raise "
            "sparsity.layer_cap"
        )
    return [r / w for r, w in zip(removed, weights, strict=True)]


def trace_at(trace: Trace, s: float) -> dict[str, float]:
    """Site ratios at layer sparsity ``s`` along ``trace`` (linear between its steps)."""
    points = [(0.0, {k: 0.0 for k in trace[0][2]})] if trace else []
    points += [(sl, sites) for sl, _, sites in trace]
    if not points or s > points[-1][0] + 1e-9:
        raise ValueError(f"layer sparsity {s} is beyond the trace (cap {points[-1][0]:.4f})")
    for (s0, a), (s1, b) in zip(points, points[1:], strict=False):
        if s <= s1:
            f = min(max((s - s0) / (s1 - s0), 0.0), 1.0)
            return {k: a[k] + f * (b[k] - a[k]) for k in a}
    return dict(points[-1][1])


def layer_curves(
    model: nn.Module, batches: list[torch.Tensor], cap: float, step: float = STEP
) -> list[dict[str, Any]]:
    """Per decoder layer of a :func:`qsparse.sparsify`-ed (``token_topk``) model, the
    within-layer greedy's trace up to layer sparsity ``cap`` (module docstring, steps 1-2):
    ``{"names": site -> metric name, "weights": site -> w (d²), "trace": [[S_l, r_l,
    site -> s], ...]}`` (JSON-ready), with ``r_l`` the error relative to ``||y_l||``."""

    def search(err: Callable, weights: dict[str, float], site_cap: float) -> dict[str, Any]:
        trace: list[tuple[dict[str, float], float]] = []
        greedy_allocation(err, weights, cap, step, site_cap, trace=trace)
        total = sum(weights.values())
        points = [[sum(s[k] * weights[k] for k in s) / total, e, s] for s, e in trace]
        return {"weights": weights, "trace": points}

    found = layer_searches(model, batches, search, relative=True)
    return [{"names": names, **curve} for names, curve in found]


def cross_layer_table(curves: list[dict[str, Any]], target: float) -> dict[str, float]:
    """Site metric name -> ratio at model sparsity ``target`` from :func:`layer_curves`:
    budgets by :func:`cross_layer_budgets` on the costs ``r_l²``, site ratios by
    :func:`trace_at`."""
    weights = [sum(c["weights"].values()) for c in curves]
    costs = [[(sl, r * r) for sl, r, _ in c["trace"]] for c in curves]
    budgets = cross_layer_budgets(costs, weights, target)
    table: dict[str, float] = {}
    for curve, s_layer in zip(curves, budgets, strict=True):
        sites = trace_at([tuple(p) for p in curve["trace"]], s_layer)  # type: ignore[misc]
        table.update({curve["names"][k]: round(v, 6) for k, v in sites.items()})
    return table


def cross_layer_site_ratios(
    model: nn.Module,
    batches: Callable[[], list[torch.Tensor]],
    target: float,
    cap: float,
    step: float = STEP,
    curves_path: Path | None = None,
) -> dict[str, float]:
    """:func:`cross_layer_table` at ``target`` of the model's :func:`layer_curves` up to
    ``cap``, read from ``curves_path`` when it exists, else searched on ``batches()`` and
    written there (``None``: not cached)."""
    if curves_path is not None and curves_path.is_file():
        curves = json.loads(curves_path.read_text())
    else:
        curves = layer_curves(model, batches(), cap, step)
        if curves_path is not None:
            atomic_write_text(curves_path, json.dumps(curves))
    return cross_layer_table(curves, target)
