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

:func:`sparsity_report` is the one measurement (training callbacks, evaluation and
:func:`measure` all count through it or the counters above); a dense model (no sites)
reports overall 0 and activated = total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .nn.linear import ActivationSparsifier, QSparseLinear
from .nn.sites import get_settings, sparsifiers


def track_sparsity(model: nn.Module, enabled: bool = True, reset: bool = True) -> None:
    """Start (or stop) counting zeros at every site of ``model``."""
    for sp in sparsifiers(model).values():
        sp.track_stats = enabled
        if reset:
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

    def density(linear: nn.Module, sp: nn.Module) -> float:
        d = _site_density(sp, measured)
        gate = getattr(linear, "row_gate", None)
        if gate is not None:  # rows skipped where the gate is zero, inputs as before
            d *= _site_density(gate, measured)
        return d

    return int(round(total_parameters(model) - skipped_parameters(model, density)))


def skipped_parameters(model: nn.Module, density: Callable[[nn.Module, nn.Module], float]) -> float:
    """Weights a token does not touch: ``sum (1 - density(linear, site)) * numel(W)`` over
    every linear with an input site (a weight shared by several linears counted once);
    ``density`` is the fraction of the linear's input (or rows) kept, in [0, 1]."""
    saved = 0.0
    seen: set[int] = set()
    for linear, sp in _linear_inputs(model):
        if sp is None or id(linear.weight) in seen:
            continue
        seen.add(id(linear.weight))
        saved += (1.0 - density(linear, sp)) * linear.weight.numel()
    return saved


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


@dataclass
class SparsityReport:
    """``sites``: site metric name -> measured fraction of zeros; ``overall``: 1 - activated
    / total; ``activated_parameters``/``total_parameters``: counts (tied weights once);
    ``configured_ratio``: the settings' target ratio (None for a model never sparsified);
    ``tokens``: tokens run through the model."""

    overall: float
    activated_parameters: int
    total_parameters: int
    sites: dict[str, float] = field(default_factory=dict)
    configured_ratio: float | None = None
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mean_site_sparsity(self) -> float:
        return sum(self.sites.values()) / len(self.sites) if self.sites else 0.0


@torch.no_grad()
def sparsity_report(model: nn.Module, batches: Iterable[torch.Tensor]) -> SparsityReport:
    """Measure sparsity on ``batches`` (LongTensor [B, T] or [T] each, moved to the model's
    device) in eval mode; tracking is switched off and the train/eval mode restored after."""
    settings = get_settings(model)
    ratio = None
    if settings is not None:
        ratio = float(settings.get("sparsity", {}).get("ratio", 0.0))
    total = total_parameters(model)
    if not sparsifiers(model):
        return SparsityReport(0.0, total, total, {}, ratio, 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = 0
    track_sparsity(model, True, reset=True)
    try:
        for ids in batches:
            ids = ids.to(device)
            if ids.dim() == 1:
                ids = ids[None]
            model(input_ids=ids)
            tokens += ids.numel()
        sites = measured_sparsity(model)
        activated = activated_parameters(model, measured=True)
    finally:
        track_sparsity(model, False, reset=False)
        model.train(was_training)
    overall = sites.pop("overall")
    return SparsityReport(overall, activated, total, sites, ratio, tokens)


def measure(model: nn.Module, *batches: torch.Tensor) -> dict[str, float]:
    """:func:`sparsity_report` on token batches as ``{site: sparsity, ..., "overall": S}``."""
    report = sparsity_report(model, batches)
    return {**report.sites, "overall": report.overall}
