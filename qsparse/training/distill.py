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

Teacher logits from disk (``distill.teacher_logits=PATH``,
:class:`~qsparse.training.teacher_store.StoredTeacher`): the teacher's top-K logits of every
training sample, written beforehand by ``qsparse-teacher-logits``, replace the teacher
model, which is then never loaded (for 7B: the 13.5 GB of bf16 weights and the teacher's
forward activations per GPU are saved; the cost is ``K * (2 + 4) + 4`` bytes of disk per
token, 388 bytes at K = 64). The KL is then taken over the K kept tokens plus one bucket for
the rest of the mass (:func:`sparse_kl_distill_loss`).

Another teacher (``distill.teacher_path=FOLDER``): a transformers checkpoint folder, e.g. the
``hf/`` export of a dense fine-tuning run, is loaded as the frozen teacher instead of the
run's own base weights (``null``, the default). It must share the student's vocabulary; a
folder exported with qsparse settings is loaded with them (a sparse teacher).
:func:`check_teacher_path` checks the folder before a run writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import dtype_names, torch_dtype
from ..errors import UserError
from ..models.builder import build_model
from ..models.checkpointing import decoder_layer_list

DISTILL_MODES = ("none", "logits", "logits+hidden")
TEACHER_DTYPES = ("auto", *dtype_names())
_HF_MODEL = "qsparse.models.pretrained.hf_model"


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
        teacher_logits: a folder written by ``qsparse-teacher-logits``: read the teacher's
            top-K logits from it instead of running the teacher (``None``: run it).
        teacher_top_k: K, the logits kept per position by ``qsparse-teacher-logits`` (and
            expected in ``teacher_logits``), >= 1.
        teacher_path: a transformers checkpoint folder loaded as the teacher (e.g. a dense
            fine-tuned export ``RUN/hf``); ``None``: the run's own ``model`` spec.
    """

    mode: str = "none"
    temperature: float = 1.0
    lm_weight: float = 1.0
    kl_weight: float = 0.0
    hidden_weight: float = 0.0
    teacher_dtype: str = "auto"
    teacher_logits: str | None = None
    teacher_top_k: int = 64
    teacher_path: str | None = None

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
        k = self.teacher_top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"distill.teacher_top_k={k!r} must be an int >= 1")
        if self.teacher_path is not None and not self.enabled:
            raise ValueError(
                "distill.teacher_path is set but distill.mode='none': choose a distilling "
                "preset (e.g. distill=lm_logits) or drop distill.teacher_path"
            )
        if self.teacher_logits is not None and self.mode != "logits":
            raise ValueError(
                f"distill.teacher_logits is set but distill.mode={self.mode!r}: stored logits "
                "serve distill=logits / lm_logits only (use distill=logits_from_disk), the "
                "hidden-state loss needs the live teacher"
            )

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


class TeacherPathError(UserError):
    """``distill.teacher_path`` names no usable checkpoint folder for this run."""


def teacher_spec(spec: Mapping[str, Any], teacher_path: str | None) -> dict[str, Any]:
    """The model spec the teacher is built from: ``spec`` itself without ``teacher_path``,
    else :func:`qsparse.models.pretrained.hf_model` on that folder (the student's
    ``model_class`` / ``attn_implementation`` when it is an ``hf_model`` spec too; no
    tokenizer needed, no gradient checkpointing)."""
    if teacher_path is None:
        return dict(spec)
    base = dict(spec) if spec.get("_target_") == _HF_MODEL else {}
    return {
        "_target_": _HF_MODEL,
        "path": str(teacher_path),
        "model_class": base.get("model_class", "transformers"),
        "attn_implementation": base.get("attn_implementation", "sdpa"),
        "require_tokenizer": False,
    }


def check_teacher_path(container: Mapping[str, Any]) -> None:
    """Before a run writes anything: ``distill.teacher_path`` (when set) is a loadable
    checkpoint folder with the vocabulary of the student's ``model.path`` (when that is a
    folder too). Raises :class:`TeacherPathError` naming the setting and the fix."""
    from ..models.hf import CheckpointError, check_hf_checkpoint

    path = (container.get("distill") or {}).get("teacher_path")
    if path is None:
        return
    fix = "give a transformers folder, e.g. the hf/ export of a dense fine-tuning run, or null"
    try:
        teacher = check_hf_checkpoint(path)
    except CheckpointError as exc:
        raise TeacherPathError(f"distill.teacher_path={path}: {exc}; {fix}") from None
    student_path = (container.get("model") or {}).get("path")
    if student_path is None or not (Path(student_path) / "config.json").is_file():
        return
    student = json.loads((Path(student_path) / "config.json").read_text())
    if teacher.get("vocab_size") != student.get("vocab_size"):
        raise TeacherPathError(
            f"distill.teacher_path={path} has vocab_size {teacher.get('vocab_size')}, the "
            f"student model.path={student_path} {student.get('vocab_size')}: the teacher "
            f"must share the student's vocabulary; {fix}"
        )


def _predicting(
    labels: torch.Tensor | None, shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """Bool [B, T]: position ``i`` predicts a target (``labels[:, i+1] != -100``; ``labels``
    ``None``: every position but the last)."""
    if labels is None:
        keep = torch.ones(shape[:2], dtype=torch.bool, device=device)
        keep[:, -1] = False
        return keep
    return F.pad(labels, (0, 1), value=-100)[:, 1:] != -100


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
    keep = _predicting(labels, student_logits.shape, student_logits.device)
    s = student_logits[keep].float() / temperature
    t = teacher_logits[keep].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2


def sparse_kl_distill_loss(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`kl_distill_loss` against a teacher known by its top-K logits only.

    Per predicting position with kept set :math:`S` (the K teacher indices), stored teacher
    logits :math:`v_k` (any constant shift) and :math:`\\ell = \\log\\sum_{u \\in V}
    e^{v_u/T}` (over the full vocabulary, same shift):

    .. math::

        p_k = e^{v_k/T - \\ell}\\ (k \\in S), \\quad p_r = \\max(0, 1 - \\textstyle\\sum_S p_k),
        \\quad \\log q_k = s_k/T - \\log\\sum_{u \\in V} e^{s_u/T},
        \\quad \\log q_r = \\log\\sum_{u \\notin S} e^{s_u/T} - \\log\\sum_{u \\in V} e^{s_u/T}

        KL = \\sum_{k \\in S} p_k (\\log p_k - \\log q_k) + p_r (\\log p_r - \\log q_r)

    i.e. the KL between teacher and student after merging the tokens outside :math:`S` into
    one bucket: never above the full KL (data-processing inequality), equal to it when
    K = V. The loss is ``T^2 * mean`` over predicting positions, as in
    :func:`kl_distill_loss`.

    Args:
        student_logits: [B, T, V] (computed in fp32).
        values: [B, T, K] teacher logits of the kept tokens (fp16 on disk).
        indices: [B, T, K] their token ids (distinct within a position).
        lse: [B, T] log-sum-exp of the teacher's logits / T over the full vocabulary.
        labels, temperature: as in :func:`kl_distill_loss`.
    """
    if values.shape != indices.shape or values.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"stored teacher top-K {tuple(values.shape)} / {tuple(indices.shape)} does not "
            f"match the student logits {tuple(student_logits.shape)}"
        )
    keep = _predicting(labels, student_logits.shape, student_logits.device)
    s = student_logits[keep].float() / temperature  # [N, V]
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    idx = indices[keep].long()
    log_pt = values[keep].float() / temperature - lse[keep].float().unsqueeze(-1)  # [N, K]
    pt = log_pt.exp()
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    log_qs = s.gather(-1, idx) - lse_s
    kl = (pt * (log_pt - log_qs)).sum(-1)
    if idx.shape[-1] < s.shape[-1]:  # the rest of the vocabulary, one bucket
        p_rest = (1.0 - pt.sum(-1)).clamp_min(0.0)
        rest = s.scatter(-1, idx, float("-inf"))
        log_q_rest = torch.logsumexp(rest, dim=-1) - lse_s.squeeze(-1)
        kl = kl + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
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
        """The dense model of ``spec`` (or of the folder ``cfg.teacher_path``:
        :func:`teacher_spec`), frozen, in eval mode, on ``device``, in
        ``cfg.teacher_dtype`` (``auto``: bf16 on CUDA, fp32 elsewhere); built once. With
        hidden-state distillation, hooks on the layers of ``student`` and teacher."""
        if self.model is not None:
            return self.model
        teacher = build_model(teacher_spec(spec, self.cfg.teacher_path))
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
        cfg = self.cfg
        if self._hooks is not None:
            for h in self._hooks:
                h.take()  # drop outputs of recomputed (checkpointed) layers
        out = student()
        lm = out.loss
        kl = self._kl(out.logits, batch)
        loss = cfg.lm_weight * lm + cfg.kl_weight * kl
        parts = {"train/lm_loss": lm.detach().float(), "train/kl": kl.detach()}
        if self._hooks is not None:
            hidden = hidden_distill_loss(self._hooks[0].take(), self._hooks[1].take())
            loss = loss + cfg.hidden_weight * hidden
            parts["train/hidden_loss"] = hidden.detach()
        return loss, parts

    def _kl(self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``T^2 KL(teacher || student)`` of the batch, the teacher run without gradients."""
        assert self.model is not None, "Teacher.build runs before Teacher.loss"
        with torch.no_grad():
            kwargs = {"input_ids": batch["input_ids"]}
            if batch.get("attention_mask") is not None:
                kwargs["attention_mask"] = batch["attention_mask"]
            t_logits = self.model(**kwargs).logits
        return kl_distill_loss(student_logits, t_logits, batch["labels"], self.cfg.temperature)
