"""Self-distillation from the frozen dense model during continued training and fine-tuning.

A sparsified student :math:`s` is trained to match the original dense weights, the teacher
:math:`t` (same spec, loaded again, no sparsify, no gradients). Per step the loss is

.. math::

    L = w_{lm} \\cdot CE(z_s, y) + w_{kl} \\cdot T^2 \\cdot KL(p_t \\| p_s)
        + w_{h} \\cdot \\frac{1}{|\\mathcal{L}|} \\sum_{l \\in \\mathcal{L}}
          \\frac{\\| h^l_s - h^l_t \\|^2}{\\| h^l_t \\|^2}

with :math:`p = softmax(z / T)` over the vocabulary, the KL averaged over the positions that
predict a target (shifted labels ``!= -100``: response tokens in SFT, every token in
pretraining), and :math:`h^l` the output of decoder layer ``l`` (all positions; the ratio of
sums over the batch, so every layer counts the same whatever its scale). The :math:`T^2`
factor keeps the gradient scale of the KL term independent of the temperature (Hinton et al.,
2015). ``w_lm = 1, w_kl = w_h = 0`` is the paper's LM-loss-only recipe.

Teacher memory: its weights in ``teacher_dtype`` (bf16: 2 bytes per parameter; SmolLM2-135M
0.27 GB, 1.3B 2.6 GB, 7B 13.5 GB per GPU, replicated under DDP and FSDP, never sharded or
checkpointed) plus one forward's activations without autograd state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import dtype_names, torch_dtype
from ..models.builder import build_model
from ..models.checkpointing import decoder_layer_list

DISTILL_MODES = ("none", "logits", "logits+hidden")
TEACHER_DTYPES = ("auto", *dtype_names())


@dataclass
class DistillConfig:
    """Settings of the ``distill=`` config group.

    Args:
        mode: ``"none"`` (LM loss only), ``"logits"`` (KL on the logits) or
            ``"logits+hidden"`` (plus the per-layer hidden-state loss).
        temperature: T of the softened distributions, > 0.
        lm_weight: weight of the next-token cross-entropy on the data, >= 0.
        kl_weight: weight of ``T^2 KL(teacher || student)``, >= 0.
        hidden_weight: weight of the normalised hidden-state loss (``logits+hidden``), >= 0.
        teacher_dtype: teacher weights: ``"bfloat16"``, ``"float32"`` or ``"auto"`` (bf16 on
            CUDA, fp32 on the CPU).
    """

    mode: str = "none"
    temperature: float = 1.0
    lm_weight: float = 1.0
    kl_weight: float = 0.0
    hidden_weight: float = 0.0
    teacher_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def hidden(self) -> bool:
        return self.mode == "logits+hidden"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending ``distill.*`` field."""
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"distill.mode={self.mode!r} must be one of {DISTILL_MODES}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"distill.teacher_dtype={self.teacher_dtype!r} must be one of {TEACHER_DTYPES}"
            )
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"distill.temperature={self.temperature!r} must be > 0")
        for name in ("lm_weight", "kl_weight", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"distill.{name}={value!r} must be a number >= 0")
        if self.enabled and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError(
                f"distill.mode={self.mode!r} with kl_weight=0 and hidden_weight=0 trains on "
                "the LM loss only: set distill=none, or give distill.kl_weight > 0"
            )
        if self.hidden_weight > 0 and not self.hidden:
            raise ValueError(
                f"distill.hidden_weight={self.hidden_weight} needs distill.mode="
                "'logits+hidden' (distill=logits_hidden)"
            )
        if not self.enabled and (self.kl_weight or self.hidden_weight):
            raise ValueError(
                "distill.kl_weight / hidden_weight are set but distill.mode='none': "
                "choose distill=logits or distill=logits_hidden"
            )
        if self.lm_weight == 0 and not self.enabled:
            raise ValueError("distill.lm_weight=0 with distill.mode='none' leaves no loss")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DistillConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"distill: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def kl_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))`` over predicting positions.

    Args:
        student_logits, teacher_logits: [B, T, V] (any float dtype; computed in fp32).
        labels: [B, T] unshifted labels; position ``i`` counts when ``labels[:, i+1] !=
            -100`` (it predicts a target). ``None`` = every position but the last.
        temperature: T > 0.

    Returns:
        Scalar fp32 loss (0 when no position counts).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher must share the vocabulary"
        )
    if labels is None:
        keep = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
        keep[:, -1] = False
    else:
        keep = F.pad(labels, (0, 1), value=-100)[:, 1:] != -100
    s = student_logits[keep].float() / temperature
    t = teacher_logits[keep].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2


