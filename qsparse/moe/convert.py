"""MoEfication: turn every decoder MLP of a model into a :class:`MoEFeedForward` and back.

Works on what :func:`qsparse.sparsify` supports (transformers Llama / Mistral / Qwen2 and the
qsparse Llama): each ``layers.N.mlp`` is replaced by an MoE module that shares its
``gate_proj`` / ``up_proj`` / ``down_proj`` / ``act_fn`` (the Parameter objects, so optimizer
state, checkpoints and ``state_dict`` names survive), with experts from
:func:`qsparse.moe.kmeans.balanced_kmeans` on the L2-normalised rows of ``gate_proj.weight``
(a neuron's row of ``gate_proj`` / ``up_proj`` and its column of ``down_proj`` go to the
same expert). :func:`demoefy` puts the dense modules back (SSD's merge: the weights never
left them, so merging is exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import _install_shared_input
from ..nn.sites import decoder_layers
from .kmeans import KMeansResult, balanced_kmeans, labels_from_partition, partition_from_labels
from .layer import MoEFeedForward


@dataclass
class MoEConfig:
    """How to split each FFN: give ``expert_size`` (neurons per expert, D2DMoE/MoEfication
    use small ones, e.g. 32) or ``num_experts``; exactly one. ``kmeans_iterations``: Lloyd
    iterations of the balanced k-means; ``seed`` its random start."""

    expert_size: int | None = 32
    num_experts: int | None = None
    kmeans_iterations: int = 30
    seed: int = 0

    def experts_for(self, neurons: int, where: str = "moe") -> int:
        """E for an FFN of ``neurons``; ValueError naming the setting when it cannot split."""
        if (self.expert_size is None) == (self.num_experts is None):
            raise ValueError(f"{where}: set exactly one of expert_size and num_experts")
        if self.num_experts is not None:
            e = int(self.num_experts)
            if e < 1 or neurons % e:
                raise ValueError(
                    f"{where}: num_experts={e} does not divide the FFN width {neurons}; "
                    "pick a divisor"
                )
            return e
        m = int(self.expert_size)
        if m < 1 or neurons % m:
            raise ValueError(
                f"{where}: expert_size={m} does not divide the FFN width {neurons}; pick a divisor"
            )
        return neurons // m

    def to_dict(self) -> dict:
        return asdict(self)


def ffn_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name of the MLP, its parent decoder layer, the MLP) for every decoder layer."""
    out = []
    for prefix, _, mlp in decoder_layers(model):
        parent = model.get_submodule(prefix) if prefix else model
        out.append((f"{prefix}.mlp" if prefix else "mlp", parent, mlp))
    return out


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    """Name -> every :class:`MoEFeedForward` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}


def cluster_ffn(
    mlp: nn.Module, config: MoEConfig, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, KMeansResult]:
    """The partition [E, m] of one MLP's neurons (balanced k-means on its normalised gate rows;
    ``init``: a previous partition [E, m] to warm-start from) and the k-means result."""
    w = mlp.gate_proj.weight.detach().float()
    e = config.experts_for(w.shape[0])
    init_labels = labels_from_partition(init.cpu()) if init is not None else None
    result = balanced_kmeans(
        F.normalize(w, dim=-1), e, config.kmeans_iterations, init_labels, config.seed
    )
    return partition_from_labels(result.labels, e), result


def moefy(
    model: nn.Module,
    config: MoEConfig,
    router: Callable[[nn.Module, int], nn.Module | None] | None = None,
    partitions: dict[str, torch.Tensor] | None = None,
    warm_start: dict[str, torch.Tensor] | None = None,
    persistent: bool = True,
) -> dict[str, KMeansResult | None]:
    """Replace every decoder MLP by a :class:`MoEFeedForward` in place (mode ``all``).

    Args:
        router: ``f(mlp, num_experts) -> router module`` per layer (``None``: no router).
        partitions: MLP name -> a given partition [E, m] (no clustering; e.g. on load).
        warm_start: MLP name -> previous partition to start the k-means from (SSD).
        persistent: save the partition in the state dict.

    Returns:
        MLP name -> the k-means result (``None`` where the partition was given). An MLP that
        already is an MoE is re-partitioned from its dense form.
    """
    layers = ffn_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Llama-style decoder MLPs to split")
    for name, _, mlp in layers:  # validate every layer before touching the model
        base = mlp.dense() if isinstance(mlp, MoEFeedForward) else mlp
        config.experts_for(base.gate_proj.out_features, f"moe ({name})")
    results: dict[str, KMeansResult | None] = {}
    for name, parent, mlp in layers:
        base = mlp.dense() if isinstance(mlp, MoEFeedForward) else mlp
        if partitions is not None and name in partitions:
            experts, results[name] = partitions[name], None
        else:
            experts, results[name] = cluster_ffn(base, config, (warm_start or {}).get(name))
        r = router(base, experts.shape[0]) if router is not None else None
        if r is not None:
            ref = base.gate_proj.weight
            r = r.to(device=ref.device, dtype=ref.dtype)
        moe = MoEFeedForward(base, experts, r, persistent=persistent)
        shared = getattr(base, "qsparse_input", None)
        if shared is not None:  # the gate/up site of qsparse.sparsify moves along
            _install_shared_input(moe, shared)
        parent.mlp = moe
    return results


def demoefy(model: nn.Module) -> dict[str, torch.Tensor]:
    """Put every MLP's dense module back; returns MLP name -> the partition it had (for a
    warm-started re-clustering). The row gates the MoE set are removed."""
    out = {}
    for name, parent, mlp in ffn_layers(model):
        if isinstance(mlp, MoEFeedForward):
            out[name] = mlp.experts.detach().clone()
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.__dict__.pop("row_gate", None)
            parent.mlp = mlp.dense()
    return out
