"""Per-layer gradient norms (Q-Sparse Fig. 2: the STE keeps lower layers' gradients alive)."""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch

from ._model import inner_model

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LayerGradNorm(L.Callback):
    """Gradient L2 norm of each decoder layer, ``grad_norm/layer_<i>`` =
    ``sqrt(sum_{p in layers.i} ||dL/dp||^2)``, before clipping, every ``every_n_steps`` steps.

    Q-Sparse Fig. 2 shows that without the straight-through estimator (``sparsity.ste=false``)
    these norms collapse in the lower layers; ``recipe=figures/ste_tiny`` runs that comparison.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.grad_norm.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        squares: dict[int, torch.Tensor] = {}
        for name, p in inner_model(pl_module).named_parameters():
            match = _LAYER.search(name)
            if p.grad is None or match is None:
                continue
            i = int(match.group(1))
            sq = p.grad.detach().float().pow(2).sum()
            squares[i] = squares[i] + sq if i in squares else sq
        if squares:
            pl_module.log_dict(
                {f"grad_norm/layer_{i:02d}": v.sqrt() for i, v in sorted(squares.items())},
                on_step=True,
                on_epoch=False,
            )
