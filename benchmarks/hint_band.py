"""How far each site's top-k threshold moves from one decode step to the next, and how many
histogram passes the carried-threshold selection spends on it, with the band fixed at one
key value per bin and with the band that widens (``_threshold_hinted``).

Greedy decode of a preset (random weights, seed 0, as ``qsparse-generate``) in one mode; at
every step the k-th largest |v| of each site's input row (after its SubLN, where the mode has
one) is read as a bf16 key (``thr >> 16``), and consecutive keys give the move ``d``. Passes
per call follow the kernel's rule (the 32-bin histogram: bins of ``2^e`` key values from
``h - 15 * 2^e``): 1 for a hit at e = 0, 2 for a hit at e > 0 (the second pass inside the bin),
1 + 3 for a miss (the full radix select of a bf16 key); e grows at once to the narrowest
band that held ``d`` and shrinks by one after 8 calls in a row a half-wide band held. Ratios:
fixed-width passes over widening passes, per site kind (q|k|v, o, gate|up, down).

    PYTHONPATH=$PWD python3 benchmarks/hint_band.py --preset 1.3B --mode qsparse --steps 24

    PYTHONPATH=$PWD python3 benchmarks/hint_band.py --checkpoint PATH --prompt 64   # real weights

Runs on the CPU (bf16, the model's own forward without a cache: about 1 min at 1.3B). A
checkpoint decodes after the first ``--prompt`` tokens of the bundled ``--text`` corpus.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks._figures import emit
from qsparse.dtypes import default_dtype
from qsparse.generate import convert
from qsparse.models import LlamaConfig, LlamaForCausalLM
from qsparse.nn.linear import ActivationSparsifier

HALF, NDIG, CALM = 15, 3, 8  # 32 bins (bins 1..30 inner), bf16 radix digits, calls to shrink
KINDS = {"self_attn": "qkv", "o_proj": "o", "mlp": "gate_up", "down_proj": "down"}


def fits(d: int, e: int) -> bool:
    """The band of bin width ``2^e`` around the carried key holds a move of ``d`` keys."""
    return -(HALF << e) <= d < (HALF << e)


def passes(moves: list[int], widen: bool) -> list[int]:
    """Histogram passes per call for a site whose threshold key moves by ``moves``."""
    e, calm, out = 0, 0, []
    for d in moves:
        out.append((1 if e == 0 else 2) if fits(d, e) else 1 + NDIG)
        if not widen:
            continue
        need = next((j for j in range(3) if fits(d, j)), 3)
        if need > e:
            e, calm = need, 0
        elif e > 0 and fits(d, e - 1):
            calm += 1
            if calm >= CALM:
                e, calm = e - 1, 0
        else:
            calm = 0
    return out


def threshold_keys(
    preset: str,
    mode: str,
    steps: int,
    prompt: int,
    checkpoint: str | None,
    text: str,
    init_bf16: bool = False,
) -> dict[str, list[int]]:
    """Per site (module name): the bf16 key of its k-th largest |v| at each decode step. A
    ``checkpoint`` decodes after the first ``prompt`` tokens of the corpus ``text``; a preset
    (random weights) after random tokens, built in fp32 and cast (as ``qsparse-generate``), or
    with ``init_bf16`` drawn in bf16 directly (half the peak memory: 7B on a 24 GiB host)."""
    torch.manual_seed(0)
    if checkpoint:
        from transformers import AutoTokenizer

        from qsparse.data.documents import read_documents
        from qsparse.models.hf import load

        model = convert(load(checkpoint, dtype=torch.bfloat16).eval(), mode, 0.6)
        tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        ids = tok("\n\n".join(read_documents(text)[:20]), return_tensors="pt").input_ids
        ids = ids[:, :prompt]
    else:
        cfg = LlamaConfig.from_preset(preset)
        with default_dtype(torch.bfloat16 if init_bf16 else torch.get_default_dtype()):
            model = LlamaForCausalLM(cfg)
        model = convert(model.to(torch.bfloat16).eval(), mode, 0.6)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=gen)
    keys: dict[str, list[int]] = defaultdict(list)

    def hook(name: str):
        def record(mod: ActivationSparsifier, args: tuple) -> None:
            v = args[0] if mod.norm is None else mod.norm(args[0])
            kth = v[:, -1].float().abs().topk(mod.keep(), dim=-1).values[0, -1]
            keys[name].append(int(kth.view(torch.int32)) >> 16)

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, ActivationSparsifier):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for _ in range(steps + 1):  # the first forward is the prompt's
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.3B")
    ap.add_argument("--mode", default="qsparse", choices=("qsparse", "bitnet_qsparse"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--checkpoint", default=None, help="a local HF folder instead of a preset")
    ap.add_argument("--text", default="convention_speeches", help="the checkpoint's prompt")
    ap.add_argument(
        "--init-bf16",
        action="store_true",
        help="draw a preset's random weights in bf16 (7B fits a 24 GiB host; other weights "
        "than qsparse-generate's fp32 draw)",
    )
    args = ap.parse_args()
    keys = threshold_keys(
        args.preset,
        args.mode,
        args.steps,
        args.prompt,
        args.checkpoint,
        args.text,
        args.init_bf16,
    )
    if args.checkpoint:
        args.preset = Path(args.checkpoint).name
    moves: dict[str, list[list[int]]] = defaultdict(list)
    for name, ks in keys.items():
        # the prompt's key and the first step's move from it are not decode moves
        moves[KINDS[name.split(".")[-2]]].append(
            [b - a for a, b in zip(ks[1:-1], ks[2:], strict=False)]
        )
    print(f"{args.preset} {args.mode}, {args.steps} steps: site | hit (one width) | "
          "|d| p50 / p95 | passes fixed | passes widening | fixed / widening")  # fmt: skip
    tag = f"hint_band.{args.preset}.{args.mode}"
    for kind in KINDS.values():
        flat = sorted(abs(d) for m in moves[kind] for d in m)
        hit = sum(fits(d, 0) for m in moves[kind] for d in m) / len(flat)
        fixed = sum(sum(passes(m, False)) for m in moves[kind]) / len(flat)
        wide = sum(sum(passes(m, True)) for m in moves[kind]) / len(flat)
        p50, p95 = flat[len(flat) // 2], flat[int(0.95 * (len(flat) - 1))]
        print(
            f"{kind} | {hit:.2f} | {p50} / {p95} | {fixed:.2f} | {wide:.2f} | {fixed / wide:.2f}x"
        )
        emit(f"{tag}.{kind}.hit_one_width", 100 * hit, "%")
        emit(f"{tag}.{kind}.passes_ratio", fixed / wide, "x")


if __name__ == "__main__":
    main()
