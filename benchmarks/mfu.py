"""Model FLOPs utilisation of the full training stack (LMModule + Lightning Trainer).

Trains the qsparse Llama ``--preset`` (default: the dense 374M reference model) on uniform
random tokens for ``--steps`` optimizer steps at ``--batch`` x ``--seq`` tokens, bf16-mixed,
optionally ``torch.compile``-d, and reports tokens/s and

    MFU = tokens_per_s * flops_per_token / peak_flops(device, bf16)

with ``flops_per_token = LlamaConfig.flops_per_token(seq)`` (6 N + 12 L d T, dense) and the
peak from :mod:`qsparse.training.flops` (H100 SXM / H200 bf16: 989 TFLOP/s). Time is taken
over the steps after ``--warmup`` (compilation), one device sync per measurement window.

    python benchmarks/mfu.py --preset 374M --batch 8 --seq 2048 --steps 40 --compile
    python benchmarks/mfu.py --preset tiny --batch 2 --seq 64 --steps 6 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks._figures import emit
from qsparse.data.random_tokens import RandomTokenDataModule
from qsparse.nn.config import QUANT_PRESETS
from qsparse.training.callbacks import TokenThroughputMonitor
from qsparse.training.module import LMModule


def run(args: argparse.Namespace) -> dict:
    L.seed_everything(0, verbose=False)
    torch.set_float32_matmul_precision("high")
    from qsparse.models.presets import PRESETS

    vocab = PRESETS[args.preset]["vocab_size"]
    dm = RandomTokenDataModule(
        vocab_size=vocab,
        seq_len=args.seq,
        batch_size=args.batch,
        num_train=args.batch * (args.steps + args.warmup + 4),
        num_val=args.batch,
    )
    sparsity = {"ratio": args.sparsity, "pattern": "token_topk"} if args.sparsity > 0 else None
    quant = dict(QUANT_PRESETS["bitnet"]) if args.bitnet else None
    module = LMModule(
        model={"preset": args.preset, "max_position_embeddings": max(args.seq, 128)},
        sparsity=sparsity,
        quant=quant,
        optim={
            "_target_": "torch.optim.AdamW",
            "lr": 3e-4,
            "betas": [0.9, 0.95],
            "weight_decay": 0.1,
            "fused": None,
        },
        scheduler={
            "_target_": "qsparse.training.optim.warmup_decay",
            "warmup_steps": 10,
            "min_lr": 3e-5,
        },
        compile=args.compile,
    )
    monitor = TokenThroughputMonitor(every_n_steps=args.steps, warmup_steps=args.warmup)
    gpu = args.device == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[monitor],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    if not monitor.last:
        raise RuntimeError("no throughput window completed; raise --steps")
    cfg = module.model.config
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "preset": args.preset,
        "params": int(sum(p.numel() for p in module.model.parameters())),
        "batch": args.batch,
        "seq": args.seq,
        "compile": args.compile,
        "sparsity": args.sparsity,
        "bitnet": args.bitnet,
        "precision": "bf16-mixed" if gpu else "32-true",
        "flops_per_token": cfg.flops_per_token(args.seq),
        "tokens_per_s": monitor.last["perf/tokens_per_s"],
        "step_time_ms": 1000 * monitor.last["perf/step_time_s"],
        "mfu": monitor.last.get("perf/mfu"),
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "wall_s_including_compile": wall,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "torch": torch.__version__,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="374M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured steps (compilation)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sparsity", type=float, default=0.0, help="top-k S (0 = dense)")
    p.add_argument("--bitnet", action="store_true", help="BitNet b1.58 (ternary, int8, SubLN)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append the JSON result to this file")
    args = p.parse_args()
    result = run(args)
    line = json.dumps(result)
    print(line)
    mfu = result["mfu"]
    print(
        f"{result['device']} {args.preset} {args.batch}x{args.seq} compile={args.compile} "
        f"S={args.sparsity} bitnet={args.bitnet}: {result['tokens_per_s']:,.0f} tokens/s, "
        f"{result['step_time_ms']:.1f} ms/step, MFU "
        + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a (no peak for this device)")
    )
    if args.out:
        with Path(args.out).open("a") as fh:
            fh.write(line + "\n")
    tag = "compile" if args.compile else "eager"
    emit(f"mfu.{tag}.tokens_per_s", result["tokens_per_s"], "tokens/s")
    emit(f"mfu.{tag}.ms_per_step", result["step_time_ms"], "ms")
    if mfu is not None:
        emit(f"mfu.{tag}.mfu", 100 * mfu, "%")


if __name__ == "__main__":
    main()
