"""ProSparse: ReLU swap, progressive L1 on the FFN activations, FATReLU (Song et al., 2402.13516).

1. Swap the GLU's SiLU for ReLU (``act(x W_gateᵀ)`` becomes exactly 0 for negative gates).
2. Continue training with ``λ(t) · L1`` added to the loss, ``L1`` the mean ``|a|`` of each
   MLP's intermediate activation ``a = act(x W_gateᵀ)`` summed over layers (a decision: the
   paper writes ``λ ||a||₁``; the mean keeps ``λ`` independent of width and token count).
   ``λ`` rises in stages along sine curves: with milestones ``T_0 < ... < T_n`` and values
   ``λ_0 ... λ_n`` (``T_{-1} = 0``, ``λ_{-1} = 0``), inside stage ``i``::

       η = ½ [sin(-π/2 + π (t - T_{i-1}) / (T_i - T_{i-1})) + 1]
       λ(t) = λ_{i-1} + η (λ_i - λ_{i-1})

   and ``λ(t) = λ_n`` after ``T_n``. The 7B schedule: ``λ`` 0, 5e-3, 5e-2, 5e-2, 0.2, 0.2 at
   steps 5k, 6k, 10k, 12k, 16k, 16.5k.
3. FATReLU: ``f(x) = x · 1[x ≥ τ]`` with a small positive ``τ`` (0.01) instead of 0.

The L1 term reaches the optimizer without touching the training loop:
:class:`qsparse.nn.FATReLU` adds ``λ · ∂mean|a|/∂a = λ · sign(a) / numel(a)`` to the gradient
of its output in the backward, exactly what ``loss + λ · mean|a|`` would give.

Training (``qsparse-train method=prosparse``, e.g. ``recipe=continue/prosparse_tiny``): the
run's conversion swaps the activation to ``FATReLU(0)`` (``activation: relu``); before every
batch :meth:`ProSparse.on_train_step` sets ``λ(global_step)`` on every FATReLU and logs
``prosparse/lambda`` and ``prosparse/l1`` (mean ``|a|`` over layers, previous batch); when fit
ends, ``final: true`` sets the FATReLU threshold to ``fatrelu_threshold`` (so the final
validation and the export use it). Applied without training,
``ProSparse(final=True).apply(model)`` sets it on any model. Reported: 89% sparsity on
Llama-2-7B at near-dense quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..convert import sparsify
from ..nn import FATReLU, SparsityConfig
from ..nn.sites import decoder_layers
from .base import MethodConfigError, MethodResult, SparsityMethod, register

SCHEDULE_7B = ((5000, 6000, 10000, 12000, 16000, 16500), (0.0, 5e-3, 5e-2, 5e-2, 0.2, 0.2))


def sine_schedule(step: float, milestones: Sequence[float], values: Sequence[float]) -> float:
    """``λ(step)`` of the staged sine schedule (module docstring)."""
    if len(milestones) != len(values) or not milestones:
        raise ValueError("milestones and values must be non-empty and of equal length")
    if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)) or milestones[0] <= 0:
        raise ValueError(f"milestones {list(milestones)} must be positive and increasing")
    prev_t, prev_v = 0.0, 0.0
    for t_i, v_i in zip(milestones, values, strict=True):
        if step <= t_i:
            eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - prev_t) / (t_i - prev_t)) + 1)
            return prev_v + eta * (v_i - prev_v)
        prev_t, prev_v = t_i, v_i
    return float(values[-1])


def prosparse_activations(model: nn.Module) -> list[FATReLU]:
    return [mlp.act_fn for _, _, mlp in decoder_layers(model) if isinstance(mlp.act_fn, FATReLU)]


@register
class ProSparse(SparsityMethod):
    """Swap every decoder MLP's activation for :class:`FATReLU` (``threshold``: 0 during
    training, ``fatrelu_threshold`` after it) and install measuring sites. ``sparsity`` is not
    imposed (ProSparse's sparsity is what training reaches); it only labels the row."""

    name = "prosparse"
    training_free = False

    def __init__(
        self,
        sparsity: float = 0.0,
        milestones: Sequence[int] = SCHEDULE_7B[0],
        lambdas: Sequence[float] = SCHEDULE_7B[1],
        fatrelu_threshold: float = 0.01,
        final: bool = False,
    ) -> None:
        super().__init__(sparsity)
        sine_schedule(0, milestones, lambdas)  # validates
        self.milestones, self.lambdas = list(milestones), list(lambdas)
        self.fatrelu_threshold = float(fatrelu_threshold)
        self.final = final

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        sparsify(model, sparsity=SparsityConfig(ratio=0.0))
        tau = self.fatrelu_threshold if self.final else 0.0
        self.restore(model, {"threshold": tau})
        self.record(model, {"name": self.name, "threshold": tau})
        return MethodResult(self.name, self.sparsity)

    @classmethod
    def restore(cls, model: nn.Module, info: dict[str, Any]) -> None:
        for _, _, mlp in decoder_layers(model):
            mlp.act_fn = FATReLU(float(info.get("threshold", 0.0)))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "hidden_act"):
            config.hidden_act = "relu"

    # ---------------------------------------------------------------- training
    def training_conversion(
        self, sparsity: SparsityConfig, activation: str
    ) -> tuple[SparsityConfig, str]:
        """ReLU swap, no top-k: the sites only measure what ReLU and the L1 penalty zero."""
        if sparsity.enabled:
            raise MethodConfigError(
                "config error: method=prosparse makes the MLP sparse itself (ReLU + L1) but "
                f"sparsity.ratio={sparsity.ratio:g} ({sparsity.pattern}) is set too: use "
                "sparsity=none"
            )
        if activation not in ("keep", "relu"):
            raise MethodConfigError(
                f"config error: method=prosparse swaps the MLP activation to ReLU but "
                f"activation={activation}: use activation=keep"
            )
        return sparsity, "relu"

    def on_model_configured(self, model: nn.Module) -> None:
        self.record(model, {"name": self.name, "threshold": 0.0})

    def on_train_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Set ``λ(step)`` on every FATReLU; return it and the last batch's mean ``|a|``."""
        lam = sine_schedule(step, self.milestones, self.lambdas)
        acts = prosparse_activations(model)
        for act in acts:
            act.l1_coefficient = lam
        out = {"prosparse/lambda": lam}
        seen = [a.last_l1 for a in acts if a.last_l1 is not None]
        if seen:
            out["prosparse/l1"] = float(torch.stack(seen).mean())
        return out

    def on_fit_end(self, model: nn.Module) -> None:
        """``final``: FATReLU at ``fatrelu_threshold`` from now on (λ back to 0)."""
        tau = self.fatrelu_threshold if self.final else 0.0
        for act in prosparse_activations(model):
            act.threshold, act.l1_coefficient = tau, 0.0
        self.record(model, {"name": self.name, "threshold": tau})
