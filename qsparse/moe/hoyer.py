"""D2DMoE's sparsity-raising phase: ReLU activations plus a Hoyer penalty on them.

Before the conversion, D2DMoE fine-tunes the dense model with ReLU in every FFN and adds
``w · mean_layers mean_tokens H(a)`` to the loss, where ``a`` [F] is a token's FFN activation
``ReLU(W_gate x)`` and ``H`` is the squared Hoyer measure (Kurtz et al. 2020)::

    H(a) = ||a||₁² / (||a||₂² + ε)          (between 1 and F; 1 = one non-zero)

Its gradient, per token (``S₁ = Σ|a_i|``, ``S₂ = Σ a_i² + ε``)::

    ∂H/∂a_i = 2 S₁ sign(a_i) / S₂ - 2 S₁² a_i / S₂²

:class:`HoyerReLU` adds ``w / (L · T) · ∂H/∂a`` to the gradient of its output in the backward
(``T`` tokens in the call, ``L`` = ``num_layers``), which is what ``loss + w · mean H`` gives,
without touching the training loop (as :class:`qsparse.nn.FATReLU` does for ProSparse's L1).
:class:`HoyerSchedule` installs it in every MLP and ramps ``w`` linearly from 0 to ``weight``
over the first ``warmup_fraction`` of training (the reference's ``linear_warmup``: half). The
reference used ``w`` in 1e-4 ... 1e-3 for language models.
"""

from __future__ import annotations

from typing import Any

import torch

from ..nn import FATReLU
from ..nn.ffn import add_penalty_gradient
from ..nn.sites import decoder_layers

EPS = 1e-15


def hoyer_square(a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``||a||₁² / (||a||₂² + ε)`` over the last dim: [..., F] -> [...]."""
    a = a.float()
    return a.abs().sum(-1) ** 2 / (a.square().sum(-1) + eps)


def hoyer_gradient(a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``∂H/∂a`` per token (module docstring), shape of ``a``."""
    a = a.float()
    s1 = a.abs().sum(-1, keepdim=True)
    s2 = a.square().sum(-1, keepdim=True) + eps
    return 2 * s1 * torch.sign(a) / s2 - 2 * s1.square() * a / s2.square()


class HoyerReLU(FATReLU):
    """ReLU (a :class:`FATReLU` at threshold 0: exports and reloads as ``hidden_act: relu``)
    whose backward adds ``hoyer_coefficient · ∂ mean_tokens H(a) / ∂a``; ``last_hoyer`` is
    the detached mean ``H`` and ``last_sparsity`` the fraction of zeros of the last training
    call."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.hoyer_coefficient = 0.0
        self.last_hoyer: torch.Tensor | None = None
        self.last_sparsity: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x)
        if self.training:
            with torch.no_grad():
                self.last_hoyer = hoyer_square(a).mean()
                self.last_sparsity = (a == 0).float().mean()
            if self.hoyer_coefficient > 0 and a.requires_grad:
                coef = self.hoyer_coefficient

                def penalty_grad(t: torch.Tensor) -> torch.Tensor:  # of coef · mean_tokens H(t)
                    tokens = max(t.numel() // t.shape[-1], 1)
                    return (coef / tokens) * hoyer_gradient(t).to(t.dtype)

                a = add_penalty_gradient(a, penalty_grad)
        return a


def install_hoyer_relu(model: torch.nn.Module) -> list[HoyerReLU]:
    """Make every decoder MLP's activation a :class:`HoyerReLU` (idempotent); sets
    ``config.hidden_act = "relu"`` where the model has one (export says ReLU)."""
    out = []
    for _, _, mlp in decoder_layers(model):
        if not isinstance(mlp.act_fn, HoyerReLU):
            mlp.act_fn = HoyerReLU()
        out.append(mlp.act_fn)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_act"):
        config.hidden_act = "relu"
    return out


try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


def warmup_weight(step: int, total: int, weight: float, warmup_fraction: float) -> float:
    """``weight · min(1, step / (warmup_fraction · total))`` (``weight`` at once when the
    fraction is 0)."""
    ramp = warmup_fraction * total
    return weight if ramp <= 0 else weight * min(1.0, step / ramp)


class HoyerSchedule(Callback):
    """Installs :class:`HoyerReLU` in every MLP at fit start and sets its coefficient
    ``w(t) / L`` before each batch (:func:`warmup_weight`); logs ``hoyer/weight``,
    ``hoyer/value`` (mean H over layers) and ``hoyer/sparsity`` (zeros of the activations)."""

    def __init__(self, weight: float = 5e-4, warmup_fraction: float = 0.5) -> None:
        if weight < 0:
            raise ValueError(f"hoyer weight={weight} must be >= 0")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"hoyer warmup_fraction={warmup_fraction} must be in [0, 1]")
        self.weight = float(weight)
        self.warmup_fraction = float(warmup_fraction)
        self.acts: list[HoyerReLU] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.acts = install_hoyer_relu(getattr(pl_module, "model", pl_module))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 1
        w = warmup_weight(trainer.global_step, total, self.weight, self.warmup_fraction)
        for act in self.acts:
            act.hoyer_coefficient = w / max(len(self.acts), 1)
        pl_module.log("hoyer/weight", w)
        seen = [a.last_hoyer for a in self.acts if a.last_hoyer is not None]
        if seen:
            pl_module.log("hoyer/value", float(torch.stack(seen).mean()))
            zeros = [a.last_sparsity for a in self.acts if a.last_sparsity is not None]
            pl_module.log("hoyer/sparsity", float(torch.stack(zeros).mean()))
