"""D2DMoE: dense to dynamic-k mixture of experts (Wójcik et al., 2310.04361).

1. Raise activation sparsity (continued training with ReLU + Hoyer penalty:
   :mod:`qsparse.moe.hoyer`, ``recipe=moe/d2dmoe_tiny``).
2. Split every FFN into experts by balanced k-means on its normalised gate rows
   (:func:`qsparse.moe.moefy`; small experts, ``expert_size`` 32 by default).
3. Train a router per layer (d -> ``router_width`` -> E, ReLU, |·|) to regress each expert's
   output L2 norm (:func:`qsparse.moe.routers.train_routers`; ``router_steps`` Adam steps at
   ``router_lr`` on the calibration text).
4. Execute expert ``e`` for a token iff ``r̂_e >= (1 - τ) max_j r̂_j``
   (:func:`qsparse.moe.layer.dynamic_k_mask`).

As a :class:`~qsparse.methods.SparsityMethod` (``qsparse-compare --methods d2dmoe``), ``tau``
fixes τ; ``tau: null`` (default) picks τ so the model's activated parameters, counted as for
every row (:func:`qsparse.stats.activated_parameters`, routers included), match those of
Q-Sparse top-k at ``sparsity`` on the same model: the largest τ found by bisection on
[0, 1] (``match_steps`` halvings) whose count on ``match_tokens`` calibration tokens does not exceed
Q-Sparse's configured count. Where even τ = 0 (one expert per token, plus ties) costs more, τ
is 0 and the row says what it reached. Attention projections stay dense (the paper's optional
MLP-distilled attention is not implemented).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..convert import sparsify
from ..methods.base import MethodResult, SparsityMethod, register
from ..methods.calibration import calibration_batches, take_tokens
from ..nn import SparsityConfig, keep_count
from ..nn.sites import sparsifiers
from ..stats import total_parameters
from .convert import MoEConfig, moe_layers, moefy
from .layer import RegressionRouter
from .routers import train_routers


def router_parameters(model: nn.Module) -> int:
    """Parameters of every MoE layer's router."""
    return sum(
        p.numel() for m in moe_layers(model).values() if m.router for p in m.router.parameters()
    )


def qsparse_activated(model: nn.Module, sparsity: float) -> int:
    """Activated parameters of Q-Sparse top-k at ``sparsity`` on ``model``'s projections
    (the linears of every measuring site, ``k = int((1 - S) d)``), routers excluded."""
    from ..stats import skipped_parameters

    def density(linear: nn.Module, _site: nn.Module) -> float:
        return keep_count(linear.in_features, sparsity) / linear.in_features

    saved = skipped_parameters(model, density)
    return int(round(total_parameters(model) - router_parameters(model) - saved))


@torch.no_grad()
def measured_activated(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """:func:`qsparse.stats.activated_parameters` measured on ``batches``."""
    from ..stats import sparsity_report

    return sparsity_report(model, batches).activated_parameters


def match_knob(
    cost: Any, target: float, lo: float, hi: float, steps: int, integer: bool = False
) -> float:
    """The largest knob value in [lo, hi] with ``cost(value) <= target`` for a cost that does
    not decrease with the knob (bisection; ``lo`` when even it costs more)."""
    if cost(hi) <= target:
        return hi
    if cost(lo) > target:
        return lo
    for _ in range(steps):
        if integer and hi - lo <= 1:
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if cost(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


@register
class D2DMoE(SparsityMethod):
    """D2DMoE conversion of a (ReLU-fied) dense model (module docstring)."""

    name = "d2dmoe"
    training_free = False  # the routers train (the model's own weights do not)
    needs_calibration = True

    def __init__(
        self,
        sparsity: float = 0.5,
        tau: float | None = None,
        expert_size: int | None = 32,
        num_experts: int | None = None,
        router_width: int = 128,
        router_steps: int = 500,
        router_lr: float = 1e-3,
        kmeans_iterations: int = 30,
        calibration: str | None = "wiki_en",
        calibration_tokens: int = 16384,
        seq_len: int = 256,
        match_tokens: int = 4096,
        match_steps: int = 10,
    ) -> None:
        super().__init__(sparsity)
        if tau is not None and not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"d2dmoe: tau={tau} must be in [0, 1] (or null: match sparsity)")
        if router_width < 1 or router_steps < 1 or router_lr <= 0:
            raise ValueError("d2dmoe: router_width, router_steps must be >= 1, router_lr > 0")
        self.tau = None if tau is None else float(tau)
        self.moe = MoEConfig(expert_size, num_experts, kmeans_iterations)
        self.router_width = int(router_width)
        self.router_steps = int(router_steps)
        self.router_lr = float(router_lr)
        self.calibration = calibration
        self.calibration_tokens = calibration_tokens
        self.seq_len = seq_len
        self.match_tokens = match_tokens
        self.match_steps = match_steps
        self.router_training = None

    def label(self) -> str:
        return f"d2dmoe S={self.sparsity:g}" if self.tau is None else f"d2dmoe tau={self.tau:g}"

    def _batches(self, tokenizer: Any, batches: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if batches is not None:
            return batches
        if self.calibration is None or tokenizer is None:
            raise ValueError("d2dmoe: give calibration batches or a tokenizer + calibration")
        return calibration_batches(
            tokenizer, self.calibration, self.calibration_tokens, self.seq_len
        )

    def convert(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        """Steps 2-3: measuring sites, experts, routers trained on ``batches``."""
        if not sparsifiers(model):
            sparsify(model, sparsity=SparsityConfig(ratio=0.0))
        width = self.router_width

        def router(mlp: nn.Module, experts: int) -> nn.Module:
            return RegressionRouter(mlp.gate_proj.in_features, experts, width)

        moefy(model, self.moe, router=router)
        self.router_training = train_routers(model, batches, self.router_steps, self.router_lr)

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        batches = self._batches(tokenizer, batches)
        self.convert(model, batches)
        layers = moe_layers(model)
        tau = self.tau
        if tau is None:
            target = qsparse_activated(model, self.sparsity)
            probe = take_tokens(batches, self.match_tokens)

            def cost(t: float) -> float:
                for m in layers.values():
                    m.set_mode("dynk", tau=t)
                return measured_activated(model, probe)

            tau = match_knob(cost, target, 0.0, 1.0, self.match_steps)
        for m in layers.values():
            m.set_mode("dynk", tau=tau)
        self.chosen_tau = tau
        first = next(iter(layers.values()))
        self.record(
            model,
            {
                "name": self.name,
                "sparsity": self.sparsity,
                "tau": tau,
                "num_experts": first.num_experts,
                "expert_size": first.expert_size,
                "router_width": self.router_width,
            },
        )
        names = [n.removeprefix("model.") for n in layers]
        return MethodResult(
            self.name,
            self.sparsity,
            site_sparsity=dict.fromkeys(names, self.sparsity),
            calibration_tokens=sum(int(b.numel()) for b in batches),
        )

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> None:
        """Rebuild the MoE layers (partition and router weights load afterwards)."""
        e, m, width = int(info["num_experts"]), int(info["expert_size"]), int(info["router_width"])
        placeholder = torch.arange(e * m).view(e, m)
        from .convert import ffn_layers

        parts = {name: placeholder for name, _, _ in ffn_layers(model)}
        moefy(
            model,
            MoEConfig(expert_size=m),
            router=lambda mlp, n: RegressionRouter(mlp.gate_proj.in_features, n, width),
            partitions=parts,
        )
        for layer in moe_layers(model).values():
            layer.set_mode("dynk", tau=float(info["tau"]))
