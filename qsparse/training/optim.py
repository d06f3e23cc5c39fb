"""Optimizer parameter groups and per-step learning-rate schedules.

Weight decay applies to matrices only: norms, biases and embeddings (including a tied
lm_head, which *is* the embedding) go to a no-decay group.

Schedules (``step`` = optimizer steps done, ``W`` = warm-up steps, ``T`` = total steps,
``lr`` = peak, ``m`` = ``min_lr``):

- warm-up: ``lr * (step + 1) / W`` for ``step < W``;
- ``cosine``: ``m + (lr - m) * 0.5 * (1 + cos(pi * p))``, ``p = (step - W) / (T - W)``;
- ``linear`` / ``polynomial``: ``m + (lr - m) * (1 - p) ** power`` (``power = 1`` is linear);
- ``constant``: ``lr``.

:class:`TwoStageSchedule` is BitNet b1.58's two-stage recipe: the first ``split`` of training
follows the cosine schedule above from ``lr``; the rest restarts a cosine from the lower
``stage2_lr``, and weight decay (of the decay group) switches to ``stage2_weight_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

DECAYS = ("cosine", "linear", "polynomial", "constant")


# wrappers that FSDP1, torch.compile and activation checkpointing insert into names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes (``layers.0._orig_mod.w`` -> ``layers.0.w``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_no_decay(name: str, param: nn.Parameter, module: nn.Module | None) -> bool:
    if param.ndim < 2:  # norms, biases, scalars
        return True
    if isinstance(module, nn.Embedding):
        return True
    module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return "embed" in module_name  # embed_tokens, wte-style names, position embeddings


def no_decay_names(model: nn.Module) -> frozenset[str]:
    """Names of the trainable parameters that get no weight decay, decided on the unwrapped
    model: ``ndim < 2`` (RMSNorm weights, biases) and embeddings (``nn.Embedding`` weights; a
    tied lm_head shares that Parameter, and both of its names are listed).

    Call it before FSDP, ``torch.compile`` or checkpointing wrap the model: FSDP1 flattens
    parameters to 1-D, which would put every parameter in the no-decay group.
    """
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    verdict: dict[int, bool] = {}
    names = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in verdict:
            verdict[id(p)] = _is_no_decay(name, p, owner.get(id(p)))
        if verdict[id(p)]:
            names.add(clean_name(name))
    return frozenset(names)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: frozenset[str] | None = None
) -> list[dict]:
    """Split trainable parameters into ``[{decay}, {no decay}]`` AdamW groups.

    ``no_decay``: names from :func:`no_decay_names` taken before the model was wrapped (the
    training module records them in ``configure_model``); ``None`` decides on ``model`` as
    it is now. Each Parameter appears in exactly one group, in ``named_parameters`` order.
    """
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay={weight_decay} must be >= 0")
    if no_decay is None:
        no_decay = no_decay_names(model)
    decay, skip, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (skip if clean_name(name) in no_decay else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


# the optimizer when the run's config has none (optim: null)
DEFAULT_OPTIM = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "lr": 3e-4,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
}


def configure_optimization(
    model: nn.Module,
    optim: Any,
    scheduler: Any,
    no_decay: frozenset[str] | None,
    on_cuda: bool,
    total_steps: Callable[[], int],
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for ``model``.

    ``optim``/``scheduler``: Hydra nodes (``optim=``/``scheduler=`` configs; ``optim: null``
    is :data:`DEFAULT_OPTIM`, ``scheduler: null`` none) or factories ``f(param_groups)`` /
    ``f(optimizer, total_steps=...)``. Weight decay goes to :func:`param_groups`' decay group;
    ``fused: null`` turns fused AdamW on where every parameter is on CUDA (``on_cuda``). A
    scheduler's ``total_steps`` defaults to ``total_steps()`` (the trainer's estimate), and it
    steps every optimizer step.
    """
    from hydra.utils import instantiate

    spec = DEFAULT_OPTIM if optim is None else optim
    if callable(spec):
        factory, wd = spec, getattr(spec, "keywords", {}).get("weight_decay", 0.0)
    else:
        spec = dict(spec)
        wd = float(spec.get("weight_decay", 0.0))
        if spec.get("fused") is None and "fused" in spec:
            # fused AdamW is the fast path on CUDA; it needs every param on CUDA
            spec["fused"] = on_cuda or None
        if spec.get("betas") is not None:
            spec["betas"] = tuple(spec["betas"])
        spec["_partial_"] = True
        factory = instantiate(spec, _convert_="all")
    optimizer = factory(param_groups(model, wd, no_decay))
    if scheduler is None:
        return {"optimizer": optimizer}
    if callable(scheduler):
        sched_factory, total = scheduler, None
    else:
        sched_spec = dict(scheduler)
        total = sched_spec.pop("total_steps", None)
        sched_spec["_partial_"] = True
        sched_factory = instantiate(sched_spec, _convert_="all")
    if total is None:
        total = total_steps()
    return {
        "optimizer": optimizer,
        "lr_scheduler": {
            "scheduler": sched_factory(optimizer, total_steps=int(total)),
            "interval": "step",
            "frequency": 1,
        },
    }


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float,
    decay: str = "cosine",
    power: float = 1.0,
) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay in ("linear", "polynomial"):
        shape = (1.0 - progress) ** (1.0 if decay == "linear" else power)
    else:
        raise ValueError(f"scheduler.decay={decay!r} is not supported; use one of {DECAYS}")
    return min_ratio + (1.0 - min_ratio) * shape


