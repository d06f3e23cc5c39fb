"""Figure: the decode attention kernel alone, its first cached block loaded before the step's
position against after it (``qsparse.kernels.decode_attention.PRELOAD_FIRST_BLOCK``), in the
same run, beside the model's own path (RoPE, two cache writes, masked SDPA).

One new token (batch 1, bf16) over a static cache of the length ``qsparse-generate`` decodes
into (prompt 16 + the preset's new tokens: 7B 80, 1.3B 144 positions), at the middle and the
last position. Each call sits in a CUDA graph that cycles the caches of every layer of the
preset (32 or 24 layers), so the cached rows come from L2 or memory as in a decode step.

    PYTHONPATH=$PWD python3 benchmarks/decode_attention_kernel.py [--presets 7B 1.3B]

``FIGURE decode_attention_kernel.<preset>.p<pos>.<variant>.us`` (variants ``preload``,
``after_pos``, ``model``) and ``.preload.ratio`` (``after_pos`` time / ``preload`` time: above
1 means the preload is faster).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._figures import emit
from benchmarks._timing import time_graph
from qsparse.kernels import decode_attention as DA
from qsparse.models.presets import PRESETS
from qsparse.models.rope import RotaryEmbedding

#: cache length qsparse-generate decodes into: prompt 16 + the preset's new tokens
LENGTHS = {"7B": 16 + 64, "1.3B": 16 + 128}


def _calls(preset: str, pos: int, fn) -> list:
    """One call of ``fn`` per layer of ``preset``, each on its own caches (bf16, random)."""
    cfg = PRESETS[preset]
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    d, length = hidden // heads, LENGTHS[preset]
    dev, bf16 = "cuda", torch.bfloat16
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(length, device=dev)[None], bf16)
    p = torch.tensor([pos], device=dev)
    calls = []
    for _ in range(layers):
        q, k, v = (torch.randn(1, hidden, device=dev, dtype=bf16) for _ in range(3))
        kc, vc = (torch.randn(1, heads, length, d, device=dev, dtype=bf16) for _ in range(2))
        calls.append(lambda q=q, k=k, v=v, kc=kc, vc=vc: fn(q, k, v, cos[0], sin[0], kc, vc, p))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["7B", "1.3B"], choices=sorted(LENGTHS))
    args = ap.parse_args()
    for preset in args.presets:
        length = LENGTHS[preset]
        for pos in (length // 2, length - 1):
            times = {}
            for name, preload, fn in (
                ("preload", True, DA.decode_attention),
                ("after_pos", False, DA.decode_attention),
                ("model", True, DA.decode_attention_reference),
            ):
                shipped, DA.PRELOAD_FIRST_BLOCK = DA.PRELOAD_FIRST_BLOCK, preload
                try:
                    times[name] = time_graph(_calls(preset, pos, fn))
                finally:
                    DA.PRELOAD_FIRST_BLOCK = shipped
                emit(f"decode_attention_kernel.{preset}.p{pos}.{name}.us", times[name], "us")
            ratio = times["after_pos"] / times["preload"]
            emit(f"decode_attention_kernel.{preset}.p{pos}.preload.ratio", ratio)
            print(
                f"RATIO {preset} pos {pos}: preload {times['preload']:.2f} us, after pos "
                f"{times['after_pos']:.2f} us ({ratio:.3f}x), model {times['model']:.2f} us"
            )


if __name__ == "__main__":
    main()
