"""Analysis: the sparsity scaling law and its fit."""

from .scaling_law import PAPER_FULL_PRECISION, ScalingLaw, fit_scaling_law

__all__ = ["PAPER_FULL_PRECISION", "ScalingLaw", "fit_scaling_law"]
