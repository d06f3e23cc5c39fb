"""Q-Sparse top-k as a method (Wang et al., 2407.10969, Eq. 1-3).

``Y = (X ⊙ M) Wᵀ``, ``M = Topk(|X|)``: per token keep the ``k = int((1 - S) d)`` largest
``|x|`` of every projection input (shared q/k/v input, o input, shared gate/up input, down
input). Applied to a dense model without training this is the "training-free Q-Sparse" row of
``qsparse-compare``; the continued-training recipes (``recipe=continue/...``) train it.
Nothing is calibrated: ``apply`` is :func:`qsparse.sparsify`. In training
(``qsparse-train method=qsparse method.sparsity=0.6``) it is the same as ``sparsity=topk
sparsity.ratio=0.6``: the run's conversion uses this method's top-k settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..convert import sparsify
from ..nn import SparsityConfig
from .base import MethodConfigError, MethodResult, SparsityMethod, register


@register
class QSparse(SparsityMethod):
    """Top-k activation sparsity at ratio ``sparsity`` (``pattern``: ``token_topk`` or
    ``block_topk`` with ``block_size``)."""

    name = "qsparse"

    def __init__(
        self, sparsity: float = 0.5, pattern: str = "token_topk", block_size: int = 32
    ) -> None:
        super().__init__(sparsity)
        self.config = SparsityConfig(ratio=self.sparsity, pattern=pattern, block_size=block_size)

    def _apply(
        self, model: nn.Module, tokenizer: Any, batches: list[torch.Tensor] | None
    ) -> MethodResult:
        report = sparsify(model, sparsity=self.config)
        self.record(model, {"name": self.name, "sparsity": self.sparsity})
        return MethodResult(
            self.name,
            self.sparsity,
            site_sparsity={name: site["ratio"] for name, site in report.sites.items()},
        )

    def training_conversion(
        self, sparsity: SparsityConfig, activation: str
    ) -> tuple[SparsityConfig, str]:
        """Train with this method's top-k; the run's ``sparsity=`` group must be off or equal."""
        if sparsity.enabled and sparsity.to_dict() != self.config.to_dict():
            raise MethodConfigError(
                "config error: method=qsparse sets the top-k sparsity itself "
                f"(method.sparsity={self.sparsity:g}) but sparsity.ratio={sparsity.ratio:g} "
                f"(pattern {sparsity.pattern}) is set too: use sparsity=none, or drop method="
            )
        return self.config, activation
