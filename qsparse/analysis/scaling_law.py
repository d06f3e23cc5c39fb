"""Q-Sparse's sparsity scaling law and its fit (paper §3, Eq. 14-16).

``L(N, S) = E + A(S) / N**alpha`` with ``A(S) = B + C * exp(beta / (1 - S))``, N the total
parameters and S the sparsity ratio. Fitted like the paper: L-BFGS on a Huber loss
(delta = 1e-3) of the residual in log loss, started from a grid of initial values; the best
fit is kept. With activated parameters ``Na = (1 - S) * N`` held fixed, the loss is minimal at
the sparsity :meth:`ScalingLaw.optimal_sparsity` returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar


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

        res = minimize_scalar(g, bounds=(0.0, 0.999), method="bounded", options={"xatol": 1e-9})
        return float(res.x)


#: The paper's full-precision constants as printed (rounded to two decimals; the paper's
#: unrounded fit gives S* = 45.58%, these rounded ones about 50%).
PAPER_FULL_PRECISION = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def fit_scaling_law(
    n_params: Sequence[float],
    sparsity: Sequence[float],
    loss: Sequence[float],
    delta: float = 1e-3,
    grid: dict[str, Sequence[float]] | None = None,
) -> ScalingLaw:
    """Fit :class:`ScalingLaw` to measured (N, S, L) points.

    Parameters are optimised as ``(log E, log B, log C, alpha, beta)`` so E, B, C stay
    positive; the objective is ``sum Huber_delta(log L_pred - log L)``. ``grid`` maps each of
    ``E, B, C, alpha, beta`` to initial values (defaults span the paper's magnitudes).
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

    def objective(theta: np.ndarray) -> float:
        e, b, c = np.exp(theta[:3])
        alpha, beta = theta[3], theta[4]
        with np.errstate(over="ignore", invalid="ignore"):
            pred = e + (b + c * np.exp(beta / (1 - s))) / n**alpha
            r = np.log(pred) - log_y
        val = float(np.sum(_huber(r, delta)))
        return val if np.isfinite(val) else 1e30

    best = None
    for init in itertools.product(*(grid[k] for k in ("E", "B", "C", "alpha", "beta"))):
        x0 = np.array([np.log(init[0]), np.log(init[1]), np.log(init[2]), init[3], init[4]])
        res = minimize(objective, x0, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    e, b, c = np.exp(best.x[:3])
    return ScalingLaw(
        E=float(e), B=float(b), C=float(c), alpha=float(best.x[3]), beta=float(best.x[4])
    )
