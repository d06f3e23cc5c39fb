"""Command-line entry points (Hydra): ``qsparse-train`` and friends, one module per command.

:func:`add_measure_arguments` and :func:`add_compare_arguments` are the one definition of the
options that ``qsparse-eval`` and ``qsparse-compare`` share.
"""

from __future__ import annotations

import argparse


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
