"""Measured activation sparsity and activated parameters of a (sparsified) model.

Runs token windows through the model with :func:`qsparse.stats.track_sparsity` on and
reports, per site, the fraction of exact zeros in the projection input, plus Q-Sparse's
way of counting (DESIGN.md §1)::

    activated = total - sum_linear s_in(linear) * |W_linear|
    overall   = 1 - activated / total

A dense model (no sites) reports overall 0 and activated = total.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..convert import get_settings, sparsifiers
from ..stats import activated_parameters, measured_sparsity, total_parameters, track_sparsity


@dataclass
class SparsityReport:
    """``sites``: site metric name -> measured fraction of zeros; ``overall``: 1 - activated
    / total; ``activated_parameters``/``total_parameters``: counts (tied weights once);
    ``configured_ratio``: the settings' target ratio (None for a model never sparsified)."""

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
    """Measure sparsity on ``batches`` (LongTensor[B, T] each, moved to the model's device).

    Tracking is switched off and the train/eval mode restored afterwards.
    """
    settings = get_settings(model)
    ratio = None
    if settings is not None:
        ratio = float(settings.get("sparsity", {}).get("ratio", 0.0))
    total = total_parameters(model)
    if not sparsifiers(model):
        return SparsityReport(0.0, total, total, {}, ratio, 0)
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    tokens = 0
    track_sparsity(model, True, reset=True)
    try:
        for ids in batches:
            ids = ids.to(p.device)
            if ids.dim() == 1:
                ids = ids[None]
            model(input_ids=ids)
            tokens += ids.numel()
        measured = measured_sparsity(model)
        activated = activated_parameters(model, measured=True)
    finally:
        track_sparsity(model, False, reset=False)
        model.train(was_training)
    overall = measured.pop("overall")
    return SparsityReport(overall, activated, total, measured, ratio, tokens)
