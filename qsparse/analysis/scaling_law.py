"""Q-Sparse's sparsity scaling law and its fit (paper §3, Eq. 14-16).

``L(N, S) = E + A(S) / N**alpha`` with ``A(S) = B + C * exp(beta / (1 - S))``, N the total
parameters and S the sparsity ratio. Fitted like the paper: L-BFGS on a Huber loss
(delta = 1e-3) of the residual in log loss, started from a grid of initial values; the best
fit is kept. With activated parameters ``Na = (1 - S) * N`` held fixed, the loss is minimal at
the sparsity :meth:`ScalingLaw.optimal_sparsity` returns.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qsparse.extras import require


@dataclass(frozen=True)
class ScalingLaw:
    """Constants of ``L(N, S) = E + (B + C exp(beta / (1 - S))) / N**alpha``."""

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def loss(self, n_params: np.ndarray | float, sparsity: np.ndarray | float) -> np.ndarray:
        """Predicted loss for N total parameters at sparsity S (broadcasting arrays)."""
        n = np.asarray(n_params, dtype=np.float64)
        s = np.asarray(sparsity, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # degenerate fits: inf, not noise
            return self.E + (self.B + self.C * np.exp(self.beta / (1.0 - s))) / n**self.alpha

    def loss_at_activated(self, activated: float, sparsity: float) -> float:
        """Loss with ``Na = (1 - S) N`` activated parameters held fixed."""
        return float(self.loss(activated / (1.0 - sparsity), sparsity))

    def optimal_sparsity(self) -> float:
        """S* minimising the loss at fixed activated parameters.

        At fixed Na, ``L - E = (B + C e^{beta/(1-S)}) (1-S)^alpha / Na^alpha``: S* does not depend
        on Na, so it is one bounded 1-D minimisation.
        """

        def g(s: float) -> float:
            return (self.B + self.C * np.exp(self.beta / (1.0 - s))) * (1.0 - s) ** self.alpha

        optimize = require("scipy.optimize", "report", "the scaling-law optimum S*")
        res = optimize.minimize_scalar(
            g, bounds=(0.0, 0.999), method="bounded", options={"xatol": 1e-9}
        )
        return float(res.x)


#: The paper's full-precision constants as printed (rounded to two decimals; the paper's
#: unrounded fit gives S* = 45.58%, these rounded ones about 50%).
PAPER_FULL_PRECISION = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)


@contextlib.contextmanager
def _single_blas_thread() -> Iterator[None]:
    """L-BFGS on 5 parameters makes thousands of tiny BLAS calls; a multi-threaded BLAS
    spends far longer synchronising its threads than computing (50x slower on a busy
    2-core machine), so the fit runs with one BLAS thread when ``threadpoolctl`` is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


