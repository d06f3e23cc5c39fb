"""Activation-sparsity methods beside Q-Sparse, each on :func:`qsparse.sparsify`'s sites.

=========  ===========================================  =================  =================
name       what is sparse                               how it is chosen   cost
=========  ===========================================  =================  =================
qsparse    every projection input, k per token          top-k of |x|       none (or train)
teal       every projection input                       calibrated |x| > t calibration
cats       the MLP's SiLU(gate), so up rows / down cols calibrated |a| > t calibration
prosparse  the MLP's ReLU(gate) (trained with L1)         ReLU / FATReLU     training
=========  ===========================================  =================  =================

``attribution`` (:class:`AttributionSelection`, Song et al. 2406.06562) selects MLP neurons and
attention heads per token by the corrected gradient × output (``attribution_magnitude``: by
magnitude): an oracle for analysis, each forward runs a dense pass and a backward first.

Each is a :class:`SparsityMethod` (``method.apply(model, tokenizer)``) with its Hydra config in
``qsparse/conf/method/<name>.yaml``; ``qsparse-compare`` runs them side by side. ``docs/methods.md``
has the formulas, the decisions and the measurements.
"""

from .allocation import greedy_allocation, topk_site_ratios
from .attribution import (
    AttributionSelection,
    attribution_mask,
    corrected_attribution,
    head_attribution,
    magnitude_mask,
)
from .base import (
    MethodConfigError,
    MethodResult,
    SparsityMethod,
    method_from_spec,
    register,
)
from .calibration import MagnitudeHistogram, calibration_batches, collect_histograms
from .cats import CATS, GateThreshold
from .layer_allocation import cross_layer_budgets, cross_layer_table, layer_curves
from .prosparse import FATReLU, ProSparse, sine_schedule
from .qsparse import QSparse
from .restore import registry, restore_method
from .teal import TEAL

__all__ = [
    "AttributionSelection",
    "CATS",
    "METHODS",
    "TEAL",
    "FATReLU",
    "GateThreshold",
    "MagnitudeHistogram",
    "MethodConfigError",
    "MethodResult",
    "ProSparse",
    "QSparse",
    "SparsityMethod",
    "attribution_mask",
    "calibration_batches",
    "collect_histograms",
    "corrected_attribution",
    "cross_layer_budgets",
    "cross_layer_table",
    "greedy_allocation",
    "head_attribution",
    "layer_curves",
    "magnitude_mask",
    "method_from_spec",
    "register",
    "registry",
    "restore_method",
    "sine_schedule",
    "topk_site_ratios",
]


def __getattr__(name: str):
    """``METHODS``: every registered method by name, qsparse.moe's D2DMoE and SSD included
    (:func:`registry` imports the modules that register them on first use)."""
    if name == "METHODS":
        return registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
