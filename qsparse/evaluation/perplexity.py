"""Perplexity of a causal LM on local text.

Documents come from :func:`qsparse.data.documents.read_documents` (the reader training uses).
They are tokenized without special tokens, each followed by the EOS token (preceded by
BOS when the tokenizer has one and ``add_bos`` is set), and concatenated into one stream of
``N`` tokens. The stream is cut into non-overlapping windows of ``seq_len`` tokens (the
tail shorter than 2 tokens is dropped); within a window of length ``t`` the model predicts
tokens 2..t from their prefixes, so each window contributes ``t - 1`` predictions::

    loss = sum_w sum_{i=2..t_w} -log p(x_i | x_<i) / sum_w (t_w - 1)
    ppl  = exp(loss)

The first token of each window is not predicted (no context), so longer windows give
slightly lower perplexity; report ``seq_len`` with the figure.

Agreement with a reference model (``reference=``, e.g. the dense model beside a sparsified
one), over the same predicted positions ``P`` (``|P| = tokens``), in the same pass::

    top1 = |{i in P : argmax_v q_i(v) = argmax_v p_i(v)}| / |P|
    kl   = sum_{i in P} sum_v p_i(v) (log p_i(v) - log q_i(v)) / |P|      (nats per token)

with ``p`` the reference's and ``q`` the evaluated model's next-token distributions (fp32
softmax). Memory stays bounded: the reference runs on each batch right after the model and
both batches of logits are dropped before the next one; nothing is kept for the corpus. The
price is one reference forward per batch and the reference's weights in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerplexityResult:
    """``loss``: mean next-token cross-entropy (nats); ``ppl = exp(loss)``; ``tokens``:
    predicted tokens; ``windows``: windows of at most ``seq_len`` tokens evaluated;
    ``top1_agreement`` and ``kl_to_reference`` (nats per token): against the reference model
    when one was given (module docstring), else None."""

    loss: float
    ppl: float
    tokens: int
    windows: int
    seq_len: int
    top1_agreement: float | None = None
    kl_to_reference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_stream(
    tokenizer: Any,
    documents: Iterable[str],
    max_tokens: int | None = None,
    add_bos: bool = False,
) -> torch.Tensor:
    """LongTensor[N] of the documents' tokens, each document followed by EOS (see module doc).

    Stops after ``max_tokens`` tokens when given.
    """
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if add_bos else None
    ids: list[int] = []
    for doc in documents:
        if bos is not None:
            ids.append(bos)
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to evaluate")
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> Iterator[torch.Tensor]:
    """Non-overlapping windows ``[t]`` (t <= seq_len) of ``stream`` [N]; tails < 2 dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    for start in range(0, stream.numel(), seq_len):
        w = stream[start : start + seq_len]
        if w.numel() >= 2:
            yield w


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out["logits"]


def agreement_sums(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """``(sum of KL(reference || logits), number of equal argmaxes)`` over the positions of
    ``logits`` and ``reference`` [B, T, V] (module docstring), one window at a time in fp32 so
    at most a few [T, V] copies are alive besides the inputs.

    Raises:
        ValueError: the two vocabularies differ in size.
    """
    if logits.shape != reference.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} vs reference {tuple(reference.shape)}: the models "
            "must share one tokenizer and vocabulary to be compared"
        )
    kl, agree = 0.0, 0
    for q, p in zip(logits, reference, strict=True):
        log_q, log_p = F.log_softmax(q.float(), -1), F.log_softmax(p.float(), -1)
        kl += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
        agree += int((q.argmax(-1) == p.argmax(-1)).sum())
    return kl, agree


@torch.no_grad()
def perplexity_of_tokens(
    model: nn.Module,
    stream: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    reference: nn.Module | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream [N] in windows of ``seq_len`` (module doc),
    and with ``reference`` (on the same device) its top-1 agreement and KL to it.

    Windows of equal length are batched ``batch_size`` at a time; the models run in eval
    mode and fp32 log-softmax.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    models = [model] if reference is None else [model, reference]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    device = _model_device(model)
    total_nll = total_kl = 0.0
    total_tokens = total_agree = 0
    n_windows = 0
    pending: list[torch.Tensor] = []

    def flush(batch: Sequence[torch.Tensor]) -> None:
        nonlocal total_nll, total_tokens, n_windows, total_kl, total_agree
        ids = torch.stack(list(batch)).to(device)
        logits = _logits(model, ids).float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
        n_windows += ids.shape[0]
        if reference is not None:
            kl, agree = agreement_sums(logits[:, :-1], _logits(reference, ids)[:, :-1])
            total_kl += kl
            total_agree += agree

    try:
        for w in windows(stream, seq_len):
            if pending and w.numel() != pending[0].numel():
                flush(pending)
                pending = []
            pending.append(w)
            if len(pending) == batch_size:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
    finally:
        for m, mode in zip(models, was_training, strict=True):
            m.train(mode)
    n = max(total_tokens, 1)
    loss = total_nll / n
    return PerplexityResult(
        loss=loss,
        ppl=math.exp(loss),
        tokens=total_tokens,
        windows=n_windows,
        seq_len=seq_len,
        top1_agreement=None if reference is None else total_agree / n,
        kl_to_reference=None if reference is None else total_kl / n,
    )


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    documents: Iterable[str],
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    add_bos: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``documents`` (see the module docstring for the formula)."""
    stream = token_stream(tokenizer, documents, max_tokens=max_tokens, add_bos=add_bos)
    return perplexity_of_tokens(model, stream, seq_len=seq_len, batch_size=batch_size)
