"""Cost against held-out perplexity for an MoE-converted model, over its selection knob.

    python -m qsparse.moe.sweep PATH --text factbook --method d2dmoe \\
        --values 0 0.1 0.2 0.3 0.5 0.7 1 --qsparse 0.25 0.5 0.7 --out docs/moe-d2dmoe

Loads ``PATH`` (a transformers / qsparse checkpoint), splits the first ``--text``'s documents
in two (perplexity on the first half, conversion and router training on the second, as
``qsparse-compare``), converts it once (``d2dmoe``: experts + trained routers, knob τ of the
dynamic-k rule; ``ssd``: experts + centroid routers, knob k of top-k), then for every knob
value measures perplexity and the cost of :mod:`qsparse.moe.cost` (expert fraction, activated
parameters and forward FLOPs per token, routers included) plus the activated parameters as
``qsparse-compare`` counts them. ``--qsparse S ...`` adds training-free Q-Sparse top-k rows of
the same model for reference. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.
:class:`MoESweepAtEnd` runs the same sweep at the end of a training run (one-command recipes).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods.calibration import model_forward
from .cost import measure_cost, set_rule


@dataclass
class SweepRow:
    """One point: ``label``, the knob, held-out loss / perplexity, the executed expert
    fraction, activated parameters (expert-granular and as ``qsparse-compare`` counts them)
    and forward FLOPs per token (absolute and relative to the dense model)."""

    label: str
    knob: float | None
    loss: float
    ppl: float
    expert_fraction: float
    activated_parameters: int
    measured_activated_parameters: int
    total_parameters: int
    flops_per_token: float
    flops_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Token-weighted mean next-token cross-entropy over ``batches`` (LongTensor[B, T])."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for ids in batches:
            ids = ids.to(device)
            logits = model_forward(model, ids).float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    ids[:, 1:].reshape(-1),
                    reduction="sum",
                )
            )
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def measure_row(
    model: nn.Module, label: str, knob: float | None, batches: Sequence[torch.Tensor]
) -> SweepRow:
    """One :class:`SweepRow` of ``model`` as it is set now."""
    from ..stats import sparsity_report
    from .convert import moe_layers

    loss = mean_loss(model, batches)
    report = sparsity_report(model, list(batches))
    if moe_layers(model):
        cost = measure_cost(model, batches)
        frac, act, flops, rel = (
            cost.mean_expert_fraction,
            cost.activated_parameters,
            cost.flops_per_token,
            cost.flops_fraction,
        )
    else:  # a reference row: its own counting
        frac, act = 1.0, report.activated_parameters
        flops, rel = float("nan"), float("nan")
    return SweepRow(
        label,
        knob,
        loss,
        math.exp(loss),
        frac,
        act,
        report.activated_parameters,
        report.total_parameters,
        flops,
        rel,
    )


def sweep(
    model: nn.Module, mode: str, values: Sequence[float], batches: Sequence[torch.Tensor]
) -> list[SweepRow]:
    """Rows for ``model`` (already converted) at every knob value: ``mode`` ``dynk`` (τ) or
    ``topk`` (k), plus the all-experts row (the dense function)."""
    set_rule(model, "all")
    rows = [measure_row(model, "all experts", None, batches)]
    for v in values:
        if mode == "dynk":
            set_rule(model, "dynk", tau=float(v))
        else:
            set_rule(model, "topk", k=int(v))
        rows.append(measure_row(model, f"{'tau' if mode == 'dynk' else 'k'}={v:g}", v, batches))
    return rows


def write_outputs(rows: Sequence[SweepRow], out: str | Path, title: str) -> dict[str, Path]:
    """``<out>.json`` (rows), ``<out>.md`` (a table), ``<out>.png`` (ppl vs activated params)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {k: out.with_suffix(f".{k}") for k in ("json", "md", "png")}
    paths["json"].write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    dense = rows[0].ppl
    lines = [
        f"**{title}**",
        "",
        "| row | ppl | vs all experts | experts run | activated (experts) | "
        "activated (compare) | FLOPs/token vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "" if r is rows[0] else f"{r.ppl / dense - 1:+.1%}"
        flops = "-" if math.isnan(r.flops_fraction) else f"{r.flops_fraction:.3f}"
        lines.append(
            f"| {r.label} | {r.ppl:.2f} | {rel} | {r.expert_fraction:.3f} | "
            f"{r.activated_parameters:,} ({r.activated_parameters / r.total_parameters:.1%}) | "
            f"{r.measured_activated_parameters:,} | {flops} |"
        )
    paths["md"].write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[SweepRow]] = {}
    for r in rows[1:]:
        series.setdefault(r.label.split("=")[0] if "=" in r.label else r.label, []).append(r)
    for name, pts in series.items():
        xs = [p.measured_activated_parameters / p.total_parameters for p in pts]
        ax.plot(xs, [p.ppl for p in pts], marker="o", label=name)
    ax.axhline(dense, color="gray", linestyle="--", label="all experts (dense)")
    ax.set_xlabel("activated parameters / total (as qsparse-compare counts)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qsparse.moe.sweep", description=__doc__)
    p.add_argument("path", help="checkpoint folder (transformers Llama/Mistral/Qwen2 or qsparse)")
    p.add_argument("--text", required=True, help="corpus name or file (halves: eval / convert)")
    p.add_argument("--method", choices=("d2dmoe", "ssd"), default="d2dmoe")
    p.add_argument("--values", type=float, nargs="+", required=True, help="τ (d2dmoe) or k (ssd)")
    p.add_argument("--qsparse", type=float, nargs="*", default=[], help="Q-Sparse reference S")
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--router-steps", type=int, default=500)
    p.add_argument("--router-width", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output prefix (writes .json .md .png)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI (module docstring); 0 on success, 2 on bad input."""
    from ..data.documents import read_documents
    from ..evaluation.perplexity import token_stream
    from ..evaluation.runner import load_for_eval
    from ..methods import QSparse
    from ..models.hf import CheckpointError
    from .d2dmoe import D2DMoE
    from .ssd_moe import SSDMoE

    args = build_parser().parse_args(argv)
    try:
        docs = read_documents(args.text)
        if len(docs) < 2:
            raise ValueError(f"--text {args.text} has {len(docs)} document(s); need >= 2")
        half = len(docs) // 2
        model, tok = load_for_eval(args.path, args.dtype, device=args.device)
        held = token_stream(tok, docs[:half], max_tokens=args.max_tokens)
        calib = token_stream(tok, docs[half:], max_tokens=args.calibration_tokens)
        n = args.seq_len
        eval_b = [w[None] for w in held.split(n) if w.numel() == n]
        calib_b = [w[None] for w in calib.split(n) if w.numel() == n]
        if not eval_b or not calib_b:
            raise ValueError(f"--text {args.text}: fewer than {n} tokens in a half")
        base = copy.deepcopy(model)
        if args.method == "d2dmoe":
            method = D2DMoE(
                tau=1.0,
                expert_size=args.expert_size,
                router_width=args.router_width,
                router_steps=args.router_steps,
            )
            mode = "dynk"
        else:
            method, mode = SSDMoE(k=1, expert_size=args.expert_size), "topk"
        method.apply(model, tok, calib_b)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"qsparse.moe.sweep: {err}", file=sys.stderr)
        return 2
    rows = sweep(model, mode, args.values, eval_b)
    for s in args.qsparse:
        ref = copy.deepcopy(base)
        QSparse(sparsity=s).apply(ref, tok)
        rows.append(measure_row(ref, f"qsparse S={s:g}", s, eval_b))
    title = f"{args.method} on {Path(args.path).name}, held-out {args.text} ({held.numel()} tokens)"
    paths = write_outputs(rows, args.out, title)
    print(paths["md"].read_text())
    return 0


try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class MoESweepAtEnd(Callback):
    """After training, convert a copy of the model with D2DMoE (routers trained on
    ``router_batches`` training batches) and sweep τ on ``eval_batches`` validation batches;
    writes ``<run_dir>/d2dmoe_sweep.{json,md,png}``. The trained model itself is unchanged."""

    def __init__(
        self,
        taus: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
        qsparse: Sequence[float] = (0.25, 0.5, 0.7),
        expert_size: int = 32,
        router_width: int = 128,
        router_steps: int = 500,
        router_batches: int = 32,
        eval_batches: int = 16,
    ) -> None:
        self.taus, self.qsparse = list(taus), list(qsparse)
        self.expert_size, self.router_width = expert_size, router_width
        self.router_steps = router_steps
        self.router_batches, self.eval_batches = router_batches, eval_batches

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from ..methods import QSparse
        from .d2dmoe import D2DMoE

        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        train = _take(dm.train_dataloader(), self.router_batches)
        vals = dm.val_dataloader()
        held = _take(vals[0] if isinstance(vals, (list, tuple)) else vals, self.eval_batches)
        model = copy.deepcopy(pl_module.model).float()
        base = copy.deepcopy(model)
        D2DMoE(
            tau=1.0,
            expert_size=self.expert_size,
            router_width=self.router_width,
            router_steps=self.router_steps,
        ).apply(model, None, train)
        rows = sweep(model, "dynk", self.taus, held)
        for s in self.qsparse:
            ref = copy.deepcopy(base)
            QSparse(sparsity=s).apply(ref)
            rows.append(measure_row(ref, f"qsparse S={s:g}", s, held))
        paths = write_outputs(
            rows, Path(trainer.default_root_dir) / "d2dmoe_sweep", "d2dmoe tau sweep (val)"
        )
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(paths["md"].read_text())


def _take(loader: Any, n: int) -> list[torch.Tensor]:
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append(batch["input_ids"].cpu())
    return out


if __name__ == "__main__":
    raise SystemExit(main())