#: Bounds of ``(log E, log B, log C, alpha, beta)``: loss falls with N (alpha >= 0) and A(S)
#: does not fall with S (beta >= 0); E, B, C are positive through their logs.
_BOUNDS = [(None, None)] * 3 + [(0.0, None), (0.0, None)]


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def fit_scaling_law(
    n_params: Sequence[float],
    sparsity: Sequence[float],
    loss: Sequence[float],
    delta: float = 1e-3,
    grid: dict[str, Sequence[float]] | None = None,
    polish: int = 4,
) -> ScalingLaw:
    """Fit :class:`ScalingLaw` to measured (N, S, L) points.

    Parameters are optimised as ``(log E, log B, log C, alpha, beta)`` so E, B, C stay
    positive; the objective is ``sum Huber_delta(log L_pred - log L)`` with its analytic
    gradient. ``grid`` maps each of ``E, B, C, alpha, beta`` to initial values (defaults span
    the paper's magnitudes); every start runs 40 L-BFGS iterations and the ``polish`` best
    continue to convergence; ``alpha`` and ``beta`` are bounded below by 0 (a law where
    loss grows with N or falls with S is not this law).
    Raises ``ValueError`` on mismatched lengths, fewer than 5 points, or S outside [0, 1).
    """
    n = np.asarray(n_params, dtype=np.float64)
    s = np.asarray(sparsity, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    if not (n.shape == s.shape == y.shape) or n.ndim != 1:
        raise ValueError("n_params, sparsity and loss must be 1-D sequences of equal length")
    if n.size < 5:
        raise ValueError(f"fitting 5 constants needs at least 5 points, got {n.size}")
    if np.any((s < 0) | (s >= 1)):
        raise ValueError("sparsity values must lie in [0, 1)")
    if np.any(n <= 0) or np.any(y <= 0):
        raise ValueError("n_params and loss must be positive")
    grid = grid or {
        "E": (1.0, 2.0),
        "B": (0.01, 1.0),
        "C": (0.5, 5.0),
        "alpha": (0.05, 0.2, 0.4),
        "beta": (0.01, 0.1, 0.5),
    }
    log_y = np.log(y)
    log_n = np.log(n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # theta = (log E, log B, log C, alpha, beta); value and analytic gradient of
        # sum Huber(r) / delta^2, r = log L_pred - log L (the 1/delta^2 scale keeps L-BFGS's
        # relative stopping tests meaningful for residuals ~1e-3; the minimiser is unchanged)
        alpha, beta = theta[3], theta[4]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            e, b, c = np.exp(theta[:3])
            x = np.exp(beta / (1.0 - s))
            inv = np.exp(-alpha * log_n)
            a = b + c * x
            pred = e + a * inv
            r = np.log(pred) - log_y
            val = float(np.sum(_huber(r, delta))) / delta**2
            dr = np.clip(r, -delta, delta) / delta**2 / pred  # dHuber/dr * dr/dpred
            grad = np.array(
                [
                    np.sum(dr * e),
                    np.sum(dr * b * inv),
                    np.sum(dr * c * x * inv),
                    np.sum(dr * -a * log_n * inv),
                    np.sum(dr * c * x / (1.0 - s) * inv),
                ]
            )
        if not (np.isfinite(val) and np.all(np.isfinite(grad))):
            return 1e30, np.zeros(5)
        return val, grad

    minimize = require("scipy.optimize", "report", "the scaling-law fit").minimize
    # every start gets a short L-BFGS run; the most promising few are run to convergence
    # (same minimum as running every start to the end, at a fraction of the evaluations)
    screened = []
    best = None
    with _single_blas_thread():
        for init in itertools.product(*(grid[k] for k in ("E", "B", "C", "alpha", "beta"))):
            x0 = np.array([np.log(init[0]), np.log(init[1]), np.log(init[2]), init[3], init[4]])
            res = minimize(
                objective, x0, jac=True, method="L-BFGS-B", bounds=_BOUNDS, options={"maxiter": 40}
            )
            screened.append(res)
        screened.sort(key=lambda r: r.fun)
        for candidate in screened[:polish]:
            res = minimize(objective, candidate.x, jac=True, method="L-BFGS-B", bounds=_BOUNDS)
            if best is None or res.fun < best.fun:
                best = res
    e, b, c = np.exp(best.x[:3])
    return ScalingLaw(
        E=float(e), B=float(b), C=float(c), alpha=float(best.x[3]), beta=float(best.x[4])
    )


#: Names of the bootstrapped quantities: the five constants, then S*.
BOOTSTRAP_NAMES = ("E", "B", "C", "alpha", "beta", "S*")


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile bootstrap intervals of the constants and of S*.

    ``samples[i]`` holds ``(E, B, C, alpha, beta, S*)`` of the fit to the i-th resample;
    ``lower``/``upper`` are its ``(1 - level)/2`` and ``(1 + level)/2`` percentiles by name.
    """

    level: float
    samples: np.ndarray
    lower: dict[str, float]
    upper: dict[str, float]

    def interval(self, name: str) -> tuple[float, float]:
        """``(lower, upper)`` of one of :data:`BOOTSTRAP_NAMES`."""
        return self.lower[name], self.upper[name]


def bootstrap_scaling_law(
    n_params: Sequence[float],
    sparsity: Sequence[float],
    loss: Sequence[float],
    fit: ScalingLaw | None = None,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    delta: float = 1e-3,
) -> BootstrapIntervals:
    """Nonparametric bootstrap of :func:`fit_scaling_law`.

    Each of ``n_boot`` resamples draws the points with replacement and refits, starting from
    ``fit`` (the full-data fit, computed when ``None``) instead of the whole grid of initial
    values, which keeps a resample to one L-BFGS run. Intervals are percentile intervals at
    ``level`` (0.9: the 5th and 95th percentiles) of ``E, B, C, alpha, beta`` and of
    ``S* = argmin_S (B + C e^{beta/(1-S)}) (1-S)^alpha``.
    """
    n = np.asarray(n_params, dtype=np.float64)
    s = np.asarray(sparsity, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    if fit is None:
        fit = fit_scaling_law(n, s, y, delta=delta)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie in (0, 1)")
    start = {k: (getattr(fit, k),) for k in ("E", "B", "C", "alpha", "beta")}
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, n.size, n.size)
        law = fit_scaling_law(n[idx], s[idx], y[idx], delta=delta, grid=start)
        rows.append([law.E, law.B, law.C, law.alpha, law.beta, law.optimal_sparsity()])
    samples = np.asarray(rows, dtype=np.float64).reshape(-1, len(BOOTSTRAP_NAMES))
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    lo, hi = np.percentile(samples, q, axis=0) if n_boot else (np.full(6, np.nan),) * 2
    return BootstrapIntervals(
        level=level,
        samples=samples,
        lower=dict(zip(BOOTSTRAP_NAMES, map(float, lo), strict=True)),
        upper=dict(zip(BOOTSTRAP_NAMES, map(float, hi), strict=True)),
    )
