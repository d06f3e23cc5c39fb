"""SSD's MoE inference form as a method: centroid-routed top-k experts.

An SSD-trained model (or any dense one) runs sparsely by the same conversion its sparse
training phases used (:func:`qsparse.moe.ssd.to_moe`): experts by balanced k-means on the
normalised gate rows, router vectors = each expert's normalised mean gate row
(:class:`~qsparse.moe.layer.CentroidRouter`, no training), top-k experts per token. ``k``
fixes the number of experts; ``k: null`` (default) picks the largest k whose activated
parameters (:func:`qsparse.stats.activated_parameters` on ``match_tokens`` calibration
tokens) do not exceed Q-Sparse top-k's at ``sparsity`` (as :class:`~qsparse.moe.D2DMoE` picks
τ), so ``qsparse-compare`` rows sit at matched activated parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..convert import sparsify
from ..methods.base import MethodResult, SparsityMethod, register
from ..methods.calibration import calibration_batches, take_tokens
from ..nn import SparsityConfig
from ..nn.sites import sparsifiers
from .convert import MoEConfig, ffn_layers, moe_layers, moefy
from .d2dmoe import match_knob, measured_activated, qsparse_activated
from .layer import CentroidRouter


@register
class SSDMoE(SparsityMethod):
    """SSD's MoE form (module docstring)."""

    name = "ssd"
    needs_calibration = True

    def __init__(
        self,
        sparsity: float = 0.5,
        k: int | None = None,
        expert_size: int | None = 32,
        num_experts: int | None = None,
        kmeans_iterations: int = 30,
        calibration: str | None = "wiki_en",
        calibration_tokens: int = 4096,
        seq_len: int = 256,
    ) -> None:
        super().__init__(sparsity)
        if k is not None and int(k) < 1:
            raise ValueError(f"ssd: k={k} must be >= 1 (or null: match sparsity)")
        self.k = None if k is None else int(k)
        self.moe = MoEConfig(expert_size, num_experts, kmeans_iterations)
        self.calibration = calibration
        self.calibration_tokens = calibration_tokens
        self.seq_len = seq_len

    def label(self) -> str:
        return f"ssd S={self.sparsity:g}" if self.k is None else f"ssd k={self.k}"

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        if not sparsifiers(model):
            sparsify(model, sparsity=SparsityConfig(ratio=0.0))
        moefy(model, self.moe, router=lambda mlp, e: CentroidRouter())
        layers = moe_layers(model)
        e = next(iter(layers.values())).num_experts
        k = self.k
        if k is None:
            if batches is None:
                if self.calibration is None or tokenizer is None:
                    raise ValueError("ssd: give calibration batches or a tokenizer + calibration")
                batches = calibration_batches(
                    tokenizer, self.calibration, self.calibration_tokens, self.seq_len
                )
            probe = take_tokens(batches, self.calibration_tokens)
            target = qsparse_activated(model, self.sparsity)

            def cost(kk: float) -> float:
                for m in layers.values():
                    m.set_mode("topk", k=int(kk))
                return measured_activated(model, probe)

            k = int(match_knob(cost, target, 1, e, 64, integer=True))
        for m in layers.values():
            m.set_mode("topk", k=min(k, m.num_experts))
        self.chosen_k = k
        first = next(iter(layers.values()))
        self.record(
            model,
            {
                "name": self.name,
                "sparsity": self.sparsity,
                "k": k,
                "num_experts": first.num_experts,
                "expert_size": first.expert_size,
            },
        )
        names = [n.removeprefix("model.") for n in layers]
        return MethodResult(self.name, self.sparsity, site_sparsity=dict.fromkeys(names, 1 - k / e))

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> None:
        e, m = int(info["num_experts"]), int(info["expert_size"])
        placeholder = torch.arange(e * m).view(e, m)
        moefy(
            model,
            MoEConfig(expert_size=m),
            router=lambda mlp, n: CentroidRouter(),
            partitions={name: placeholder for name, _, _ in ffn_layers(model)},
        )
        for layer in moe_layers(model).values():
            layer.set_mode("topk", k=int(info["k"]))
