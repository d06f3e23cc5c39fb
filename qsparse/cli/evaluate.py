"""``qsparse-eval PATH``: perplexity, activation sparsity, activated parameters and lm-eval
multiple-choice accuracy of a checkpoint folder.

    qsparse-eval outputs/run/hf --text wiki_en --tasks qsparse_local --limit 200
    qsparse-eval ./tiny-llama --text notes.txt --sparsity 0.5        # training-free top-k
    qsparse-eval ./model --text data.jsonl --json results.json
    qsparse-eval ./dense --text wiki_en held_out.txt --sparsity 0.4 0.5 \
        --compare outputs/run/hf --labels distilled       # one table: dense / free / trained

With several ``--text`` values, several ``--sparsity`` values or ``--compare``, the base
checkpoint ``PATH`` is measured dense, training-free at every ``--sparsity`` ratio, and every
``--compare`` checkpoint is measured as saved, on every text, in one table
(:mod:`qsparse.evaluation.compare`).

``--text``: a local ``.txt`` (blank-line separated documents), ``.jsonl`` (``text`` field),
``.parquet`` file, or a bundled corpus name (``wiki_en``, ``kjv``). ``--tasks``: lm-eval task
names; ``qsparse_local`` (alias ``local``) is the group of multiple-choice tasks built from the
bundled corpora (no download; see :mod:`qsparse.evaluation.local_tasks`). The results print
as a table and, with ``--json``, are written as json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_checkpoint_arguments, add_compare_arguments, add_measure_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsparse-eval",
        description="Evaluate a (sparsified) checkpoint: ppl, sparsity, activated params, lm-eval.",
    )
    add_checkpoint_arguments(p, text_required=False)
    add_measure_arguments(p)
    p.add_argument(
        "--sparsity",
        type=float,
        nargs="+",
        default=None,
        help="apply top-k with this ratio on top of the checkpoint (training-free); several "
        "ratios give one comparison row each",
    )
    add_compare_arguments(p)
    p.add_argument(
        "--activation", default=None, choices=("keep", "relu2", "silu"), help="with --sparsity"
    )
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (HYDRA_FULL_ERROR=1)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the results as json")
    return p


def render(result: dict) -> None:
    """Print ``EvalResult.to_dict()`` as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"qsparse-eval {result['path']}", show_header=True)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    settings = result.get("settings") or {}
    sp_settings = settings.get("sparsity") or {}
    if sp_settings:
        summary.add_row(
            "configured sparsity",
            f"{sp_settings.get('ratio', 0):.3f} ({sp_settings.get('pattern')})",
        )
    ppl = result.get("perplexity")
    if ppl:
        summary.add_row("perplexity", f"{ppl['ppl']:.3f}")
        summary.add_row("loss (nats/token)", f"{ppl['loss']:.4f}")
        summary.add_row("ppl tokens / seq_len", f"{ppl['tokens']:,} / {ppl['seq_len']}")
    sp = result.get("sparsity")
    if sp:
        summary.add_row("overall sparsity (measured)", f"{sp['overall']:.4f}")
        summary.add_row("activated parameters", f"{sp['activated_parameters']:,}")
        summary.add_row("total parameters", f"{sp['total_parameters']:,}")
        if sp["sites"]:
            mean = sum(sp["sites"].values()) / len(sp["sites"])
            summary.add_row("mean site sparsity", f"{mean:.4f} over {len(sp['sites'])} sites")
    summary.add_row("seconds", f"{result.get('seconds', 0):.1f}")
    console.print(summary)
    if result.get("tasks"):
        tasks = Table(title="lm-eval (0-shot, local tasks)", show_header=True)
        tasks.add_column("task")
        tasks.add_column("acc", justify="right")
        tasks.add_column("acc_norm", justify="right")
        for name, metrics in result["tasks"].items():
            tasks.add_row(
                name,
                f"{metrics.get('acc', float('nan')):.4f}",
                f"{metrics.get('acc_norm', float('nan')):.4f}",
            )
        console.print(tasks)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (``qsparse-eval``); exit status 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    from qsparse.env_flags import check_env_flags
    from qsparse.errors import full_traceback_requested, report

    try:
        check_env_flags()  # QSPARSE_KERNELS and the other on/off settings: 1 or 0
    except ValueError as err:
        if full_traceback_requested(args.debug):
            raise
        return report("qsparse-eval: error", err)
    if args.texts is None and not args.tasks:
        print(
            "qsparse-eval: note: neither --text nor --tasks given; measuring sparsity on a "
            "probe sentence only",
            file=sys.stderr,
        )
    texts = args.texts or []
    if len(texts) > 1 or len(args.sparsity or []) > 1 or args.checkpoints:
        return _compare(args)
    from qsparse.evaluation import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(
            args.path,
            text=texts[0] if texts else None,
            tasks=list(args.tasks),
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            limit=args.limit,
            dtype=args.dtype,
            sparsity=args.sparsity[0] if args.sparsity else None,
            activation=args.activation,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        if full_traceback_requested(args.debug):
            raise
        return report("qsparse-eval: error", err)
    out = result.to_dict()
    render(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """The comparison table (several texts, ratios or checkpoints)."""
    from qsparse.evaluation.compare import compare_models, render_comparison

    if args.tasks:
        print("qsparse-eval: error: --tasks cannot be combined with a comparison", file=sys.stderr)
        return 2
    try:
        rows = compare_models(
            args.path,
            texts=args.texts or [],
            sparsities=args.sparsity or [],
            checkpoints=args.checkpoints,
            labels=args.labels,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"qsparse-eval: error: {err}", file=sys.stderr)
        return 2
    render_comparison(rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
