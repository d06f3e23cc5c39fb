"""Figure: training-step time of Q-Sparse / BitNet b1.58 / both, relative to dense, same run.

HF ``LlamaForCausalLM`` with the 374M shape (d=2048, F=5632, 6 layers, 16 heads, V=32000,
SiLU kept so only the sparsifiers differ), bf16 weights, batch 8 x 2048, fused AdamW, one
full step (forward, backward, optimizer). Each variant is a fresh model converted with
``qsparse.sparsify`` and timed (median of CUDA-event steps) against the dense step measured in
the same process. ``kernels=off`` sets ``qsparse.kernels.ENABLED = False`` (the PyTorch
reference). Since commit d7fa29e, qsparse.nn itself routes BitLinear's weight ternarization
and the dense-int8 activation path through :mod:`qsparse.kernels` on CUDA (the variants named
``+ternary kernel`` patched that in before then and were dropped).

    PYTHONPATH=$PWD python3 benchmarks/train_step_overhead.py [--compile]

Goals (issue 5): Q-Sparse <= 1.10x dense, BitNet + Q-Sparse <= 1.25x.
"""

from __future__ import annotations

import argparse
import contextlib
import gc

import torch

import qsparse
import qsparse.kernels as K
from benchmarks._figures import emit
from benchmarks._timing import row, time_cuda
from qsparse.nn.config import QuantConfig, SparsityConfig


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


@contextlib.contextmanager
def kernel_routing(enabled: bool):
    """Switch the kernels on (``qsparse.nn``'s default on CUDA) or off (PyTorch reference)."""
    old_enabled = K.ENABLED
    K.ENABLED = enabled
    try:
        yield
    finally:
        K.ENABLED = old_enabled


def step_time(args, sparsity, quant, enabled=True) -> float:
    model = build(args)
    if sparsity is not None or quant is not None:
        qsparse.sparsify(model, sparsity=sparsity, quant=quant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if args.compile else model
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")

    def step():
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with kernel_routing(enabled):
        ms = time_cuda(step, warmup=args.warmup, iters=args.iters)
    model = opt = step_model = None  # free before the next variant
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default="", help="comma list of variant names to run")
    args = ap.parse_args()
    sp = SparsityConfig(ratio=args.ratio)
    bitnet = QuantConfig(weights="ternary", act_bits=8)
    variants = {
        "qsparse": (sp, None, True, 1.10),
        "qsparse kernels=off": (sp, None, False, None),
        "bitnet": (None, bitnet, True, None),
        "bitnet kernels=off": (None, bitnet, False, None),
        "bitnet+qsparse": (sp, bitnet, True, 1.25),
        "bitnet+qsparse kernels=off": (sp, bitnet, False, None),
    }
    only = [v for v in args.only.split(",") if v]
    dense = step_time(args, None, None)
    mode = "compiled" if args.compile else "eager"
    print(f"# dense step {dense:.1f} ms ({args.batch}x{args.seq} tokens, {mode})", flush=True)
    print(row("variant", "step ms", "ratio vs dense", "goal"))
    print(row("---", "---", "---", "---"))
    print(row("dense", f"{dense:.1f}", "1.00x", ""))
    emit(f"train_step.{mode}.dense.ms", dense, "ms")
    for name, (s, q, enabled, goal) in variants.items():
        if only and name not in only:
            continue
        ms = step_time(args, s, q, enabled)
        ratio = ms / dense
        verdict = "" if goal is None else (f"<= {goal}x " + ("met" if ratio <= goal else "MISSED"))
        print(row(name, f"{ms:.1f}", f"{ratio:.2f}x", verdict), flush=True)
        print(f"RATIO train_step[{mode}] {name.replace(' ', '_')} {ratio:.3f}", flush=True)
        emit(f"train_step.{mode}.{name.replace(' ', '_')}", ratio)
        emit(f"train_step.{mode}.{name.replace(' ', '_')}.ms", ms, "ms")


if __name__ == "__main__":
    main()
