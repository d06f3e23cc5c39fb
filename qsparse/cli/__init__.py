"""Command-line entry points (Hydra): ``qsparse-train`` and friends, one module per command.

:func:`add_checkpoint_arguments`, :func:`add_measure_arguments` and
:func:`add_compare_arguments` are the one definition of the arguments that ``qsparse-eval``
and ``qsparse-compare`` share.
"""

from __future__ import annotations

import argparse


def add_checkpoint_arguments(p: argparse.ArgumentParser, *, text_required: bool) -> None:
    """Add ``PATH`` (the checkpoint folder measured) and ``--text TEXT ...`` (parsed to
    ``texts``: corpus names or local text files whose perplexity is measured; ``None`` when
    not given, which only ``text_required=False`` allows)."""
    p.add_argument(
        "path", help="checkpoint folder (transformers Llama/Mistral/Qwen2, or exported by qsparse)"
    )
    p.add_argument(
        "--text",
        dest="texts",
        metavar="TEXT",
        nargs="+",
        required=text_required,
        default=None,
        help="corpus name(s) or local text file(s) for perplexity",
    )


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--seq-len``, ``--max-tokens`` (perplexity), ``--tasks``, ``--limit`` (lm-eval),
    ``--batch-size``, ``--dtype`` and ``--device`` to ``p``: the options every measurement of a
    checkpoint takes (:func:`qsparse.evaluation.compare.measure_model`'s parameters)."""
    from qsparse.dtypes import dtype_names

    p.add_argument("--seq-len", type=int, default=512, help="perplexity window (512)")
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity tokens per text")
    p.add_argument(
        "--tasks", nargs="*", default=[], help="lm-eval tasks (qsparse_local: bundled corpora)"
    )
    p.add_argument("--limit", type=int, default=None, help="items per lm-eval task")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=dtype_names(allow_auto=True))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--compare CHECKPOINT ...`` (parsed to ``checkpoints``) and ``--labels``:
    checkpoints, e.g. continued-trained ``RUN/hf`` exports, measured as saved, one row each."""
    p.add_argument(
        "--compare",
        dest="checkpoints",
        metavar="CHECKPOINT",
        nargs="+",
        default=[],
        help="trained checkpoint folders measured as saved beside PATH, one row each",
    )
    p.add_argument("--labels", nargs="+", default=None, help="row labels of --compare")
