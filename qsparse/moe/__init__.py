"""Activation sparsity through experts: MoEfication, D2DMoE and SSD.

===============  ========================================================================
module           job
===============  ========================================================================
``kmeans``       balanced k-means (equal clusters), warm-startable
``layer``        :class:`MoEFeedForward` (a GLU MLP run as experts), routers, selection rules
``convert``      :func:`moefy` / :func:`demoefy`: every decoder MLP to an MoE and back
``routers``      D2DMoE's router training (regression on each expert's output norm)
``hoyer``        D2DMoE's sparsity-raising phase (ReLU + Hoyer penalty) and its callback
``cost``         activated parameters and FLOPs per token, routers included
``d2dmoe``       :class:`D2DMoE`, a :class:`~qsparse.methods.SparsityMethod` (dynamic-k)
``ssd``          :class:`SwitchableSparseDense`, SSD's phase-switching training callback
``ssd_moe``      :class:`SSDMoE`, SSD's centroid-routed top-k MoE as a method
``sweep``        ``python -m qsparse.moe.sweep``: cost vs perplexity over τ (or k)
``report``       ``python -m qsparse.moe.report``: an SSD run beside its dense control
``expert_gemv``  the expert-block decode GEMV (Triton) and its torch reference
===============  ========================================================================

Formulas, decisions and measurements: ``docs/moe.md``.
"""

from .convert import MoEConfig, demoefy, ffn_layers, moe_layers, moefy
from .cost import MoECost, cost_from_fractions, measure_cost, set_rule
from .d2dmoe import D2DMoE
from .hoyer import HoyerReLU, HoyerSchedule, hoyer_gradient, hoyer_square
from .kmeans import KMeansResult, balanced_kmeans
from .layer import (
    CentroidRouter,
    MoEFeedForward,
    RegressionRouter,
    dynamic_k_mask,
    topk_expert_mask,
)
from .routers import router_targets, train_routers
from .ssd import SwitchableSparseDense, activation_patterns, pattern_stability
from .ssd_moe import SSDMoE

__all__ = [
    "D2DMoE",
    "CentroidRouter",
    "HoyerReLU",
    "HoyerSchedule",
    "KMeansResult",
    "MoECost",
    "MoEConfig",
    "MoEFeedForward",
    "RegressionRouter",
    "SSDMoE",
    "SwitchableSparseDense",
    "activation_patterns",
    "balanced_kmeans",
    "cost_from_fractions",
    "demoefy",
    "dynamic_k_mask",
    "ffn_layers",
    "hoyer_gradient",
    "hoyer_square",
    "measure_cost",
    "moe_layers",
    "moefy",
    "pattern_stability",
    "router_targets",
    "set_rule",
    "topk_expert_mask",
    "train_routers",
]
