"""Scaling-law fit recovers known constants; optimal sparsity is the fixed-Na minimum."""

import numpy as np
import pytest

from qsparse.analysis import PAPER_FULL_PRECISION, ScalingLaw, fit_scaling_law


def test_fit_recovers_constants_from_noiseless_points():
    true = ScalingLaw(E=1.9, B=0.3, C=2.5, alpha=0.25, beta=0.2)
    n = np.repeat([3e8, 7e8, 1.3e9, 7e9], 4)
    s = np.tile([0.0, 0.4, 0.6, 0.8], 4)
    fit = fit_scaling_law(n, s, true.loss(n, s))
    assert np.allclose(fit.loss(n, s), true.loss(n, s), rtol=1e-4)
    assert fit.optimal_sparsity() == pytest.approx(true.optimal_sparsity(), abs=0.02)


def test_optimal_sparsity_is_grid_minimum_at_fixed_activated_params():
    law = PAPER_FULL_PRECISION
    s_star = law.optimal_sparsity()
    grid = np.linspace(0.0, 0.95, 9501)
    losses = [law.loss_at_activated(1e9, s) for s in grid]
    assert s_star == pytest.approx(grid[int(np.argmin(losses))], abs=2e-4)
    # independent of the activated size
    other = [law.loss_at_activated(5e10, s) for s in grid]
    assert grid[int(np.argmin(other))] == pytest.approx(s_star, abs=2e-4)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        fit_scaling_law([1e8], [0.5], [3.0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fit_scaling_law([1e8] * 5, [1.0] * 5, [3.0] * 5)