def _check(warmup_steps: int, total_steps: int, min_lr: float, decay: str, power: float) -> None:
    if decay not in DECAYS:
        raise ValueError(f"scheduler.decay={decay!r} is not supported; use one of {DECAYS}")
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps} must be >= 0")
    if total_steps < 1:
        raise ValueError(
            f"scheduler.total_steps={total_steps} must be >= 1 "
            "(null = the trainer's estimated_stepping_batches)"
        )
    if min_lr < 0:
        raise ValueError(f"scheduler.min_lr={min_lr} must be >= 0")
    if power <= 0:
        raise ValueError(f"scheduler.power={power} must be > 0")


def warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    decay: str = "cosine",
    power: float = 1.0,
) -> LambdaLR:
    """Linear warm-up then ``decay`` to the absolute ``min_lr``, stepped once per optimizer step.

    ``min_lr`` must not exceed any group's peak LR (``optimizer.param_groups[i]["lr"]``).
    """
    _check(warmup_steps, total_steps, min_lr, decay, power)
    lambdas: list[Callable[[int], float]] = []
    for group in optimizer.param_groups:
        peak = group.get("initial_lr", group["lr"])
        if min_lr > peak:
            raise ValueError(f"scheduler.min_lr={min_lr} exceeds the peak optim.lr={peak}")
        ratio = min_lr / peak if peak > 0 else 0.0
        lambdas.append(lambda s, r=ratio: lr_factor(s, warmup_steps, total_steps, r, decay, power))
    return LambdaLR(optimizer, lambdas)


class TwoStageSchedule(LRScheduler):
    """BitNet b1.58 two-stage schedule for LR and weight decay (see the module docstring).

    Stage 1 (``step < split * total_steps``): warm-up then cosine from the peak LR to
    ``stage2_lr``; stage 2: cosine from ``stage2_lr`` to ``min_lr`` and the weight decay of
    every group that had decay set to ``stage2_weight_decay``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        stage2_lr: float,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        split: float = 0.5,
        stage2_weight_decay: float = 0.0,
    ) -> None:
        _check(warmup_steps, total_steps, min_lr, "cosine", 1.0)
        if not 0.0 < split < 1.0:
            raise ValueError(f"scheduler.split={split} must be in (0, 1)")
        if stage2_lr <= 0:
            raise ValueError(f"scheduler.stage2_lr={stage2_lr} must be > 0")
        if stage2_weight_decay < 0:
            raise ValueError(f"scheduler.stage2_weight_decay={stage2_weight_decay} must be >= 0")
        self.total_steps = total_steps
        self.stage2_lr = stage2_lr
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.boundary = max(1, int(round(split * total_steps)))
        self.stage2_weight_decay = stage2_weight_decay
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        super().__init__(optimizer)

    def _value(self, peak: float, step: int) -> float:
        if step < self.boundary:
            low = min(self.stage2_lr, peak)
            return peak * lr_factor(step, self.warmup_steps, self.boundary, low / peak)
        low = min(self.min_lr, self.stage2_lr)
        f = lr_factor(
            step - self.boundary, 0, self.total_steps - self.boundary, low / self.stage2_lr
        )
        return self.stage2_lr * f

    def get_lr(self) -> list[float]:  # noqa: D102 - LRScheduler API
        step = self.last_epoch
        for group in self.optimizer.param_groups:
            wd0 = group["initial_weight_decay"]
            group["weight_decay"] = (
                wd0 if step < self.boundary or wd0 == 0 else self.stage2_weight_decay
            )
        return [self._value(g["initial_lr"], step) for g in self.optimizer.param_groups]


def total_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients (no host sync); 0 when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
