"""The distillation losses: pure functions of student and teacher tensors.

:mod:`qsparse.training.distill` combines them into a run's loss (its docstring has the
formula); :class:`~qsparse.training.teacher_store.StoredTeacher` uses
:func:`sparse_kl_distill_loss` on teacher logits read from disk. All three compute in fp32
whatever the input dtype:

- :func:`kl_distill_loss`: ``T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T))`` over the
  positions that predict a target;
- :func:`sparse_kl_distill_loss`: the same KL against a teacher known by its top-K logits,
  the rest of the vocabulary merged into one bucket;
- :func:`hidden_distill_loss`: ``mean_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2`` over decoder
  layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["hidden_distill_loss", "kl_distill_loss", "sparse_kl_distill_loss"]


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
