"""Inference cost of an MoE-converted model per token, routers included.

Expert-granular counting (what an expert-block kernel reads): a token that runs a fraction
``f_l`` of layer ``l``'s experts reads ``f_l · 3·d·F`` of its FFN weights; everything else
(attention, norms, embeddings, the lm head, the routers) counts in full::

    activated = total - Σ_l (1 - f_l) · (|W_gate,l| + |W_up,l| + |W_down,l|)
    FLOPs     = 2 · (matmul weights - Σ_l (1 - f_l) · FFN weights_l)   per token, forward

``matmul weights`` = every ``nn.Linear`` weight (lm head and routers included, embeddings are
lookups); the attention score/value products are left out (they do not change with τ). ``f_l``
is measured on tokens (the ``routing`` site of :class:`~qsparse.moe.layer.MoEFeedForward`).
:func:`qsparse.stats.activated_parameters` (the ``qsparse-compare`` column) additionally counts
the zeros of the down-projection input inside executed experts, as it does for every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..stats import total_parameters, track_sparsity
from .convert import moe_layers


@dataclass
class MoECost:
    """Per-token cost: ``expert_fraction`` per MoE layer (executed experts / E), activated
    parameters and forward FLOPs (module docstring), and the dense model's for reference."""

    expert_fraction: dict[str, float] = field(default_factory=dict)
    activated_parameters: int = 0
    total_parameters: int = 0
    router_parameters: int = 0
    flops_per_token: float = 0.0
    dense_flops_per_token: float = 0.0
    tokens: int = 0

    @property
    def mean_expert_fraction(self) -> float:
        f = self.expert_fraction
        return sum(f.values()) / len(f) if f else 1.0

    @property
    def flops_fraction(self) -> float:
        return self.flops_per_token / max(self.dense_flops_per_token, 1.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_expert_fraction"] = self.mean_expert_fraction
        out["flops_fraction"] = self.flops_fraction
        return out


def matmul_weights(model: nn.Module) -> int:
    """Weights of every ``nn.Linear`` (tied ones once)."""
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def cost_from_fractions(model: nn.Module, fractions: dict[str, float]) -> MoECost:
    """:class:`MoECost` for given executed-expert fractions per MoE layer name (1.0 where a
    layer is missing from ``fractions``)."""
    layers = moe_layers(model)
    total = total_parameters(model)
    mm = matmul_weights(model)
    router = sum(
        p.numel() for m in layers.values() if m.router is not None for p in m.router.parameters()
    )
    saved = 0.0
    for name, m in layers.items():
        ffn = sum(lin.weight.numel() for lin in (m.gate_proj, m.up_proj, m.down_proj))
        saved += (1.0 - fractions.get(name, 1.0)) * ffn
    router_mm = sum(
        lin.weight.numel()
        for m in layers.values()
        if m.router is not None
        for lin in m.router.modules()
        if isinstance(lin, nn.Linear)
    )
    dense_mm = mm - router_mm
    return MoECost(
        expert_fraction={n: fractions.get(n, 1.0) for n in layers},
        activated_parameters=int(round(total - saved)),
        total_parameters=total,
        router_parameters=router,
        flops_per_token=2.0 * (mm - saved),
        dense_flops_per_token=2.0 * dense_mm,
    )


@torch.no_grad()
def measure_cost(model: nn.Module, batches: Iterable[torch.Tensor]) -> MoECost:
    """Run ``batches`` (LongTensor[B, T]) with the routing sites tracking and return the
    :class:`MoECost` of the measured expert fractions."""
    from ..methods.calibration import model_forward

    layers = moe_layers(model)
    was_training = model.training
    model.eval()
    track_sparsity(model, True, reset=True)
    device = next(model.parameters()).device
    tokens = 0
    try:
        for ids in batches:
            model_forward(model, ids.to(device))
            tokens += ids.numel()
        fractions = {}
        for name, m in layers.items():
            seen = float(m.routing.values_seen)
            if seen > 0:
                fractions[name] = 1.0 - float(m.routing.zeros_seen) / seen
    finally:
        track_sparsity(model, False, reset=False)
        model.train(was_training)
    cost = cost_from_fractions(model, fractions)
    cost.tokens = tokens
    return cost


def set_rule(model: nn.Module, mode: str, k: int | None = None, tau: float | None = None) -> None:
    """Set every MoE layer to ``mode`` (``all`` / ``topk`` with ``k`` / ``dynk`` with ``tau``)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers (run qsparse.moe.moefy first)")
    for m in layers.values():
        m.set_mode(mode, k=k, tau=tau)
