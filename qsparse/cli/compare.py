"""``qsparse-compare PATH``: every training-free activation-sparsity method on one model and
text, at a list of target sparsities, in one table (and optionally a json and a plot).

    qsparse-compare ./SmolLM2-135M --text wiki_en --sparsity 0.25 0.4 0.5 0.7
    qsparse-compare ./tiny --text kjv --methods qsparse teal cats --sparsity 0.5 \\
        --max-tokens 4096 --calibration-tokens 4096 --set teal.greedy_tokens=512 --json r.json

Rows: the dense model, then every method of ``--methods`` (configs ``qsparse/conf/method/
<name>.yaml``, composed with Hydra; ``--set <method>.<key>=<value>`` overrides them) at every ``--sparsity``. Each row loads ``PATH`` afresh, applies the method (timing it
and sampling its peak memory), then measures perplexity on every ``--text`` and the
measured sparsity / activated parameters (:mod:`qsparse.evaluation.compare`), and with
``--tasks`` the lm-eval accuracy (``qsparse_local``: the bundled multiple-choice tasks).

Agreement with the dense model: every row (dense included, as a check: 1 and 0) also gets,
per ``--text``, ``top-1`` (how often its argmax is the dense model's) and ``KL`` (``KL(dense
|| row)``, nats per predicted token), computed in the perplexity pass: one dense copy of
``PATH`` stays loaded and runs on each batch beside the row's model (one extra dense forward
per batch, the model's weights once more in memory, no logits kept across batches).
``--no-agreement`` skips both.

``--compare RUN/hf ...`` adds checkpoints measured as saved (``--labels`` names them), e.g.
Q-Sparse continued-trained exports beside the training-free rows, as ``qsparse-eval
--compare`` does (same :func:`~qsparse.evaluation.compare.measure_model`).

A comparison split across processes (one per method, as on a GPU) is put back together with
``qsparse-compare --merge a.json teal.json cats.json --json all.json --plot all.png``: the rows
of every file after the first file's dense row (files whose dense rows differ are refused),
printed as one table (:func:`~qsparse.evaluation.compare.merge_rows`).

Held-out text: calibration reads ``--calibration`` (a corpus name or file); without it, the
documents of the first ``--text`` are split in two, perplexity is measured on the first half
and calibration reads the second, so no calibration document is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import add_checkpoint_arguments, add_compare_arguments, add_measure_arguments

DEFAULT_METHODS = ("qsparse", "teal", "cats")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsparse-compare",
        description="Dense vs every training-free sparsity method: ppl, sparsity, params, cost.",
    )
    add_checkpoint_arguments(p, text_required=True)
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration corpus or file (default: second half of the first --text's documents)",
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument(
        "--sparsity",
        dest="sparsities",
        metavar="SPARSITY",
        type=float,
        nargs="+",
        default=[0.25, 0.4, 0.5, 0.7],
    )
    add_compare_arguments(p)
    p.add_argument(
        "--calibration-tokens", type=int, default=None, help="overrides every method's own"
    )
    p.add_argument("--sparsity-tokens", type=int, default=8192, help="tokens for sparsity")
    add_measure_arguments(p)
    p.add_argument(
        "--no-agreement",
        dest="agreement",
        action="store_false",
        help="skip top-1 agreement and KL to the dense model (saves a dense forward per batch)",
    )
    p.add_argument(
        "--json", dest="json_out", default=None, help="write the rows as json (after each row)"
    )
    p.add_argument("--plot", default=None, help="write ppl vs measured sparsity (png)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        help="method config overrides <method>.<key>=<value>, e.g. teal.step=0.1",
    )
    return p


def build_method(name: str, sparsity: float, overrides: list[str] = ()) -> Any:
    """Instantiate ``qsparse/conf/method/<name>.yaml`` at ``sparsity`` with Hydra overrides
    ``method.<key>=<value>`` (``overrides`` given as ``<key>=<value>``)."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("qsparse.conf", version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[f"method={name}", f"method.sparsity={sparsity}"]
            + [f"method.{o}" for o in overrides],
        )
    return instantiate(cfg.method)


