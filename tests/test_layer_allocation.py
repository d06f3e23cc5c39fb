"""Cross-layer sparsity allocation (sparsity.allocation=cross_layer,
qsparse/methods/layer_allocation.py): the allocator on hand-made curves and the budget on a tiny
model. The config path through Hydra and the cache keys are in test_allocation.py."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_hf_model, build_tiny_tokenizer

import qsparse
from qsparse.methods.allocation import corpus_batches, greedy_allocation, layer_sites
from qsparse.methods.layer_allocation import (
    cross_layer_budgets,
    cross_layer_table,
    layer_curves,
    lower_hull,
    trace_at,
)
from qsparse.nn import SparsityConfig
from qsparse.nn.sites import sparsifiers
from qsparse.stats import activated_parameters


def _grid(cost, cap: float = 1.0, step: float = 0.05) -> list[tuple[float, float]]:
    n = round(cap / step)
    return [(j * step, cost(j * step)) for j in range(1, n + 1)]


def test_less_sensitive_layer_gets_more_sparsity_at_the_exact_budget() -> None:
    # min a^2 + 4 b^2 at a + b = 2 * 0.5: by hand 2a = 8b, so a = 0.8, b = 0.2 (on the grid)
    curves = [_grid(lambda s: s * s), _grid(lambda s: 4 * s * s)]
    a, b = cross_layer_budgets(curves, [1.0, 1.0], 0.5)
    assert (a, b) == pytest.approx((0.8, 0.2))
    # unequal weights and a budget off the grid: Σ S_l W_l = S Σ W exactly
    budgets = cross_layer_budgets(curves, [1.0, 3.0], 0.337)
    assert budgets[0] * 1.0 + budgets[1] * 3.0 == pytest.approx(0.337 * 4.0, abs=1e-12)
    assert budgets[0] > budgets[1]
    # equal curves: equal sparsities
    assert cross_layer_budgets([curves[0], curves[0]], [2.0, 2.0], 0.4) == pytest.approx([0.4] * 2)


def test_caps_and_non_convex_curves() -> None:
    # a layer whose first steps cost more than the later ones (non-convex): its hull is a
    # straight line from 0, so it is taken whole before the steep layer moves
    bumpy = [(0.1, 0.5), (0.2, 0.5), (0.3, 0.6)]
    steep = _grid(lambda s: 10 * s, cap=0.3, step=0.1)
    assert lower_hull([(0.0, 0.0), *bumpy]) == [(0.0, 0.0), (0.3, 0.6)]  # slope 2 < 10
    assert cross_layer_budgets([bumpy, steep], [1.0, 1.0], 0.15) == pytest.approx([0.3, 0.0])
    # the largest S of a curve is its layer's cap
    assert cross_layer_budgets([bumpy, steep], [1.0, 1.0], 0.3) == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="raise sparsity.layer_cap"):
        cross_layer_budgets([bumpy, steep], [1.0, 1.0], 0.31)


def test_trace_at_interpolates_between_greedy_steps() -> None:
    trace = [(0.25, 0.1, {"a": 0.5, "b": 0.0}), (0.5, 0.3, {"a": 0.5, "b": 0.5})]
    assert trace_at(trace, 0.25) == {"a": 0.5, "b": 0.0}
    assert trace_at(trace, 0.125) == pytest.approx({"a": 0.25, "b": 0.0})
    assert trace_at(trace, 0.375) == pytest.approx({"a": 0.5, "b": 0.25})
    with pytest.raises(ValueError, match="beyond the trace"):
        trace_at(trace, 0.6)


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return corpus_batches(build_tiny_tokenizer(), ["wiki_en", "kjv"], 512, seq_len=64)


def test_cross_layer_keeps_uniform_s_activated_parameters(batches) -> None:
    model = build_tiny_hf_model("llama")
    qsparse.sparsify(model, SparsityConfig(ratio=0.5))
    uniform = activated_parameters(model, measured=False)
    curves = layer_curves(model, batches, cap=0.7, step=0.25)
    assert all(sp.ratio == 0.5 for sp in sparsifiers(model).values())  # left as it was
    for curve, (_, _, weights, _) in zip(curves, layer_sites(model), strict=True):
        assert curve["weights"] == weights
        levels = [p[0] for p in curve["trace"]]
        assert levels == sorted(levels) and levels[-1] == pytest.approx(0.7)
        assert [p[1] for p in curve["trace"]][-1] > curve["trace"][0][1] > 0  # relative error
    table = cross_layer_table(curves, 0.5)
    assert set(table) == set(sparsifiers(model))
    # the layers' own sparsities differ and average to S by weight
    levels = []
    for _, sites, weights, _ in layer_sites(model):
        names = {k: n for n, sp in sparsifiers(model).items() for k, s in sites.items() if s is sp}
        levels.append(sum(table[names[k]] * w for k, w in weights.items()) / sum(weights.values()))
    assert sum(levels) / len(levels) == pytest.approx(0.5, abs=1e-5)
    assert abs(levels[0] - levels[1]) > 1e-3
    qsparse.sparsify(model, SparsityConfig(ratio=0.5, sites=table))
    allocated = activated_parameters(model, measured=False)
    # k = floor((1 - s) d) per site: at most one input column per site below the budget
    assert uniform - 8 * 128 <= allocated <= uniform


def test_greedy_trace_is_the_greedy_at_every_step() -> None:
    # the curve's points are greedy_allocation's results at their own S (the cut is the same)
    def error(s):
        return s["a"] + 4 * s["b"] ** 2

    trace: list = []
    greedy_allocation(error, {"a": 1.0, "b": 1.0}, 0.3, step=0.1, trace=trace)
    for s, e in trace:
        level = (s["a"] + s["b"]) / 2
        assert greedy_allocation(error, {"a": 1.0, "b": 1.0}, level, step=0.1)[0] == pytest.approx(
            s
        )
        assert e == pytest.approx(error(s))
