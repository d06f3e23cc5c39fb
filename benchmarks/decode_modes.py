"""Figure: end-to-end greedy decode tokens/s per mode (dense bf16, Q-Sparse S=0.6, BitNet b1.58,
BitNet + Q-Sparse S=0.6) on the 1.3B and 7B presets (random weights) at batch 1, 2, 4 and 8,
each relative to the dense run of the same preset and batch in the same process
(:func:`qsparse.cli.generate.measure`: fused projections, Triton GEMVs, CUDA graph; the step
compiled by inductor at the batch sizes in ``--compile-batches``), plus transformers' own
``generate`` on the same dense weights (greedy, static and dynamic cache, eager; the best is
reported).

    PYTHONPATH=$PWD python3 benchmarks/decode_modes.py --json decode.json
    python3 benchmarks/decode_modes.py --plot decode.json docs/decode_modes.png   # no GPU

Rows are appended to the JSON file after every measurement, so a run cut short keeps what
it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from qsparse.cli.generate import _parser, measure
from qsparse.generate import MODES

NEW_TOKENS = {"1.3B": 128, "7B": 64}


def transformers_baseline(preset: str, batch: int, new_tokens: int) -> dict[str, float]:
    """tokens/s of ``transformers.LlamaForCausalLM.generate`` (greedy, bf16, eager) on the
    preset's dense weights (seed 0, as the qsparse runs), per cache implementation."""
    from transformers import LlamaForCausalLM as HFLlama

    from qsparse.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_preset(preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = LlamaForCausalLM(cfg).to(torch.bfloat16)
        hf = HFLlama(cfg.to_hf_config()).to(torch.bfloat16).eval()
    hf.load_state_dict(ours.state_dict())
    del ours
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen).cuda()
    out = {}
    for cache in ("static", "dynamic"):
        kw = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation=cache,
            pad_token_id=0,
        )
        with torch.no_grad():
            hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(ids, **kw)
            torch.cuda.synchronize()
        out[cache] = batch * new_tokens / (time.perf_counter() - start)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _save(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


def run(args: argparse.Namespace) -> None:
    rows: list[dict] = []
    for preset in args.presets.split(","):
        n = NEW_TOKENS.get(preset, 64)
        for batch in [int(b) for b in args.batches.split(",")]:
            argv = ["--preset", preset, "--batch", str(batch), "--new-tokens", str(n)]
            compiled = str(batch) in args.compile_batches.split(",")
            if compiled:
                argv.append("--compile")
            start = time.perf_counter()
            for mode, tps, ratio in measure(_parser().parse_args(argv), list(MODES)):
                rows.append(
                    dict(preset=preset, batch=batch, mode=mode, tokens_per_s=tps, ratio=ratio)
                    | dict(compiled=compiled, new_tokens=n)
                )
                print(f"RATIO decode {preset} batch {batch} {mode}: {ratio:.2f}x ({tps:.1f} tok/s)")
            _save(args.json, rows)
            print(f"# {preset} batch {batch}: {time.perf_counter() - start:.0f} s", flush=True)
            if batch in [int(b) for b in args.hf_batches.split(",") if b]:
                dense = next(r for r in rows[::-1] if r["mode"] == "dense")["tokens_per_s"]
                for cache, tps in transformers_baseline(preset, batch, n).items():
                    rows.append(
                        dict(preset=preset, batch=batch, mode=f"transformers_{cache}")
                        | dict(tokens_per_s=tps, ratio=tps / dense, compiled=False, new_tokens=n)
                    )
                    print(
                        f"RATIO decode {preset} batch {batch} transformers generate ({cache} "
                        f"cache, eager): {tps / dense:.2f}x of qsparse dense ({tps:.1f} tok/s)"
                    )
                _save(args.json, rows)


def plot(src: str, dst: str) -> None:
    """Bar chart of tokens/s per mode, one panel per preset, bars grouped by batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(src).read_text())
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        sub = [r for r in rows if r["preset"] == preset]
        batches = sorted({r["batch"] for r in sub})
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            vals = [
                next((r["tokens_per_s"] for r in sub if r["batch"] == b and r["mode"] == mode), 0)
                for b in batches
            ]
            ax.bar([i + j * width for i in range(len(batches))], vals, width, label=mode)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))])
        ax.set_xticklabels(
            [
                f"batch {b}"
                + (" (compiled)" if any(r["compiled"] for r in sub if r["batch"] == b) else "")
                for b in batches
            ]
        )
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{preset} preset, greedy decode, H200")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="1.3B,7B")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--compile-batches", default="1", help="batch sizes run with --compile")
    ap.add_argument("--hf-batches", default="1", help="batch sizes with the transformers row")
    ap.add_argument("--json", help="write the rows here (after each measurement)")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only plot a JSON file")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
    else:
        run(args)


if __name__ == "__main__":
    main()
