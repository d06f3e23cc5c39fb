"""The MoE form of a GLU feed-forward: its neurons grouped into experts, a router, a rule.

A GLU FFN ``FFN(x) = W_down (act(W_gate x) ⊙ W_up x)`` with ``F`` neurons is exactly a sum
of ``E`` experts when its neurons are partitioned into groups ``I_e`` of ``m = F / E``::

    FFN(x) = Σ_e W_down[:, I_e] (act(W_gate[I_e] x) ⊙ W_up[I_e] x)

:class:`MoEFeedForward` keeps the original ``gate_proj`` / ``up_proj`` / ``down_proj`` /
``act_fn`` modules (same Parameter objects, same state-dict names) and only adds the partition
(``experts`` [E, m] neuron indices), a router and a selection rule. A token runs expert ``e``
iff ``mask[e] = 1``::

    mode "all"   every expert (the dense FFN, bit for bit)
    mode "topk"  the k experts of largest router score (ties: lower index)
    mode "dynk"  D2DMoE's dynamic-k: r̂_e >= (1 - τ) · max_j r̂_j

The forward computes the masked sum as ``W_down (h ⊙ mask[expert_of_neuron])``: the same
numbers an expert-by-expert execution gives (:meth:`MoEFeedForward.expert_forward`, the
reference it is tested against), with gradients reaching only the experts a token ran. The
saving is counted, not realised, on this path: :mod:`qsparse.moe.cost` counts it and
``benchmarks/expert_gemv.py`` measures the expert-block kernel.

``routing`` is an :class:`~qsparse.nn.ActivationSparsifier` (pattern ``none``) that the mask
passes through: while :func:`qsparse.stats.track_sparsity` is on it counts the experts not run
(site ``layers.N.mlp``), and it is the ``row_gate`` of ``gate_proj`` and ``up_proj``, so
:func:`qsparse.stats.activated_parameters` counts their skipped rows; ``down_proj``'s own site
counts the zeros of its input (skipped experts and the activation's own zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ActivationSparsifier

MODES = ("all", "topk", "dynk")


def dynamic_k_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """D2DMoE's rule: ``mask[..., e] = 1[r̂_e >= (1 - τ) max_j r̂_j]`` (float 0/1, shape of
    ``scores`` [..., E]). τ = 0 runs the top-scoring expert(s) only, τ = 1 every expert with a
    non-negative score (all of them for the abs-output router)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau} must be in [0, 1]")
    top = scores.max(dim=-1, keepdim=True).values
    return (scores >= (1.0 - tau) * top).to(scores.dtype)


def topk_expert_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Float 0/1 mask [..., E] of the ``k`` largest scores per token."""
    e = scores.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"top-k experts needs 1 <= k <= {e}, got k={k}")
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


class RegressionRouter(nn.Module):
    """D2DMoE's router ``r̂(x) = |W₂ ReLU(W₁ x + b₁) + b₂|``: [..., d] -> [..., E], a
    prediction of each expert's output L2 norm (trained by :func:`qsparse.moe.routers.train_routers`)."""

    def __init__(self, hidden_size: int, num_experts: int, width: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))).abs()


