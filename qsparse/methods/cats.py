"""CATS: contextually-aware thresholding of the gate activation (Lee et al., 2404.08763).

In a SiLU-GLU MLP ``FFN(x) = (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ`` CATS thresholds only the
gate activation::

    a = SiLU(x W_gateᵀ)                      [..., F]
    m = a · 1[|a| > t]                       one t per layer
    FFN(x) = (m ⊙ x W_upᵀ) W_downᵀ

``t = icdf_|a|(s)``: the magnitude below which a fraction ``s`` (the target sparsity) of the
layer's calibration gate activations fall (the paper takes the same percentile from its
calibration histogram; :mod:`qsparse.methods.calibration`). By default (``sequential``) each
layer's histogram is taken with the earlier layers already thresholded; ``sequential=False``
calibrates every layer on the dense model, as the paper. A zeroed neuron ``i`` needs neither
row ``i`` of ``W_up`` nor column ``i`` of ``W_down``; ``W_gate`` is always read (it decides).
Activated parameters count that: the down site measures the zeros of its input, and
``up_proj.row_gate`` points at the gate threshold so its skipped rows count too
(:mod:`qsparse.stats`). Attention stays dense.

Training-free (the optional fine-tune of the paper is not part of this method). Reported:
~15% MLP kernel speed-up at 50%; TEAL (2408.14690) reports CATS degrading fast at 40%+ on
Llama-3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..convert import sparsify
from ..nn import ActivationSparsifier, SparsityConfig
from ..nn.sites import decoder_layers
from .base import MethodResult, register
from .calibration import collect_histograms, sequential_thresholds, set_threshold
from .teal import TEAL


class GateThreshold(nn.Module):
    """The MLP's ``act_fn`` followed by a threshold: ``g -> act(g) · 1[|act(g)| > t]``.

    ``g``: [..., F] -> [..., F]; ``sparsifier`` is an :class:`ActivationSparsifier` with
    ``pattern="threshold"`` (its ``threshold`` buffer is saved with the model).
    """

    def __init__(self, act: nn.Module, dim: int) -> None:
        super().__init__()
        self.act = act
        self.sparsifier = ActivationSparsifier(dim, pattern="threshold")

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        return self.sparsifier(self.act(gate))


def install_gate_thresholds(model: nn.Module) -> dict[str, ActivationSparsifier]:
    """Wrap every decoder MLP's ``act_fn`` in a :class:`GateThreshold` (idempotent) and point
    ``up_proj.row_gate`` at it; returns ``layers.N.mlp.act_fn`` -> sparsifier."""
    out = {}
    for prefix, _, mlp in decoder_layers(model):
        if not isinstance(mlp.act_fn, GateThreshold):
            ref = mlp.gate_proj.weight
            mlp.act_fn = GateThreshold(mlp.act_fn, mlp.gate_proj.out_features).to(
                device=ref.device, dtype=ref.dtype
            )
        # a plain attribute, not a submodule: the sparsifier already lives under act_fn
        mlp.up_proj.__dict__["row_gate"] = mlp.act_fn.sparsifier
        name = f"{prefix}.mlp.act_fn" if prefix else "mlp.act_fn"
        out[name.removeprefix("model.")] = mlp.act_fn.sparsifier
    return out


@register
class CATS(TEAL):
    """CATS (module docstring): ``sparsity`` is the fraction of gate activations zeroed in
    every layer on the calibration text."""

    name = "cats"

    def __init__(
        self,
        sparsity: float = 0.5,
        calibration: str | None = "wiki_en",
        calibration_tokens: int = 16384,
        seq_len: int = 256,
        sequential: bool = True,
    ) -> None:
        super().__init__(
            sparsity,
            greedy=False,
            calibration=calibration,
            calibration_tokens=calibration_tokens,
            seq_len=seq_len,
            sequential=sequential,
        )

    def label(self) -> str:
        return f"cats S={self.sparsity:g}"

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        batches = self._batches(tokenizer, batches)
        # dense sites at every projection input: they only measure (the down input's zeros)
        sparsify(model, sparsity=SparsityConfig(ratio=0.0))
        gates = install_gate_thresholds(model)
        targets = dict.fromkeys(gates, self.sparsity)
        if self.sequential:
            thresholds = sequential_thresholds(model, gates, batches, targets)
        else:
            hists = collect_histograms(model, gates, batches)
            thresholds = {n: set_threshold(sp, hists[n], self.sparsity) for n, sp in gates.items()}
        self.record(model, {"name": self.name, "sparsity": self.sparsity})
        tokens = sum(int(b.numel()) for b in batches)
        return MethodResult(
            self.name,
            self.sparsity,
            {n: self.sparsity for n in gates},
            thresholds,
            calibration_tokens=tokens,
        )

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> None:
        gates = install_gate_thresholds(model)
        for sp in gates.values():
            sp.ratio = sp.target_ratio = float(info.get("sparsity", 0.0))
