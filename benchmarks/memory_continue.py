"""Peak GPU memory and tokens/s of continued training of a >= 1B Llama (issue 4).

A Llama with the paper's 1.3B shape (``qsparse.models.llama.PRESETS["1.3B"]``: d=2048,
F=5460, 24 layers, 32 heads, V=32000, untied head; SiLU kept as in a pretrained Llama) is
randomly initialised and saved once as a transformers folder (bf16), then trained with the
real stack: ``qsparse.training.run.train`` on ``recipe=continue/gpu_8bit`` (model=hf,
Q-Sparse S=0.5 with a sparsity warm-up, 8-bit AdamW, activation checkpointing, bf16
autocast) with random-token data (``data=random``: throughput and memory do not depend on
the text). Each variant runs in its own process so the peak is its own.

    PYTHONPATH=$PWD python3 benchmarks/memory_continue.py make /tmp/llama1b
    PYTHONPATH=$PWD python3 benchmarks/memory_continue.py run /tmp/llama1b --optim adamw8bit \
        --gc --steps 12 --json out.json

``peak_gib`` = ``torch.cuda.max_memory_allocated()`` over the whole run (weights, optimizer
state, activations, gradients); ``tokens_per_s`` from the TokenThroughputMonitor (steps after
the first two).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks._figures import emit


def make_checkpoint(path: str, preset: str = "1.3B") -> None:
    """Random-init transformers Llama of ``preset`` saved (bf16, safetensors) at ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    from qsparse.models.config import LlamaConfig
    from qsparse.models.hf_config import to_hf_config

    cfg = to_hf_config(
        LlamaConfig.from_preset(preset, hidden_act="silu"), bos_token_id=1, eos_token_id=2
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"checkpoint": path, "preset": preset, "parameters": n}))


def _last_metric(run_dir: Path, key: str) -> float | None:
    import csv

    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        values = [r[key] for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return float(values[-1]) if values else None


def run(args: argparse.Namespace) -> dict:
    import torch
    from hydra import compose, initialize_config_module

    from qsparse.training import config as _schemas  # noqa: F401
    from qsparse.training.run import train

    vocab = json.loads((Path(args.path) / "config.json").read_text())["vocab_size"]
    overrides = [
        "recipe=continue/gpu_8bit",
        f"model.path={args.path}",
        "model.require_tokenizer=false",
        "data=random",
        "~data.tokenizer",  # random tokens: no tokenizer
        f"data.vocab_size={vocab}",
        f"data.seq_len={args.seq}",
        f"data.batch_size={args.batch}",
        f"data.num_train={args.batch * (args.steps + 2)}",
        f"optim={args.optim}",
        "optim.lr=5e-5",
        "optim.weight_decay=0.01",
        f"gradient_checkpointing={'true' if args.gc else 'false'}",
        f"sparsity.ratio={args.sparsity}",
        f"trainer.max_steps={args.steps}",
        "trainer.limit_val_batches=1",  # one validation batch at the end: the run summary
        f"trainer.val_check_interval={args.steps}",  # (params, tokens/s) reports after it
        "data.num_val=8",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint=null",
        "callbacks.throughput.every_n_steps=2",
        "callbacks.throughput.warmup_steps=2",
        f"callbacks.sparsity_warmup.steps={max(1, args.steps // 3)}",
        "callbacks.summary.plot=false",
        "export=false",
        "logger=csv",
        f"run_dir={args.run_dir}",
        "scheduler.warmup_steps=2",
    ]
    if args.trainer == "cpu":  # smoke test of this script on a machine without a GPU
        overrides += ["trainer=cpu"]
    with initialize_config_module("qsparse.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cuda = torch.cuda.is_available() and args.trainer == "gpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    result = {
        "optim": args.optim,
        "gradient_checkpointing": args.gc,
        "sparsity": args.sparsity,
        "batch": args.batch,
        "seq_len": args.seq,
        "steps": args.steps,
        "parameters": summary.get("params_total"),
        "activated_parameters": summary.get("params_activated"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_loss": _last_metric(Path(args.run_dir), "train/loss"),
        "wall_s": wall,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    print(json.dumps(result))
    key = f"memory.{args.optim}.{'gc' if args.gc else 'nogc'}"
    if result["peak_gib"] is not None:
        emit(f"{key}.peak_gib", result["peak_gib"], "GiB")
    if result["tokens_per_s"] is not None:
        emit(f"{key}.tokens_per_s", result["tokens_per_s"], "tokens/s")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="save a random-init Llama checkpoint folder")
    m.add_argument("path")
    m.add_argument("--preset", default="1.3B")
    r = sub.add_parser("run", help="continued training on the checkpoint; print peak/tokens/s")
    r.add_argument("path")
    r.add_argument("--optim", default="adamw8bit", choices=("adamw8bit", "adamw"))
    r.add_argument("--gc", action="store_true", help="activation checkpointing")
    r.add_argument("--sparsity", type=float, default=0.5)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--steps", type=int, default=12)
    r.add_argument(
        "--run-dir",
        default=None,
        help="run folder (must not hold a run); default: a new temporary folder per run, so "
        "that the variants of one benchmark session never meet each other's finished runs",
    )
    r.add_argument("--json", default=None, help="append the result as a json line")
    r.add_argument("--trainer", default="gpu", choices=("gpu", "cpu"), help="cpu: smoke test")
    args = p.parse_args()
    if args.cmd == "make":
        make_checkpoint(args.path, args.preset)
    else:
        if args.run_dir is None:
            args.run_dir = tempfile.mkdtemp(prefix="qsparse-memory-continue-")
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
