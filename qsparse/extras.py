"""Optional dependencies: what each extra of ``pip install 'qsparse[...]'`` brings, and the
one-line error a feature raises when its extra is missing.

==========  ==========================  ================================================
extra       packages                    needed by
==========  ==========================  ================================================
kernels     triton                      the GPU kernels (``qsparse.kernels``; CUDA)
adamw8bit   bitsandbytes                ``optim=adamw8bit`` (8-bit AdamW, CUDA)
plots       matplotlib                  ``loss_curve.png`` of a run, ``qsparse-compare --plot``
report      scipy, matplotlib           ``qsparse-report``: the scaling-law fit and its plots
eval        lm-eval                     ``qsparse-eval --tasks`` (lm-evaluation-harness)
gguf        gguf, accelerate            ``model=hf_smollm2`` (SmolLM2 from its GGUF file)
dev         pytest, ruff                the tests and the linter
all         every extra above but dev
==========  ==========================  ================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .errors import UserError


class MissingExtraError(UserError):
    """A feature's optional dependency is not installed; the message names the extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying that ``feature`` needs it
    and ``pip install 'qsparse[<extra>]'`` brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{feature} needs {package}, which is not installed: pip install 'qsparse[{extra}]'"
        ) from err


def pyplot(extra: str = "plots", feature: str = "plotting") -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    matplotlib = require("matplotlib", extra, feature)
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
