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
the rest of the mass. The three loss functions are in :mod:`qsparse.training.distill_loss`.

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
from torch import nn

from ..dtypes import dtype_names, torch_dtype
from ..errors import UserError
from ..models.builder import build_model
from ..models.checkpointing import decoder_layer_list
from .distill_loss import hidden_distill_loss, kl_distill_loss, sparse_kl_distill_loss

__all__ = [
    "DISTILL_MODES",
    "TEACHER_DTYPES",
    "DistillConfig",
    "LayerOutputs",
    "Teacher",
    "TeacherPathError",
    "check_teacher_path",
    "hidden_distill_loss",  # the losses live in distill_loss; importable from here too
    "kl_distill_loss",
    "sparse_kl_distill_loss",
    "teacher_spec",
]

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
