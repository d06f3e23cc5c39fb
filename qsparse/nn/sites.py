"""The sparsification sites of a model: find them, name them, change their ratio.

A site is an :class:`~qsparse.nn.linear.ActivationSparsifier` that ``qsparse.sparsify``
installed in front of one or more projections (docs/design.md §1 lists the four per decoder
layer). Sites are named as the metrics that report them: a shared input by its parent and
site (``layers.N.self_attn.qkv``, ``layers.N.mlp.gate_up``), any other by its linear
(``layers.N.self_attn.o_proj``, ``layers.N.mlp.down_proj``), with the ``model.`` prefix and
``torch.compile``/FSDP wrapper names dropped. Conversion lives in :mod:`qsparse.convert`,
measurement in :mod:`qsparse.stats`; both read sites through this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .linear import ActivationSparsifier

__all__ = [
    "ATTN_LINEARS",
    "MLP_LINEARS",
    "SETTINGS_ATTR",
    "decoder_layers",
    "dynamic_sparsity",
    "get_settings",
    "set_sparsity_ratio",
    "sparsifiers",
    "track_thresholds",
]

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
#: attribute where ``qsparse.sparsify`` records the settings it applied
SETTINGS_ATTR = "qsparse_settings"


def get_settings(model: nn.Module) -> dict[str, Any] | None:
    """The settings the last ``qsparse.sparsify`` applied to ``model`` (``None`` if never)."""
    return getattr(model, SETTINGS_ATTR, None)


def metric_name(module_name: str) -> str:
    """``model.layers.0.mlp.down_proj`` -> ``layers.0.mlp.down_proj``."""
    return module_name[len("model.") :] if module_name.startswith("model.") else module_name


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(prefix, self_attn, mlp) of every decoder layer with Llama projection names."""
    found = []
    for name, module in model.named_modules():
        attn = getattr(module, "self_attn", None)
        mlp = getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        if all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN_LINEARS) and all(
            isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_LINEARS
        ):
            found.append((name, attn, mlp))
    return found


def sparsifiers(model: nn.Module) -> dict[str, ActivationSparsifier]:
    """Metric name -> sparsifier of every site in ``model`` (see the module docstring)."""
    out: dict[str, ActivationSparsifier] = {}
    for name, module in model.named_modules():
        clean = name.replace("_orig_mod.", "").replace("_fsdp_wrapped_module.", "")
        if isinstance(module, ActivationSparsifier):
            parent, _, leaf = clean.rpartition(".")
            if leaf == "qsparse_input":
                site = "qkv" if parent.endswith("self_attn") else "gate_up"
                out[metric_name(f"{parent}.{site}")] = module
            else:  # <linear>.act
                out[metric_name(parent)] = module
    return out


def set_sparsity_ratio(
    model: nn.Module, ratio: float | None = None, *, fraction: float | None = None
) -> None:
    """Change the sparsity of every site at run time (no re-conversion).

    Give ``ratio`` to set every site to S = ``ratio``, or ``fraction`` in [0, 1] to set each
    site to ``fraction * target_ratio`` (its configured value): the form warm-up schedules use.
    """
    if (ratio is None) == (fraction is None):
        raise ValueError("set_sparsity_ratio needs exactly one of ratio= or fraction=")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio {ratio} is outside [0, 1)")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sparsity warm-up fraction {fraction} is outside [0, 1]")
    for sp in sparsifiers(model).values():
        sp.ratio = float(ratio) if ratio is not None else float(sp.target_ratio * fraction)
        sp.keep()  # validates k >= 1


def dynamic_sparsity() -> contextlib.AbstractContextManager:
    """Context to call a ``torch.compile``-d model in while its sparsity ratio changes.

    A site's ``forward`` reads k, an int attribute of the module. Dynamo treats int attributes
    of an ``nn.Module`` as constants, so every new k (a warm-up changes it every step) would
    compile a new graph; with ``allow_unspec_int_on_nn_module`` a changed k recompiles once
    and is symbolic after (``tests/test_sparsify.py::test_ratio_changes_do_not_recompile``).
    """
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


def track_thresholds(
    model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> int:
    """Apply every tracked threshold's pending training-batch quantile
    (:meth:`ActivationSparsifier.track_threshold`, ``sparsity.pattern=threshold``); call once
    per training batch. ``reduce`` maps the stacked quantiles [n] to the values every rank
    uses (e.g. their mean over data-parallel ranks), so the thresholds stay equal across ranks.
    Returns the number of thresholds moved."""
    tracked = [sp for sp in sparsifiers(model).values() if sp.pending_quantile is not None]
    if not tracked:
        return 0
    q = torch.stack([sp.pending_quantile.float() for sp in tracked])
    if reduce is not None:
        q = reduce(q)
    for sp, value in zip(tracked, q, strict=True):
        sp.track_threshold(value)
    return len(tracked)
