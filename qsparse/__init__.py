"""qsparse: fully sparsely-activated and quantized LLM training (Q-Sparse, BitNet b1.58).

Quick start::

    import qsparse
    report = qsparse.sparsify(hf_model, sparsity=0.6, quant=qsparse.QuantConfig(weights="ternary",
                              act_bits=8, subln=True), activation="relu2")
    print(report)
"""

from .convert import SparsifyReport, sparsify
from .nn import (
    ActivationSparsifier,
    GLUFeedForward,
    QSparseLinear,
    QuantConfig,
    ReLUSquared,
    SparsityConfig,
)
from .nn.sites import get_settings, set_sparsity_ratio, sparsifiers, track_thresholds
from .stats import (
    SparsityReport,
    activated_parameters,
    measure,
    measured_sparsity,
    sparsity_report,
    track_sparsity,
)
from .version import __version__


def __getattr__(name: str):
    # lazy: models pull in transformers, which is slow to import
    if name in ("load", "export"):
        from . import models

        return getattr(models, name)
    if name in ("LlamaConfig", "LlamaForCausalLM"):
        from . import models

        return getattr(models, name)
    if name in ("MoEConfig", "moefy", "demoefy", "D2DMoE", "SSDMoE"):
        from . import moe  # MoE-based sparsity (docs/moe.md)

        return getattr(moe, name)
    raise AttributeError(f"module 'qsparse' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ActivationSparsifier",
    "D2DMoE",
    "GLUFeedForward",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MoEConfig",
    "QSparseLinear",
    "QuantConfig",
    "ReLUSquared",
    "SSDMoE",
    "SparsifyReport",
    "SparsityConfig",
    "SparsityReport",
    "activated_parameters",
    "demoefy",
    "export",
    "get_settings",
    "load",
    "measure",
    "measured_sparsity",
    "moefy",
    "set_sparsity_ratio",
    "sparsifiers",
    "sparsify",
    "sparsity_report",
    "track_sparsity",
    "track_thresholds",
]
