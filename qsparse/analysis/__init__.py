"""Analysis: the sparsity scaling law, its fit and bootstrap, and sweep reports."""

from .scaling_law import (
    PAPER_FULL_PRECISION,
    BootstrapIntervals,
    ScalingLaw,
    bootstrap_scaling_law,
    fit_scaling_law,
)

__all__ = [
    "PAPER_FULL_PRECISION",
    "BootstrapIntervals",
    "ScalingLaw",
    "bootstrap_scaling_law",
    "fit_scaling_law",
]
