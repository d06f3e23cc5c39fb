"""Evaluate a checkpoint folder: perplexity, activation sparsity, activated parameters and
multiple-choice accuracy through lm-eval (``qsparse-eval`` is a thin CLI over this).

Loading: a folder exported by :func:`qsparse.export` (``config.json`` has a ``"qsparse"``
entry) comes back sparsified through :func:`qsparse.load`; a plain transformers folder is
loaded dense, and ``sparsity``/``quant``/``activation`` overrides apply
:func:`qsparse.sparsify` on top (training-free conversion, e.g. to see what top-k costs a
dense model before continued training).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.documents import read_documents
from ..dtypes import torch_dtype
from ..stats import SparsityReport, sparsity_report
from .perplexity import PerplexityResult, perplexity_of_tokens, token_stream

LOCAL_TASK_ALIASES = ("local", "qsparse_local")


@dataclass
class EvalResult:
    """Everything :func:`evaluate_checkpoint` measured (``None`` where not asked for)."""

    path: str
    settings: dict[str, Any] | None
    perplexity: PerplexityResult | None = None
    sparsity: SparsityReport | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "settings": self.settings,
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "sparsity": self.sparsity.to_dict() if self.sparsity else None,
            "tasks": self.tasks,
            "seconds": self.seconds,
        }


def load_for_eval(
    path: str | os.PathLike,
    dtype: str = "float32",
    sparsity: Any = None,
    quant: Any = None,
    activation: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a checkpoint folder (see the module docstring).

    Raises:
        CheckpointError: the folder is missing config, weights or tokenizer files, or holds an
            unsupported model (message names what is missing).
        ValueError: unknown ``dtype``.
    """
    from transformers import AutoTokenizer

    from ..convert import sparsify
    from ..models.hf import QSPARSE_CONFIG_KEY, check_hf_checkpoint, load
    from ..nn import QuantConfig, SparsityConfig
    from ..nn.sites import get_settings

    torch_dtype_ = torch_dtype(dtype, "dtype", allow_auto=True)
    config = check_hf_checkpoint(path, require_tokenizer=True)
    model = load(path, dtype=torch_dtype_)
    if sparsity is not None or quant is not None or activation is not None:
        previous = get_settings(model) or config.get(QSPARSE_CONFIG_KEY) or {}
        if sparsity is None:
            sparsity = SparsityConfig.from_dict(previous.get("sparsity") or {"pattern": "none"})
        elif isinstance(sparsity, dict):
            sparsity = SparsityConfig.from_dict(sparsity)
        if quant is None and previous.get("quant"):
            quant = QuantConfig.from_dict(previous["quant"])
        elif isinstance(quant, dict):
            quant = QuantConfig.from_dict(quant)
        sparsify(
            model,
            sparsity=sparsity,
            quant=quant,
            activation=activation or previous.get("activation", "keep"),
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), tokenizer


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    task_dir: str | os.PathLike | None = None,
    n_items: int = 500,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the in-memory model and return ``{task: {metric: value}}``.

    ``tasks`` may name the local tasks (``qsparse_local`` or ``local`` for the group, or
    ``qsparse_wiki_cloze``/``qsparse_wiki_topic``/``qsparse_kjv_next``) and any task lm-eval
    knows whose data is available offline. ``limit`` caps items per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm_eval_model import QSparseLM
    from .local_tasks import GROUP, build_local_tasks

    if not tasks:
        raise ValueError("tasks is empty; name lm-eval tasks, e.g. --tasks qsparse_local")
    names = [GROUP if t in LOCAL_TASK_ALIASES else t for t in tasks]
    include = Path(task_dir) if task_dir is not None else build_local_tasks(n=n_items)
    manager = TaskManager(include_path=str(include))
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; local tasks: {GROUP} "
            f"(qsparse_wiki_cloze, qsparse_wiki_topic, qsparse_kjv_next)"
        )
    lm = QSparseLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    out = simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if metric in ("acc", "acc_norm"):
                    clean[metric] = float(value)
        if clean:
            results[task] = clean
    return results


def evaluate_checkpoint(
    path: str | os.PathLike,
    text: str | os.PathLike | None = None,
    tasks: list[str] | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 65536,
    batch_size: int = 4,
    limit: int | None = None,
    dtype: str = "float32",
    sparsity: Any = None,
    quant: Any = None,
    activation: str | None = None,
    device: str = "cpu",
    sparsity_tokens: int = 8192,
    n_items: int = 500,
) -> EvalResult:
    """Load ``path`` and measure what is asked for.

    - ``text``: a local file or bundled corpus name: perplexity (``seq_len`` windows, first
      ``max_tokens`` tokens) and measured sparsity on its first ``sparsity_tokens`` tokens.
      Without ``text`` the sparsity is measured on the first task's contexts if any.
    - ``tasks``: lm-eval task names (``qsparse_local`` = the bundled multiple-choice tasks).
    """
    from ..nn.sites import get_settings

    start = time.perf_counter()
    model, tokenizer = load_for_eval(path, dtype, sparsity, quant, activation, device)
    result = EvalResult(path=str(path), settings=get_settings(model))
    if text is not None:
        stream = token_stream(tokenizer, read_documents(text), max_tokens=max_tokens)
        result.perplexity = perplexity_of_tokens(model, stream, seq_len, batch_size)
        head = stream[: max(2, min(sparsity_tokens, stream.numel()))]
        batches = [w[None] for w in head.split(seq_len) if w.numel() >= 2]
        result.sparsity = sparsity_report(model, batches)
    if tasks:
        result.tasks = run_lm_eval(model, tokenizer, tasks, limit, batch_size, n_items=n_items)
    if result.sparsity is None:
        probe = token_stream(tokenizer, ["The quick brown fox jumps over the lazy dog."] * 8)
        result.sparsity = sparsity_report(model, [probe[None]])
    result.seconds = time.perf_counter() - start
    return result