def centroid_vectors(gate_weight: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """SSD/MoEfication router vectors [E, d]: per expert the mean of its L2-normalised gate
    rows, normalised, times the expert's mean row norm (the scale does not change a top-k)."""
    w = gate_weight.detach().float()
    rows = F.normalize(w, dim=-1)[experts]  # [E, m, d]
    centre = F.normalize(rows.mean(dim=1), dim=-1)
    return centre * w.norm(dim=-1)[experts].mean(dim=1, keepdim=True)


class CentroidRouter(nn.Module):
    """``scores = x · c_eᵀ`` with ``c_e`` = :func:`centroid_vectors` of the owning layer's
    current ``gate_proj`` weight (recomputed per call, detached: no parameters, follows the
    weights while they train). ``moe`` is set by :class:`MoEFeedForward`."""

    def forward(self, x: torch.Tensor, moe: MoEFeedForward) -> torch.Tensor:
        c = centroid_vectors(moe.gate_proj.weight, moe.experts).to(x.dtype)
        return x @ c.t()


class MoEFeedForward(nn.Module):
    """A GLU MLP run as a mixture of experts (module docstring).

    Args:
        mlp: the dense module (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``); its
            children are shared, and :meth:`dense` returns it.
        experts: LongTensor[E, m], a partition of ``range(F)``.
        router: :class:`RegressionRouter`, :class:`CentroidRouter` or ``None`` (mode ``all``).
        persistent: keep ``experts`` in the state dict (a saved MoE model) or not (SSD's
            temporary sparse phases: the state dict keeps the dense names only).
    """

    def __init__(
        self,
        mlp: nn.Module,
        experts: torch.Tensor,
        router: nn.Module | None = None,
        mode: str = "all",
        k: int | None = None,
        tau: float | None = None,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.__dict__["_dense"] = mlp  # not a submodule: its children are ours already
        n = self.gate_proj.out_features
        experts = experts.to(device=self.gate_proj.weight.device, dtype=torch.long).clone()
        if experts.dim() != 2 or experts.numel() != n:
            raise ValueError(f"experts must be [E, m] with E * m = {n} neurons")
        if not torch.equal(experts.flatten().sort().values, torch.arange(n, device=experts.device)):
            raise ValueError("experts must list every neuron exactly once")
        self.register_buffer("experts", experts, persistent=persistent)
        expert_of = torch.empty(n, dtype=torch.long, device=experts.device)
        expert_of[experts.flatten()] = torch.arange(
            experts.shape[0], device=experts.device
        ).repeat_interleave(experts.shape[1])
        self.register_buffer("expert_of_neuron", expert_of, persistent=False)
        self.router = router
        self.routing = ActivationSparsifier(experts.shape[0], pattern="none")
        self.routing.to(device=experts.device)
        for linear in (self.gate_proj, self.up_proj):
            linear.__dict__["row_gate"] = self.routing  # skipped rows (qsparse.stats)
        self.mode, self.k, self.tau = "all", k, tau
        self.set_mode(mode, k=k, tau=tau)
        #: when a list, every forward appends (input, dense intermediate h) for router training
        self.capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.experts.shape[0])

    @property
    def expert_size(self) -> int:
        return int(self.experts.shape[1])

    def dense(self) -> nn.Module:
        """The original dense MLP (sharing this module's projections)."""
        return self._dense

    def set_mode(self, mode: str, k: int | None = None, tau: float | None = None) -> None:
        """Select the rule (``all`` / ``topk`` with ``k`` / ``dynk`` with ``tau``)."""
        if mode not in MODES:
            raise ValueError(f"moe mode={mode!r} must be one of {MODES}")
        if mode != "all" and self.router is None:
            raise ValueError(f"moe mode={mode!r} needs a router")
        if mode == "topk":
            topk_expert_mask(torch.zeros(self.num_experts), int(k or 0))  # validates k
        if mode == "dynk":
            dynamic_k_mask(torch.zeros(1), float(-1 if tau is None else tau))  # validates
        self.mode, self.k, self.tau = mode, k, tau

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores [..., E] for the FFN input ``x`` [..., d]."""
        if isinstance(self.router, CentroidRouter):
            return self.router(x, self)
        assert self.router is not None
        return self.router(x)

    def expert_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Float 0/1 [..., E]: the experts each token runs under the current mode."""
        if self.mode == "all":
            return torch.ones(*x.shape[:-1], self.num_experts, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            scores = self.scores(x).float()
        if self.mode == "topk":
            mask = topk_expert_mask(scores, int(self.k))
        else:
            mask = dynamic_k_mask(scores, float(self.tau))
        return mask.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., d]."""
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if self.capture is not None:
            self.capture.append((x.detach(), h.detach()))
        if self.mode != "all" or self.routing.track_stats:
            mask = self.routing(self.expert_mask(x))
            if self.mode != "all":
                h = h * mask.index_select(-1, self.expert_of_neuron)
        return self.down_proj(h)

    def expert_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """Each expert's output [..., E, d] from the dense intermediate ``h`` [..., F]:
        ``W_down[:, I_e] h[I_e]`` (the router's regression target is its L2 norm)."""
        w = self.down_proj.weight[:, self.experts]  # [d, E, m]
        return torch.einsum("...em,dem->...ed", h[..., self.experts], w.to(h.dtype))

    def expert_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reference: run the experts one by one on contiguous weight blocks and sum the
        outputs of those ``mask`` [..., E] selects (default: the current mode's mask)."""
        mask = self.expert_mask(x) if mask is None else mask
        out = torch.zeros(*x.shape[:-1], self.down_proj.out_features, dtype=x.dtype)
        out = out.to(x.device)
        for e in range(self.num_experts):
            idx = self.experts[e]
            g = x @ self.gate_proj.weight[idx].t()
            u = x @ self.up_proj.weight[idx].t()
            y = (self.act_fn(g) * u) @ self.down_proj.weight[:, idx].t()
            out = out + mask[..., e : e + 1] * y
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():  # a loaded partition: rebuild the neuron -> expert table
            e, m = self.experts.shape
            ids = torch.arange(e, device=self.experts.device).repeat_interleave(m)
            self.expert_of_neuron[self.experts.flatten()] = ids

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}x{self.expert_size}, mode={self.mode}, "
            f"k={self.k}, tau={self.tau}"
        )