def hidden_distill_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``mean_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2`` over layers (sums over all positions)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            f"hidden-state distillation needs the same number of decoder layers in student "
            f"and teacher, got {len(student_hidden)} and {len(teacher_hidden)}"
        )
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        hs, ht = hs.float(), ht.float()
        terms.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class LayerOutputs:
    """Forward hooks that collect every decoder layer's output ([B, T, d]) of one forward.

    Works for qsparse's Llama and for transformers' Llama/Mistral/Qwen2 (whose layers may
    return a tuple; its first element is the hidden state).
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def take(self) -> list[torch.Tensor]:
        """The outputs collected since the last call (and forget them)."""
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Teacher:
    """The frozen dense teacher of a distilling run and the loss of a step against it.

    Held by :class:`~qsparse.training.LMModule` as a plain attribute, not a submodule, so the
    teacher stays out of the state dict, the optimizer, FSDP wrapping and checkpoints.
    """

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module | None = None
        self._hooks: tuple[LayerOutputs, LayerOutputs] | None = None

    def build(
        self, spec: Mapping[str, Any], student: nn.Module | None, device: torch.device
    ) -> nn.Module:
        """The dense model of ``spec``, frozen, in eval mode, on ``device``, in
        ``cfg.teacher_dtype`` (``auto``: bf16 on CUDA, fp32 elsewhere); built once. With
        hidden-state distillation, hooks on the layers of ``student`` and teacher."""
        if self.model is not None:
            return self.model
        teacher = build_model(spec)
        dtype = self.cfg.teacher_dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        teacher.to(device=device, dtype=torch_dtype(dtype, "distill.teacher_dtype"))
        teacher.eval().requires_grad_(False)
        self.model = teacher
        if self.cfg.hidden:
            assert student is not None
            self._hooks = (
                LayerOutputs(decoder_layer_list(student)),
                LayerOutputs(decoder_layer_list(teacher)),
            )
        return teacher

    def loss(
        self, student: Callable[[], Any], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L, parts)`` of one batch (module docstring): ``student()`` runs the student's
        forward (with labels: ``.loss`` is the LM loss, ``.logits`` [B, T, V]), the teacher
        runs without gradients; ``parts`` are the detached terms to log by metric name."""
        assert self.model is not None, "Teacher.build runs before Teacher.loss"
        cfg = self.cfg
        if self._hooks is not None:
            for h in self._hooks:
                h.take()  # drop outputs of recomputed (checkpointed) layers
        out = student()
        with torch.no_grad():
            kwargs = {"input_ids": batch["input_ids"]}
            if batch.get("attention_mask") is not None:
                kwargs["attention_mask"] = batch["attention_mask"]
            t_logits = self.model(**kwargs).logits
        lm = out.loss
        kl = kl_distill_loss(out.logits, t_logits, batch["labels"], cfg.temperature)
        loss = cfg.lm_weight * lm + cfg.kl_weight * kl
        parts = {"train/lm_loss": lm.detach().float(), "train/kl": kl.detach()}
        if self._hooks is not None:
            hidden = hidden_distill_loss(self._hooks[0].take(), self._hooks[1].take())
            loss = loss + cfg.hidden_weight * hidden
            parts["train/hidden_loss"] = hidden.detach()
        return loss, parts