def split_overrides(overrides: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``["teal.step=0.1"]`` -> ``{"teal": ["step=0.1"]}``; raises ValueError on others."""
    out: dict[str, list[str]] = {m: [] for m in methods}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head not in out or "=" not in rest:
            raise ValueError(
                f"override {item!r} must read <method>.<key>=<value> for one of {methods}"
            )
        out[head].append(rest)
    return out


def compare_methods(
    path: str,
    texts: list[str],
    methods: list[str],
    sparsities: list[float],
    calibration: str | None = None,
    overrides: list[str] = (),
    calibration_tokens: int | None = None,
    on_row: Any = None,
    checkpoints: list[str] = (),
    labels: list[str] | None = None,
    agreement: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
    **measure: Any,
) -> list:
    """Rows of :class:`~qsparse.evaluation.compare.CompareRow`: dense, then each method at each
    sparsity (module docstring), then each of ``checkpoints`` as saved (labelled by
    ``labels`` or its path; e.g. a continued-trained ``RUN/hf``). ``measure``: seq_len,
    max_tokens, batch_size, sparsity_tokens, tasks, limit of
    :func:`~qsparse.evaluation.compare.measure_model`. With ``agreement``, a dense copy of
    ``path`` (``dtype``, ``device``) is every row's ``reference`` (top-1 agreement and KL).
    ``on_row(rows)``: called with the rows so far after each one (``--json`` is rewritten
    then, so a long run that is stopped keeps what it measured)."""
    from ..data.documents import read_documents
    from ..errors import UserError
    from ..evaluation.compare import checkpoint_labels, measure_model
    from ..evaluation.runner import load_for_eval
    from ..models.hf import check_hf_checkpoint

    labels = checkpoint_labels(checkpoints, labels)
    missing = [str(c) for c in checkpoints if not Path(c).is_dir()]
    if missing:
        raise FileNotFoundError(f"--compare {' '.join(missing)}: no such checkpoint folder")
    if agreement:  # KL needs one vocabulary: checked before any row is measured
        vocab = check_hf_checkpoint(path).get("vocab_size")
        for c in checkpoints:
            if check_hf_checkpoint(c).get("vocab_size") != vocab:
                raise UserError(
                    f"--compare {c}: its vocabulary differs from {path}'s, so KL to the dense "
                    "model is undefined; pass --no-agreement"
                )
    per_method = split_overrides(list(overrides), methods)
    # every config is composed before anything is measured, so a typo fails at once
    plan = [build_method(name, s, per_method[name]) for s in sparsities for name in methods]
    docs = {str(t): read_documents(t) for t in texts}
    if calibration is None:
        first = docs[str(texts[0])]
        if len(first) < 2:
            raise ValueError(f"--text {texts[0]} has {len(first)} document(s); give --calibration")
        half = len(first) // 2
        docs[str(texts[0])], calib_docs = first[:half], first[half:]
    else:
        calib_docs = read_documents(calibration)
    measure.update(dtype=dtype, device=device)
    if agreement:
        measure["reference"] = load_for_eval(path, dtype, device=device)[0]
    rows = [measure_model("dense", path, docs, **measure)]
    if on_row is not None:
        on_row(rows)
    for method in plan:
        if method.needs_calibration:
            method.calibration = calib_docs
            if calibration_tokens is not None:
                method.calibration_tokens = calibration_tokens
        rows.append(measure_model(method.label(), path, docs, method=method, **measure))
        if on_row is not None:
            on_row(rows)
    for label, checkpoint in zip(labels, checkpoints, strict=True):
        rows.append(measure_model(label, checkpoint, docs, **measure))
        if on_row is not None:
            on_row(rows)
    return rows


def plot_rows(rows: list, out: str | Path) -> Path:
    """Perplexity (first text) against measured sparsity, one line per method variant (the
    row label without its ``S=``), one star per ``--compare`` checkpoint, dense dashed."""
    from qsparse.extras import pyplot

    plt = pyplot(feature="qsparse-compare --plot")
    text = next(iter(rows[0].ppl))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(rows[0].ppl[text], color="gray", linestyle="--", label="dense")
    series = [(r, r.label.rsplit(" S=", 1)[0]) for r in rows if r.method]  # teal, teal-uniform
    for name in dict.fromkeys(key for _, key in series):
        pts = sorted((r.measured_sparsity, r.ppl[text]) for r, key in series if key == name)
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    for r in rows[1:]:
        if not r.method:  # a checkpoint measured as saved
            ax.plot(r.measured_sparsity, r.ppl[text], marker="*", markersize=12, label=r.label)
    ax.set_xlabel("measured overall sparsity (1 - activated / total parameters)")
    ax.set_ylabel(f"perplexity ({Path(text).name})")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (``qsparse-compare``); 0 on success, 2 on bad input."""
    from hydra.errors import HydraException

    from ..env_flags import check_env_flags
    from ..evaluation.compare import render_comparison
    from ..models.hf import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--merge":
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)

    def write_json(rows: list) -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([r.to_dict() for r in rows], indent=2))

    try:
        check_env_flags()  # QSPARSE_KERNELS and the other on/off settings: 1 or 0
        # every option but the output files is a parameter of compare_methods, by name
        options = {k: v for k, v in vars(args).items() if k not in ("json_out", "plot")}
        rows = compare_methods(**options, on_row=write_json)
    except (CheckpointError, FileNotFoundError, ValueError, HydraException) as err:
        print(f"qsparse-compare: {err}", file=sys.stderr)
        return 2
    render_comparison(rows, title=f"qsparse-compare {args.path}")
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


def merge_main(argv: list[str]) -> int:
    """``qsparse-compare --merge FILE ... [--json OUT] [--plot PNG]`` (module docstring)."""
    from ..evaluation.compare import merge_rows, render_comparison

    p = argparse.ArgumentParser(
        prog="qsparse-compare --merge", description="One table from several --json files."
    )
    p.add_argument("files", nargs="+", help="qsparse-compare --json files of one comparison")
    p.add_argument("--json", dest="json_out", default=None, help="write the merged rows")
    p.add_argument("--plot", default=None, help="write ppl vs measured sparsity (png)")
    args = p.parse_args(argv)
    try:
        rows = merge_rows(args.files)
    except ValueError as err:
        print(f"qsparse-compare: {err}", file=sys.stderr)
        return 2
    render_comparison(rows, title="qsparse-compare --merge " + " ".join(args.files))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
