"""8-bit AdamW (bitsandbytes) for memory-bound continued training and fine-tuning.

``adamw8bit`` is an optimizer factory with the same call shape as the other ``optim``
options: Hydra builds it as a partial (``_partial_: true``) and the training module calls it
with the parameter groups of :func:`qsparse.training.optim.param_groups` (decay for
matrices, none for norms, biases and embeddings). The two moments are stored block-wise
quantized to 8 bits (Dettmers et al., 2022): about 2 bytes of optimizer state per parameter
instead of 8 for fp32 AdamW. Tensors smaller than ``min_8bit_size`` keep 32-bit state.

bitsandbytes' 8-bit optimizers run on CUDA only; on other machines the factory raises a
``RuntimeError`` that says to use ``optim=adamw`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from qsparse.extras import require

from .optim import param_groups


def _import_bnb_optim() -> Any:
    return require("bitsandbytes.optim", "adamw8bit", "optim=adamw8bit")


def adamw8bit(
    params: Iterable[nn.Parameter] | Iterable[dict] | nn.Module,
    lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    min_8bit_size: int = 4096,
    paged: bool = False,
) -> Optimizer:
    """Build ``bitsandbytes.optim.AdamW8bit`` over ``params``.

    Args:
        params: parameter groups (``[{"params": [...], "weight_decay": w}, ...]`` as the
            training module passes them), a flat iterable of parameters, or a module (its
            groups are built with :func:`param_groups` and ``weight_decay``).
        lr, betas, eps: AdamW hyper-parameters, ``betas`` = (beta1, beta2).
        weight_decay: decoupled decay for groups that do not set their own.
        min_8bit_size: tensors with fewer elements keep 32-bit state.
        paged: use paged optimizer state (CPU spill-over under memory pressure).

    Raises:
        RuntimeError: no CUDA device (bitsandbytes' 8-bit AdamW is CUDA-only).
        ValueError: a hyper-parameter is out of range or a parameter is not on a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "optim=adamw8bit (bitsandbytes AdamW8bit) needs a CUDA GPU and none is available; "
            "use optim=adamw on this machine"
        )
    if lr <= 0:
        raise ValueError(f"optim.lr={lr} must be > 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    if eps <= 0:
        raise ValueError(f"optim.eps={eps} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay={weight_decay} must be >= 0")
    if isinstance(params, nn.Module):
        groups: list[Any] = param_groups(params, weight_decay)
    else:
        groups = list(params)
    if not groups:
        raise ValueError("adamw8bit got no parameters to optimize")
    tensors = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
    off_gpu = [tuple(p.shape) for p in tensors if p.device.type != "cuda"]
    if off_gpu:
        raise ValueError(
            f"adamw8bit: {len(off_gpu)} parameter(s) are not on a CUDA device (first shape "
            f"{off_gpu[0]}); build the optimizer after moving the model to the GPU "
            "(Lightning's configure_optimizers does)"
        )
    bnb_optim = _import_bnb_optim()
    cls = bnb_optim.PagedAdamW8bit if paged else bnb_optim.AdamW8bit
    return cls(
        groups,
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        weight_decay=weight_decay,
        min_8bit_size=min_8bit_size,
    )
