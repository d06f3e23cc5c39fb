"""Measured activation sparsity and activated parameters (Q-Sparse's way of counting).

- Site sparsity: the fraction of exact zeros in a projection input, counted while
  tracking is on (``track_sparsity(model)``), top-k zeros and natural ones (ReLU²) alike.
- Activated parameters per token: every weight of a projection whose input entry is zero
  does no work for that token, so a linear contributes ``(1 - s_in) * |W|``; all other
  parameters (embeddings, norms, biases, unconverted linears such as the lm head) count in
  full. Overall sparsity = ``1 - activated / total`` (paper: 7.0B x (1 - 0.582) = 2.9B).
- Skipped output rows: a linear with a ``row_gate`` sparsifier (CATS: ``up_proj``, whose
  rows are not computed for the neurons the gate threshold zeroed) also saves
  ``s(row_gate) * |W|``.
"""

from __future__ import annotations

import torch
from torch import nn

from .convert import sparsifiers
from .nn import ActivationSparsifier, QSparseLinear


def track_sparsity(model: nn.Module, enabled: bool = True, reset: bool = True) -> None:
    """Start (or stop) counting zeros at every site of ``model``."""
    for sp in sparsifiers(model).values():
        sp.track_stats = enabled
        if reset:
            sp.reset_stats()


def reset_sparsity_stats(model: nn.Module) -> None:
    for sp in sparsifiers(model).values():
        sp.reset_stats()


def _site_density(sp: ActivationSparsifier, measured: bool) -> float:
    if measured and float(sp.values_seen) > 0:
        return 1.0 - float(sp.zeros_seen) / float(sp.values_seen)
    if sp.pattern == "threshold":  # configured: the calibration target
        return 1.0 - sp.ratio
    k = sp.keep()
    if k is None:
        return 1.0
    width = sp.block_size if sp.pattern == "block_topk" else sp.dim
    return k / width


def _linear_inputs(model: nn.Module) -> list[tuple[QSparseLinear, ActivationSparsifier | None]]:
    """Every QSparseLinear with the sparsifier that feeds it (own ``act`` or the shared
    ``qsparse_input`` of its parent)."""
    pairs = []
    for module in model.modules():
        shared = getattr(module, "qsparse_input", None)
        for child in module.children():
            if isinstance(child, QSparseLinear):
                pairs.append((child, child.act if child.act is not None else shared))
    return pairs


def total_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def activated_parameters(model: nn.Module, measured: bool = True) -> int:
    """Parameters that do work per token (see module docstring).

    ``measured=True`` uses the zero counts tracked since the last reset where there are
    any, else the configured k/d of each site.
    """
    total = total_parameters(model)
    saved = 0.0
    seen: set[int] = set()
    for linear, sp in _linear_inputs(model):
        if sp is None or id(linear.weight) in seen:
            continue
        seen.add(id(linear.weight))
        density = _site_density(sp, measured)
        gate = getattr(linear, "row_gate", None)
        if gate is not None:  # rows skipped where the gate is zero, inputs as before
            density *= _site_density(gate, measured)
        saved += (1.0 - density) * linear.weight.numel()
    return int(round(total - saved))


def measured_sparsity(model: nn.Module) -> dict[str, float]:
    """Site metric name -> measured sparsity (fraction of zeros), plus ``"overall"``:
    ``1 - activated / total`` parameters. Sites with no data yet are left out."""
    out: dict[str, float] = {}
    for name, sp in sparsifiers(model).items():
        if float(sp.values_seen) > 0:
            out[name] = float(sp.zeros_seen) / float(sp.values_seen)
    total = total_parameters(model)
    out["overall"] = 1.0 - activated_parameters(model, measured=True) / max(total, 1)
    return out


@torch.no_grad()
def measure(model: nn.Module, *batches: torch.Tensor) -> dict[str, float]:
    """Run ``model`` on token batches with tracking on and return :func:`measured_sparsity`."""
    was_training = model.training
    model.eval()
    track_sparsity(model, True, reset=True)
    try:
        for ids in batches:
            model(ids)
        return measured_sparsity(model)
    finally:
        track_sparsity(model, False, reset=False)
        model.train(was_training)
