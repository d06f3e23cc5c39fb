"""Gated feed-forward networks (Q-Sparse Eq. 11) with Hugging Face Llama parameter names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS = ("relu2", "silu", "relu")


class _PenaltyGradient(torch.autograd.Function):
    """Identity forward; backward adds ``penalty_grad(a)`` to the incoming gradient."""

    @staticmethod
    def forward(
        ctx, a: torch.Tensor, penalty_grad: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.penalty_grad = penalty_grad
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (a,) = ctx.saved_tensors
        return grad + ctx.penalty_grad(a).to(grad.dtype), None


def add_penalty_gradient(
    a: torch.Tensor, penalty_grad: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``a`` unchanged, whose backward adds ``penalty_grad(a)`` (same shape as ``a``): the
    gradient of a penalty ``P(a)`` on an activation, as ``loss + P(a)`` would give, without
    touching the training loop (ProSparse's L1 in :class:`FATReLU`, D2DMoE's Hoyer penalty
    in :class:`qsparse.moe.hoyer.HoyerReLU`)."""
    return _PenaltyGradient.apply(a, penalty_grad)


class FATReLU(nn.Module):
    """``f(x) = x · 1[x ≥ threshold]`` (``threshold = 0``: ReLU; ProSparse's FATReLU uses a
    small positive one). With ``l1_coefficient = λ > 0`` in training, the backward adds the
    gradient of ``λ · mean|f(x)|`` (:mod:`qsparse.methods.prosparse`); ``last_l1`` holds the
    detached ``mean|f(x)|`` of the last training call."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.l1_coefficient = 0.0
        self.last_l1: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold > 0:
            a = torch.where(x >= self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
        else:
            a = torch.relu(x)
        if self.training:
            self.last_l1 = a.detach().abs().mean()
            if self.l1_coefficient > 0 and a.requires_grad:
                coef = self.l1_coefficient  # gradient of coef · mean|a|
                a = add_penalty_gradient(a, lambda t: coef * torch.sign(t) / t.numel())
        return a

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class ReLUSquared(nn.Module):
    """ReLU²(x) = max(x, 0)², the activation of Q-Sparse's GLU (exact zeros for x <= 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def make_activation(name: str) -> nn.Module:
    """``"relu2"`` -> :class:`ReLUSquared`, ``"silu"`` -> ``nn.SiLU`` (SwiGLU baseline),
    ``"relu"`` -> :class:`FATReLU` at threshold 0 (ProSparse's swap)."""
    if name == "relu2":
        return ReLUSquared()
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return FATReLU(0.0)
    raise ValueError(f"activation={name!r} is not supported; use one of {ACTIVATIONS}")


class GLUFeedForward(nn.Module):
    """``FFN(x) = down_proj(act(gate_proj(x)) * up_proj(x))``.

    ``x``: [..., hidden] -> [..., hidden]; gate/up: hidden -> intermediate; no biases.
    ``activation="relu2"`` is Q-Sparse's squared-ReLU GLU; ``"silu"`` is SwiGLU.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "relu2"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)
        return self.down_proj(self.act_fn(gate) * up)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., hidden] -> (gate, up), each [..., intermediate] (the decode engine fuses them)."""
        return self.gate_proj(x), self.up_proj(x)
