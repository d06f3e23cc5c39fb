"""Gated feed-forward networks (Q-Sparse Eq. 11) with Hugging Face Llama parameter names."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("relu2", "silu")


class ReLUSquared(nn.Module):
    """ReLU²(x) = max(x, 0)², the activation of Q-Sparse's GLU (exact zeros for x <= 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def make_activation(name: str) -> nn.Module:
    """``"relu2"`` -> :class:`ReLUSquared`, ``"silu"`` -> ``nn.SiLU`` (SwiGLU baseline)."""
    if name == "relu2":
        return ReLUSquared()
    if name == "silu":
        return nn.SiLU()
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
