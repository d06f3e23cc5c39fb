"""Activation-sparsity methods beside Q-Sparse, each on :func:`qsparse.sparsify`'s sites.

=========  ===========================================  =================  =================
name       what is sparse                               how it is chosen   cost
=========  ===========================================  =================  =================
qsparse    every projection input, k per token          top-k of |x|       none (or train)
teal       every projection input                       calibrated |x| > t calibration
cats       the MLP's SiLU(gate), so up rows / down cols calibrated |a| > t calibration
=========  ===========================================  =================  =================

Each is a :class:`SparsityMethod` (``method.apply(model, tokenizer)``) with its Hydra config in
``qsparse/conf/method/<name>.yaml``; ``qsparse-compare`` runs them side by side. ``docs/methods.md``
has the formulas, the decisions and the measurements.
"""

from .base import METHODS, MethodResult, SparsityMethod, register, restore_method
from .calibration import MagnitudeHistogram, calibration_batches, collect_histograms
from .cats import CATS, GateThreshold
from .qsparse import QSparse
from .teal import TEAL, greedy_allocation

__all__ = [
    "CATS",
    "METHODS",
    "TEAL",
    "GateThreshold",
    "MagnitudeHistogram",
    "MethodResult",
    "QSparse",
    "SparsityMethod",
    "calibration_batches",
    "collect_histograms",
    "greedy_allocation",
    "register",
    "restore_method",
]
