"""One table for a recovery study: dense, training-free top-k at S, continued-trained at S.

Every row is a model; every model is measured on every text with the same tokenizer stream,
``seq_len`` windows and token budget, so the columns compare:

    row                       source
    dense                     the base checkpoint as it is
    training-free S=<s>       the base checkpoint + ``qsparse.sparsify`` (top-k, ratio s)
    <label>                   another checkpoint (e.g. ``outputs/run/hf``) with its own settings

Columns: perplexity per text (and its ratio to the dense row), the measured overall sparsity
and the activated parameters (both on the first text's first ``sparsity_tokens`` tokens; see
:func:`qsparse.stats.sparsity_report`). Measured with ``reference=`` the dense model, a row
also has, per text, its top-1 agreement with the dense model and ``KL(dense || row)`` in nats
per predicted token, from the perplexity pass itself
(:func:`~qsparse.evaluation.perplexity.perplexity_of_tokens`: the dense model runs on each
batch beside the row's model; no dense logits are kept).

``qsparse-compare`` (:mod:`qsparse.cli.compare`) fills the same rows with the methods of
:mod:`qsparse.methods` (``measure_model(..., method=...)``): the row then also records the
method's target, the sparsity it reached in the target's units (``S reached``:
:meth:`~qsparse.methods.MethodResult.achieved` on the measured sites), the mean site sparsity
and what applying it cost (seconds, peak memory).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.documents import read_documents
from ..stats import sparsity_report
from .perplexity import perplexity_of_tokens, token_stream
from .runner import load_for_eval

if TYPE_CHECKING:
    from ..methods.base import SparsityMethod


@dataclass
class CompareRow:
    """One model of the comparison: ``ppl[text]``, measured sparsity, activated params."""

    label: str
    path: str
    sparsity_setting: float | None
    ppl: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)
    kl_to_dense: dict[str, float] = field(default_factory=dict)
    measured_sparsity: float | None = None
    activated_parameters: int | None = None
    total_parameters: int | None = None
    mean_site_sparsity: float | None = None
    achieved_sparsity: float | None = None
    method: str | None = None
    method_seconds: float | None = None
    method_peak_mib: float | None = None
    eval_seconds: float | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _configured_ratio(model: torch.nn.Module) -> float | None:
    from ..nn.sites import get_settings

    settings = get_settings(model) or {}
    sp = settings.get("sparsity") or {}
    if sp.get("pattern", "none") == "none":
        return 0.0
    return sp.get("ratio")


def compare_models(
    base: str | os.PathLike,
    texts: Sequence[str | os.PathLike],
    sparsities: Sequence[float] = (),
    checkpoints: Sequence[str | os.PathLike] = (),
    labels: Sequence[str] | None = None,
    **measure: Any,
) -> list[CompareRow]:
    """Measure the dense ``base``, ``base`` at each training-free ``sparsities`` ratio, and
    each of ``checkpoints`` (labelled by ``labels`` or their paths) on every text.
    ``measure``: the options of :func:`measure_model` every row shares (``seq_len``,
    ``max_tokens``, ``batch_size``, ``dtype``, ``device``, ``sparsity_tokens``, ...; its
    defaults where not given).

    Raises:
        ValueError: no text, or ``labels`` of the wrong length.
    """
    if not texts:
        raise ValueError("compare: give at least one --text (file or bundled corpus name)")
    labels = checkpoint_labels(checkpoints, labels)
    docs = {str(t): read_documents(t) for t in texts}
    plan: list[tuple[str, str, float | None]] = [("dense", str(base), None)]
    plan += [(f"training-free S={s:g}", str(base), float(s)) for s in sparsities]
    plan += [(lab, str(c), None) for lab, c in zip(labels, checkpoints, strict=True)]
    return [measure_model(label, path, docs, ratio, **measure) for label, path, ratio in plan]


def checkpoint_labels(
    checkpoints: Sequence[str | os.PathLike], labels: Sequence[str] | None = None
) -> list[str]:
    """Row labels of ``checkpoints`` (measured as saved, e.g. continued-trained
    ``outputs/run/hf`` folders): ``labels`` or the paths.

    Raises:
        ValueError: ``labels`` given with a length other than ``len(checkpoints)``.
    """
    labels = list(labels) if labels else [str(c) for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(
            f"compare: {len(labels)} labels for {len(checkpoints)} checkpoints; give one each"
        )
    return labels


def measure_model(
    label: str,
    path: str | os.PathLike,
    docs: dict[str, list[str]],
    ratio: float | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 65536,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str = "cpu",
    sparsity_tokens: int = 8192,
    method: SparsityMethod | None = None,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    sparsity: dict[str, Any] | None = None,
    reference: torch.nn.Module | None = None,
) -> CompareRow:
    """One row: the checkpoint at ``path`` (with training-free top-k at ``ratio`` when
    given, or the :class:`~qsparse.nn.SparsityConfig` dict ``sparsity`` (a per-site table),
    or converted by ``method``, calibrating on ``method.calibration``) measured on every
    ``docs[name]`` (documents of :func:`read_documents`) and, with ``tasks``, on those lm-eval
    tasks (``limit`` items each; :func:`~qsparse.evaluation.runner.run_lm_eval`). With
    ``reference`` (the dense model, loaded on ``device``) the row also gets its top-1 agreement
    with it and ``KL(reference || row)`` per text (module docstring)."""
    if sparsity is None and ratio is not None:
        sparsity = {"ratio": ratio, "pattern": "token_topk"}
    model, tokenizer = load_for_eval(path, dtype, sparsity=sparsity, device=device)
    row = CompareRow(label, str(path), ratio if ratio is not None else _configured_ratio(model))
    applied = None
    if method is not None:
        applied = method.apply(model, tokenizer)
        row.sparsity_setting, row.method = method.sparsity, method.name
        row.method_seconds, row.method_peak_mib = applied.seconds, applied.peak_memory_mib
    start = time.perf_counter()
    for i, (name, texts) in enumerate(docs.items()):
        stream = token_stream(tokenizer, texts, max_tokens=max_tokens)
        result = perplexity_of_tokens(model, stream, seq_len, batch_size, reference)
        row.ppl[name], row.loss[name] = result.ppl, result.loss
        if reference is not None:
            row.top1_agreement[name] = result.top1_agreement
            row.kl_to_dense[name] = result.kl_to_reference
        if i == 0:
            head = stream[: max(2, min(sparsity_tokens, stream.numel()))]
            report = sparsity_report(model, [w[None] for w in head.split(seq_len)])
            row.measured_sparsity = report.overall
            row.activated_parameters = report.activated_parameters
            row.total_parameters = report.total_parameters
            row.mean_site_sparsity = report.mean_site_sparsity
            if applied is not None:
                row.achieved_sparsity = applied.achieved(report.sites)
    if tasks:
        from .runner import run_lm_eval

        row.tasks = run_lm_eval(model, tokenizer, list(tasks), limit, batch_size)
    row.eval_seconds = time.perf_counter() - start
    return row


def merge_rows(files: Sequence[str | os.PathLike[str]]) -> list[CompareRow]:
    """The rows of several ``qsparse-compare --json`` files of one comparison, split across
    processes (e.g. one per method): the first file's dense row, then every other row in file
    order; a label seen before is dropped (its first occurrence is kept).

    Raises ``ValueError`` naming the file when a file is not such a list, does not start with
    a dense row, or its dense perplexities differ from the first file's (relative 1e-6): then
    the files measured different models or texts and are not one comparison.
    """
    import json

    merged: list[CompareRow] = []
    seen: set[str] = set()
    for path in files:
        try:
            data = json.loads(open(path, encoding="utf-8").read())
            rows = [CompareRow(**item) for item in data]
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a qsparse-compare --json file ({err})") from None
        if not rows or rows[0].method is not None or rows[0].sparsity_setting:
            raise ValueError(f"{path}: its first row is not the dense model")
        if merged:
            ref = merged[0].ppl
            if set(rows[0].ppl) != set(ref) or any(
                abs(rows[0].ppl[t] / ref[t] - 1.0) > 1e-6 for t in ref
            ):
                raise ValueError(
                    f"{path}: dense perplexity {rows[0].ppl} differs from {files[0]}'s {ref}: "
                    "not the same model and text; merge only files of one comparison"
                )
            rows = rows[1:]
        for row in rows:
            if row.label not in seen:
                seen.add(row.label)
                merged.append(row)
    return merged


def render_comparison(
    rows: Sequence[CompareRow], title: str = "qsparse-eval: dense vs training-free vs trained"
) -> None:
    """Print the rows as one rich table; perplexities with their ratio to the dense row. Rows
    made by methods add the mean site sparsity and the method's cost columns; rows measured
    against the dense model add ``top-1 <text>`` and ``KL <text>`` after each perplexity."""
    from rich.console import Console
    from rich.table import Table

    texts = list(rows[0].ppl)
    dense = rows[0].ppl
    costs = any(r.method is not None for r in rows)
    agreement = any(r.top1_agreement for r in rows)
    task_names = list(dict.fromkeys(t for r in rows for t in r.tasks))
    table = Table(title=title, show_header=True)
    table.add_column("model")
    table.add_column("S (set)", justify="right")
    for t in texts:
        table.add_column(f"ppl {os.path.basename(t)}", justify="right")
        if agreement:
            table.add_column(f"top-1 {os.path.basename(t)}", justify="right")
            table.add_column(f"KL {os.path.basename(t)}", justify="right")
    for task in task_names:
        table.add_column(f"acc {task}", justify="right")
    table.add_column("measured sparsity", justify="right")
    table.add_column("activated params", justify="right")
    if costs:
        columns = ("S reached", "mean site sparsity", "method s", "method peak MiB", "eval s")
        for column in columns:
            table.add_column(column, justify="right")
    for r in rows:
        cells = [r.label, "-" if r.sparsity_setting is None else f"{r.sparsity_setting:g}"]
        for t in texts:
            ratio = r.ppl[t] / dense[t] - 1.0
            cells.append(
                f"{r.ppl[t]:.3f} ({ratio:+.1%})" if r is not rows[0] else f"{r.ppl[t]:.3f}"
            )
            if agreement:
                cells += [_fmt(r.top1_agreement.get(t), ".3f"), _fmt(r.kl_to_dense.get(t), ".4f")]
        cells += [_fmt(r.tasks.get(task, {}).get("acc"), ".3f") for task in task_names]
        cells.append("-" if r.measured_sparsity is None else f"{r.measured_sparsity:.3f}")
        cells.append(
            "-"
            if r.activated_parameters is None
            else f"{r.activated_parameters:,} ({r.activated_parameters / r.total_parameters:.1%})"
        )
        if costs:
            cells += [
                _fmt(r.achieved_sparsity, ".3f"),
                _fmt(r.mean_site_sparsity, ".3f"),
                _fmt(r.method_seconds, ".1f"),
                _fmt(r.method_peak_mib, ".0f"),
                _fmt(r.eval_seconds, ".1f"),
            ]
        table.add_row(*cells)
    console = Console()
    Console(width=max(console.width, 200)).print(table)  # wide tables stay readable in logs


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
