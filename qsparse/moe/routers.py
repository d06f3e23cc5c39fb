"""D2DMoE router training: regress each expert's output L2 norm from the FFN input.

For an MoE layer with input ``x`` [d] and dense intermediate ``h = act(W_gate x) ⊙ W_up x``,
the target of expert ``e`` is the norm of what it adds to the output::

    t_e(x) = || W_down[:, I_e] h[I_e] ||₂                      (router_targets)
    loss   = mean over layers of mean_{tokens, e} (r̂_e(x) - t_e(x))²

The model is frozen and run with every expert (mode ``all``); only the routers
(:class:`~qsparse.moe.layer.RegressionRouter`, d -> width -> E, ReLU, |·|) train, with Adam.
The reference trains about 500-1000 steps at lr 1e-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.calibration import model_forward
from .convert import moe_layers
from .layer import MoEFeedForward


def router_targets(moe: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """``t`` [..., E]: the L2 norm of every expert's output for intermediate ``h`` [..., F]."""
    return moe.expert_outputs(h.float()).norm(dim=-1)


@dataclass
class RouterTraining:
    """What :func:`train_routers` did: steps, the loss per step (mean over layers) and the
    final loss per layer."""

    steps: int
    losses: list[float] = field(default_factory=list)
    final_layer_loss: dict[str, float] = field(default_factory=dict)


def train_routers(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    steps: int = 500,
    lr: float = 1e-3,
) -> RouterTraining:
    """Train every MoE layer's router on ``batches`` (LongTensor[B, T] each, cycled) for
    ``steps`` Adam steps (module docstring); the model's own weights do not change.

    Raises:
        ValueError: no MoE layer with a trainable router, no batch, or ``steps`` < 1.
    """
    layers = {n: m for n, m in moe_layers(model).items() if m.router is not None}
    params = [p for m in layers.values() for p in m.router.parameters()]
    if not layers or not params:
        raise ValueError("train_routers: the model has no MoE layer with a trainable router")
    if not batches:
        raise ValueError("train_routers: no training batches")
    if steps < 1:
        raise ValueError(f"train_routers: steps={steps} must be >= 1")
    saved_modes = {n: (m.mode, m.k, m.tau) for n, m in layers.items()}
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.eval()
    model.requires_grad_(False)
    for m in layers.values():
        m.set_mode("all")
        m.router.requires_grad_(True)
        m.router.train()
    opt = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    record = RouterTraining(steps)
    try:
        for step in range(steps):
            for m in layers.values():
                m.capture = []
            with torch.no_grad():
                model_forward(model, batches[step % len(batches)].to(device))
            losses = {}
            for name, m in layers.items():
                x, h = m.capture[0]
                with torch.no_grad():
                    target = router_targets(m, h)
                pred = m.router(x).float()
                losses[name] = torch.mean((pred - target) ** 2)
            loss = torch.stack(list(losses.values())).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record.losses.append(float(loss.detach()))
            if step == steps - 1:
                record.final_layer_loss = {n: float(v.detach()) for n, v in losses.items()}
    finally:
        for name, m in layers.items():
            m.capture = None
            mode, k, tau = saved_modes[name]
            m.set_mode(mode, k=k, tau=tau)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
    return record
