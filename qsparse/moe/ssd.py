"""SSD: switchable sparse-dense pre-training (Zhang et al., 2410.03440), as a Lightning callback.

Training alternates two phases on the same parameters:

- **dense**: the model as built. Every ``check_every`` steps the callback runs a fixed probe
  batch and records the *activation pattern* of every MLP, ``P = 1[act(W_gate x) > 0]``
  [tokens, F]. Two numbers come from it (our definitions: the paper's metric, threshold and
  phase lengths are not public)::

      sparsity  = 1 - mean(P)                                   (over layers, tokens, neurons)
      stability = mean_layers |P_t ∧ P_prev| / |P_t ∨ P_prev|   (Jaccard of consecutive checks)

  The phase switches to sparse once it has lasted ``min_dense_steps``, ``stability >=
  stability_threshold`` and ``sparsity >= min_activation_sparsity``, and enough steps remain
  for a sparse phase and the final dense one.
- **sparse**: every MLP becomes an MoE (:func:`qsparse.moe.moefy`: balanced k-means on the
  normalised gate rows, warm-started from the previous partition) routed by SSD's centroid
  router (:class:`~qsparse.moe.layer.CentroidRouter`), each token running its top
  ``k = max(1, round(expert_fraction · E))`` experts. Only those experts' weights get
  gradients. After ``sparse_steps`` the MoE merges back to dense (:func:`qsparse.moe.demoefy`:
  the weights never left the dense modules, so the merge is exact) and a dense phase starts.

The last ``final_dense_steps`` steps are dense. At every switch the callback logs ``ssd/phase``
(0 dense, 1 sparse), ``ssd/stability``, ``ssd/activation_sparsity``, ``ssd/kmeans_inertia`` and
the probe loss just before and after the switch (``ssd/switch_loss_before`` / ``_after``: the
loss continuity), and appends the event to ``<run_dir>/ssd.json``. Training FLOPs are counted
per phase (``ssd/flops_dense``, ``ssd/flops_sparse``, ``ssd/flops_vs_dense`` = total over an
all-dense run of the same tokens): per token ``6 N`` dense (:func:`qsparse.models.flops.
model_flops_per_token`), and in the sparse phase ``6 (1 - k/E)`` of the FFN weights fewer plus
the router's ``2 E d`` per layer (forward only: its vectors are computed from the weights).
At the end the final dense model is also evaluated as an MoE (same conversion, validation
batches): ``ssd/final_dense_loss`` and ``ssd/final_moe_loss``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..io import atomic_write_text
from ..methods.calibration import model_forward
from ..models.flops import model_flops_per_token
from .convert import MoEConfig, ffn_layers, moe_layers, moefy
from .convert import demoefy as merge_dense
from .layer import CentroidRouter


@torch.no_grad()
def activation_patterns(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder MLP the bool pattern ``act(W_gate x) > 0`` [tokens, F] on ``ids``."""
    pats: list[torch.Tensor] = []
    hooks = [
        mlp.act_fn.register_forward_hook(lambda m, a, out: pats.append((out > 0).flatten(0, -2)))
        for _, _, mlp in ffn_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        model_forward(model, ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pats


def pattern_stability(now: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """Mean over layers of the Jaccard index ``|A ∧ B| / |A ∨ B|`` (1 where both are empty)."""
    vals = []
    for a, b in zip(now, before, strict=True):
        union = float((a | b).sum())
        vals.append(1.0 if union == 0 else float((a & b).sum()) / union)
    return sum(vals) / len(vals)


def pattern_sparsity(pats: list[torch.Tensor]) -> float:
    """``1 - mean(P)`` over every layer, token and neuron."""
    return 1.0 - sum(float(p.float().mean()) for p in pats) / len(pats)


@torch.no_grad()
def probe_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on ``ids`` [B, T] (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        ids = ids.to(next(model.parameters()).device)
        logits = model_forward(model, ids).float()
        return float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
        )
    finally:
        model.train(was_training)


def to_moe(model: nn.Module, moe: MoEConfig, fraction: float, warm: dict | None = None) -> dict:
    """SSD's sparse form in place: centroid-routed top-k MoE; returns the k-means results."""
    results = moefy(model, moe, router=lambda mlp, e: CentroidRouter(), warm_start=warm,
                    persistent=False)  # fmt: skip
    for m in moe_layers(model).values():
        m.set_mode("topk", k=max(1, round(fraction * m.num_experts)))
    return results


class SwitchableSparseDense(Callback):
    """SSD phase switching (module docstring); every threshold and length is a setting."""

    def __init__(
        self,
        expert_size: int | None = 32,
        num_experts: int | None = None,
        expert_fraction: float = 0.25,
        check_every: int = 10,
        stability_threshold: float = 0.8,
        min_activation_sparsity: float = 0.4,
        min_dense_steps: int = 20,
        sparse_steps: int = 50,
        final_dense_steps: int = 20,
        probe_sequences: int = 4,
        kmeans_iterations: int = 20,
        evaluate_moe: bool = True,
    ) -> None:
        if not 0.0 < expert_fraction <= 1.0:
            raise ValueError(f"ssd: expert_fraction={expert_fraction} must be in (0, 1]")
        if not 0.0 <= stability_threshold <= 1.0 or not 0.0 <= min_activation_sparsity <= 1.0:
            raise ValueError("ssd: stability_threshold and min_activation_sparsity are in [0, 1]")
        for key, val in (("check_every", check_every), ("sparse_steps", sparse_steps)):
            if val < 1:
                raise ValueError(f"ssd: {key}={val} must be >= 1")
        if min_dense_steps < 0 or final_dense_steps < 0 or probe_sequences < 1:
            raise ValueError("ssd: min_dense_steps, final_dense_steps >= 0; probe_sequences >= 1")
        self.moe = MoEConfig(expert_size, num_experts, kmeans_iterations)
        self.expert_fraction = float(expert_fraction)
        self.check_every = int(check_every)
        self.stability_threshold = float(stability_threshold)
        self.min_activation_sparsity = float(min_activation_sparsity)
        self.min_dense_steps = int(min_dense_steps)
        self.sparse_steps = int(sparse_steps)
        self.final_dense_steps = int(final_dense_steps)
        self.probe_sequences = int(probe_sequences)
        self.evaluate_moe = evaluate_moe
        self.phase = "dense"
        self.phase_start = 0
        self.partitions: dict[str, torch.Tensor] | None = None
        self.events: list[dict[str, Any]] = []
        self.flops = {"dense": 0.0, "sparse": 0.0}
        self.final: dict[str, float] = {}
        self._probe: torch.Tensor | None = None
        self._prev: list[torch.Tensor] | None = None
        self._last = {"stability": float("nan"), "sparsity": float("nan")}
        self._dense_fpt = 0.0
        self._sparse_saving = 0.0

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "phase_start": self.phase_start,
            "partitions": self.partitions,
            "events": self.events,
            "flops": self.flops,
            "probe": self._probe,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.phase_start = state["phase"], state["phase_start"]
        self.partitions, self.events = state["partitions"], state["events"]
        self.flops, self._probe = state["flops"], state["probe"]

    # ---------------------------------------------------------------------- helpers
    def _model(self, pl_module: Any) -> nn.Module:
        return getattr(pl_module, "model", None) or pl_module

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        ffn = sum(
            sum(lin.weight.numel() for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            for _, _, mlp in ffn_layers(model)
        )
        d = ffn_layers(model)[0][2].gate_proj.in_features
        seq = int(getattr(getattr(trainer, "datamodule", None), "seq_len", 0) or 0) or None
        self._dense_fpt = float(model_flops_per_token(model, seq or 1))
        e = self.moe.experts_for(ffn_layers(model)[0][2].gate_proj.out_features, "ssd")
        k = max(1, round(self.expert_fraction * e))
        self._sparse_saving = 6.0 * (1.0 - k / e) * ffn - 2.0 * e * d * len(ffn_layers(model))
        if self.phase == "sparse":  # resumed inside a sparse phase
            to_moe(model, self.moe, self.expert_fraction, self.partitions)

    def _switch(self, trainer: Any, pl_module: Any, to: str, step: int) -> None:
        model = self._model(pl_module)
        before = probe_loss(model, self._probe)
        inertia = None
        if to == "sparse":
            results = to_moe(model, self.moe, self.expert_fraction, self.partitions)
            vals = [r.inertia for r in results.values() if r is not None]
            inertia = sum(vals) / len(vals) if vals else None
        else:
            self.partitions = merge_dense(model)
        after = probe_loss(model, self._probe)
        event = {
            "step": step,
            "to": to,
            # dense -> sparse on the measured pattern; sparse -> dense after sparse_steps
            "reason": "stable" if to == "sparse" else "phase length",
            "stability": self._last["stability"] if to == "sparse" else None,
            "activation_sparsity": self._last["sparsity"] if to == "sparse" else None,
            "kmeans_inertia": inertia,
            "loss_before": before,
            "loss_after": after,
        }
        self.events.append(event)
        self.phase, self.phase_start = to, step
        self._prev = None
        pl_module.log("ssd/phase", 1.0 if to == "sparse" else 0.0)
        pl_module.log("ssd/switch_loss_before", before)
        pl_module.log("ssd/switch_loss_after", after)
        if inertia is not None:
            pl_module.log("ssd/kmeans_inertia", inertia)
        rank_zero_info(f"ssd: step {step} -> {to} {json.dumps(event)}")
        self._write(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        step = int(trainer.global_step)
        if self._probe is None:
            self._probe = batch["input_ids"][: self.probe_sequences].detach().cpu().clone()
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None
        left = None if total is None else total - step
        model = self._model(pl_module)
        if self.phase == "sparse":
            over = step - self.phase_start >= self.sparse_steps
            if over or (left is not None and left <= self.final_dense_steps):
                self._switch(trainer, pl_module, "dense", step)
        elif step % self.check_every == 0:
            pats = activation_patterns(model, self._probe)
            self._last["sparsity"] = pattern_sparsity(pats)
            if self._prev is not None:
                self._last["stability"] = pattern_stability(pats, self._prev)
                pl_module.log("ssd/stability", self._last["stability"])
            pl_module.log("ssd/activation_sparsity", self._last["sparsity"])
            self._prev = pats
            room = left is None or left > self.sparse_steps + self.final_dense_steps
            if (
                room
                and step - self.phase_start >= self.min_dense_steps
                and self._last["stability"] >= self.stability_threshold
                and self._last["sparsity"] >= self.min_activation_sparsity
            ):
                self._switch(trainer, pl_module, "sparse", step)
        tokens = int(batch["input_ids"].numel())
        saving = self._sparse_saving if self.phase == "sparse" else 0.0
        self.flops[self.phase] += tokens * (self._dense_fpt - saving)
        self._dense_tokens = getattr(self, "_dense_tokens", 0) + tokens
        pl_module.log("ssd/flops_dense", self.flops["dense"])
        pl_module.log("ssd/flops_sparse", self.flops["sparse"])
        pl_module.log("ssd/flops_vs_dense", self.flops_vs_dense())

    def flops_vs_dense(self) -> float:
        """Training FLOPs so far over those of an all-dense run on the same tokens."""
        done = self.flops["dense"] + self.flops["sparse"]
        dense = getattr(self, "_dense_tokens", 0) * self._dense_fpt
        return done / dense if dense else 1.0

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        if self.phase == "sparse":
            self.partitions = merge_dense(model)
            self.phase = "dense"
        if self.evaluate_moe and trainer.is_global_zero:
            batches = _val_batches(trainer)
            if batches:
                dense = sum(probe_loss(model, b) for b in batches) / len(batches)
                to_moe(model, self.moe, self.expert_fraction, self.partitions)
                moe = sum(probe_loss(model, b) for b in batches) / len(batches)
                merge_dense(model)
                self.final = {"final_dense_loss": dense, "final_moe_loss": moe}
                for logger in trainer.loggers:
                    logger.log_metrics(
                        {f"ssd/{k}": v for k, v in self.final.items()}, step=trainer.global_step
                    )
                rank_zero_info(f"ssd: final model dense loss {dense:.4f}, as MoE {moe:.4f}")
        self._write(trainer)

    def _write(self, trainer: Any) -> None:
        if not trainer.is_global_zero or not trainer.default_root_dir:
            return
        out = {
            "settings": {
                **self.moe.to_dict(),
                "expert_fraction": self.expert_fraction,
                "check_every": self.check_every,
                "stability_threshold": self.stability_threshold,
                "min_activation_sparsity": self.min_activation_sparsity,
                "min_dense_steps": self.min_dense_steps,
                "sparse_steps": self.sparse_steps,
                "final_dense_steps": self.final_dense_steps,
            },
            "events": self.events,
            "flops": {**self.flops, "vs_dense": self.flops_vs_dense()},
            **self.final,
        }
        atomic_write_text(Path(trainer.default_root_dir) / "ssd.json", json.dumps(out, indent=2))


def _val_batches(trainer: Any, limit: int = 8) -> list[torch.Tensor]:
    dm = getattr(trainer, "datamodule", None)
    if dm is None:
        return []
    loaders = dm.val_dataloader()
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    out = []
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        out.append(batch["input_ids"])
    return out
