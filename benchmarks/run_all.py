"""Re-run the benchmarks behind the figures in README.md and benchmarks/README.md, keep their
results as JSON, and regenerate the results tables from that JSON.

    PYTHONPATH=$PWD python3 benchmarks/run_all.py run [--only ID,...] [--repeat N]   # on a GPU
    PYTHONPATH=$PWD python3 benchmarks/run_all.py tables [--check]                  # anywhere
    python3 benchmarks/run_all.py list

``run`` executes every benchmark of :data:`REGISTRY` (or those named by ``--only``) as a
subprocess, collects the ``FIGURE`` lines it prints (:mod:`benchmarks._figures`) and writes
``benchmarks/results/<id>.json`` with the git commit, whether the tree was dirty, the device,
the UTC date, the exact command, the package versions and the figures (the median of
``repeat`` runs, with their min and max). It then regenerates the tables. ``tables`` only
rewrites the text between ``<!-- run_all:<table> begin -->`` and ``<!-- run_all:<table> end
-->`` in benchmarks/README.md from the JSON files; ``--check`` fails when that text is stale.

Every row says the commit its figures were measured at; a row whose benchmark has no result
yet says so instead of showing a number. A goal is judged on the median; when the margin to
it is inside the run-to-run spread (the min-max range of the goal figure, or of the same-run
baseline it is a ratio to) the verdict says so, and one run cannot tell: it says that too.

Adding a benchmark: make its script print ``FIGURE`` lines with
:func:`benchmarks._figures.emit`, and append a :class:`Bench` (script, arguments, the
table rows it feeds) to :data:`REGISTRY`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 benchmarks/run_all.py` without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from benchmarks._figures import parse  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
COLUMNS = ("figure", "value", "goal", "device", "commit", "date", "command")
#: ``{key}`` or ``{key|format spec}`` in a row's value template
PLACEHOLDER = re.compile(r"\{([^{}|]+)(?:\|([^{}]*))?\}")


@dataclass(frozen=True)
class Goal:
    """``key`` must be ``op`` (``"<="`` or ``">="``) ``target``; ``baseline``: the figure the
    ratio divides by (or into), whose run-to-run spread also bounds the ratio's."""

    key: str
    op: str
    target: float
    baseline: str | None = None

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"goal op {self.op!r} must be '<=' or '>='")


@dataclass(frozen=True)
class Row:
    """One table row: ``table`` (marker name), ``figure`` (what is measured) and ``value``, a
    template over the benchmark's figure keys (``"{sparse_gemv.b1_S0.6.excl|.2f}x"``)."""

    table: str
    figure: str
    value: str
    goal: Goal | None = None


@dataclass(frozen=True)
class Bench:
    """A benchmark script run with ``args``; ``rows`` it feeds; ``repeat``: runs whose median
    is reported; ``setup``: ``(path, command)`` pairs run first when ``path`` is missing."""

    id: str
    script: str
    args: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    repeat: int = 1
    setup: tuple[tuple[str, tuple[str, ...]], ...] = ()
    timeout_s: int = 1800

    def command(self) -> str:
        return shlex.join(["python3", f"benchmarks/{self.script}", *self.args])


def _ratio_row(table: str, figure: str, key: str, unit_key: str, goal: Goal | None = None) -> Row:
    """A row showing ``key`` as a ratio and the time ``unit_key`` (us or ms) behind it."""
    unit = "ms" if unit_key.endswith("ms") else "us"
    return Row(table, figure, f"{{{key}|.2f}}x ({{{unit_key}|.1f}} {unit})", goal)


_TS = "train_step"
_SG = "sparse_gemv"
_TG = "ternary_gemv"
_S7 = "sparse_gemv_7b"
_TL = "teal_gemv"
_SHAPES_7B = {
    "qkv": (4096, 12288),
    "o": (4096, 4096),
    "gate_up": (4096, 22016),
    "down": (11008, 4096),
}
_DM = "decode_modes"
_NEW_TOKENS = {"1.3B": 128, "7B": 64}  # decode_modes.NEW_TOKENS
_DECODE_MODES = (
    ("qsparse", "Q-Sparse S=0.6"),
    ("bitnet", "BitNet b1.58"),
    ("bitnet_qsparse", "BitNet+Q-Sparse S=0.6"),
)
_CKPT = "/tmp/qsparse-llama1b"
_MEM = ("memory_continue.py", "run", _CKPT)

REGISTRY: list[Bench] = [
    Bench(
        "train_step_overhead",
        "train_step_overhead.py",
        repeat=3,
        rows=(
            _ratio_row(
                "training",
                "Q-Sparse training step (S=0.6, 374M HF Llama, 8x2048, bf16, eager) vs dense",
                f"{_TS}.eager.qsparse",
                f"{_TS}.eager.qsparse.ms",
                Goal(f"{_TS}.eager.qsparse", "<=", 1.10, f"{_TS}.eager.dense.ms"),
            ),
            _ratio_row(
                "training",
                "BitNet b1.58 + Q-Sparse training step vs dense (eager)",
                f"{_TS}.eager.bitnet+qsparse",
                f"{_TS}.eager.bitnet+qsparse.ms",
                Goal(f"{_TS}.eager.bitnet+qsparse", "<=", 1.25, f"{_TS}.eager.dense.ms"),
            ),
            Row(
                "training",
                "dense step (the baseline of the rows above)",
                f"{{{_TS}.eager.dense.ms|.1f}} ms",
            ),
            Row(
                "training",
                "BitNet b1.58 alone, kernels on / off (PyTorch reference)",
                f"{{{_TS}.eager.bitnet|.2f}}x / {{{_TS}.eager.bitnet_kernels=off|.2f}}x",
            ),
            Row(
                "training",
                "Q-Sparse / BitNet+Q-Sparse step with kernels off (PyTorch reference, torch.topk)",
                f"{{{_TS}.eager.qsparse_kernels=off|.2f}}x / "
                f"{{{_TS}.eager.bitnet+qsparse_kernels=off|.2f}}x",
            ),
        ),
    ),
    Bench(
        "train_step_overhead_compiled",
        "train_step_overhead.py",
        ("--compile", "--only", "qsparse,bitnet,bitnet+qsparse"),
        rows=(
            _ratio_row(
                "training",
                "Q-Sparse training step, torch.compile on both, vs dense",
                f"{_TS}.compiled.qsparse",
                f"{_TS}.compiled.qsparse.ms",
                Goal(f"{_TS}.compiled.qsparse", "<=", 1.10, f"{_TS}.compiled.dense.ms"),
            ),
            _ratio_row(
                "training",
                "BitNet b1.58 + Q-Sparse training step, compiled, vs dense",
                f"{_TS}.compiled.bitnet+qsparse",
                f"{_TS}.compiled.bitnet+qsparse.ms",
                Goal(f"{_TS}.compiled.bitnet+qsparse", "<=", 1.25, f"{_TS}.compiled.dense.ms"),
            ),
            _ratio_row(
                "training",
                "BitNet b1.58 alone, compiled, vs dense",
                f"{_TS}.compiled.bitnet",
                f"{_TS}.compiled.bitnet.ms",
            ),
        ),
    ),
    Bench(
        "topk_kernel",
        "topk_kernel.py",
        rows=tuple(
            Row(
                "training",
                f"fused {label} fwd+bwd vs reference, [8192, 2048] / [8192, 5632]",
                f"{{topk.{name}.2048|.2f}}x / {{topk.{name}.5632|.2f}}x",
            )
            for label, name in (
                ("token top-k", "token_topk"),
                ("token top-k + int8 absmax", "token_topk+int8"),
                ("block top-k 16:32", "block_topk_16:32"),
            )
        )
        + (
            Row(
                "training",
                "forward only at [8192, 2048]: matmul it feeds / torch.topk / fused kernel",
                "{topk.forward.2048.matmul_ms|.3f} / {topk.forward.2048.torch_topk_ms|.3f} / "
                "{topk.forward.2048.kernel_ms|.3f} ms",
            ),
        ),
    ),
    Bench(
        "mfu_compiled",
        "mfu.py",
        (
            "--preset",
            "374M",
            "--batch",
            "8",
            "--seq",
            "2048",
            "--steps",
            "30",
            "--warmup",
            "10",
            "--compile",
        ),  # fmt: skip
        rows=(
            Row(
                "training",
                "dense 374M training stack, 8x2048 bf16-mixed, compile on: MFU",
                "{mfu.compile.mfu|.1f}% ({mfu.compile.tokens_per_s|,.0f} tokens/s, "
                "{mfu.compile.ms_per_step|.1f} ms/step)",
                Goal("mfu.compile.mfu", ">=", 40.0),
            ),
        ),
    ),
    Bench(
        "mfu_eager",
        "mfu.py",
        ("--preset", "374M", "--batch", "8", "--seq", "2048", "--steps", "20", "--warmup", "5"),
        rows=(
            Row(
                "training",
                "dense 374M training stack, eager: MFU",
                "{mfu.eager.mfu|.1f}% ({mfu.eager.tokens_per_s|,.0f} tokens/s, "
                "{mfu.eager.ms_per_step|.1f} ms/step)",
            ),
        ),
    ),
    Bench(
        "train_step_stack",
        "train_step.py",
        (
            "--preset",
            "374M",
            "--batch",
            "8",
            "--seq",
            "2048",
            "--steps",
            "15",
            "--warmup",
            "6",
            "--compile",
        ),  # fmt: skip
        rows=(
            Row(
                "training",
                "training stack, compiled, step time vs dense: Q-Sparse S=0.5 / BitNet / "
                "BitNet+Q-Sparse S=0.6",
                "{stack_step.compile.qsparse.ratio|.2f}x / {stack_step.compile.bitnet.ratio|.2f}x"
                " / {stack_step.compile.bitnet_qsparse.ratio|.2f}x (dense "
                "{stack_step.compile.dense.ms_per_step|.1f} ms)",
            ),
        ),
    ),
    *(
        Bench(
            f"memory_{optim}_{'gc' if gc else 'nogc'}",
            _MEM[0],
            (*_MEM[1:], "--optim", optim, *(("--gc",) if gc else ())),
            setup=((_CKPT, ("memory_continue.py", "make", _CKPT)),),
            rows=(
                Row(
                    "training",
                    f"continued training, 1.3B shape, 8x2048, {optim}, checkpointing "
                    f"{'on' if gc else 'off'}: peak memory, tokens/s",
                    f"{{memory.{optim}.{'gc' if gc else 'nogc'}.peak_gib|.1f}} GiB, "
                    f"{{memory.{optim}.{'gc' if gc else 'nogc'}.tokens_per_s|,.0f}} tokens/s",
                ),
            ),
        )
        for optim, gc in (("adamw8bit", True), ("adamw", True), ("adamw8bit", False))
    ),
    Bench(
        "sparse_gemv",
        "sparse_gemv.py",
        repeat=3,
        rows=(
            _ratio_row(
                "decode",
                "sparse-input GEMV 4096->11008 bf16, batch 1, S=0.6, kept-input list given, "
                "vs cuBLAS",
                f"{_SG}.b1_S0.6.excl",
                f"{_SG}.b1_S0.6.excl_us",
                Goal(f"{_SG}.b1_S0.6.excl", ">=", 2.0, f"{_SG}.b1_S0.6.dense_us"),
            ),
            _ratio_row(
                "decode",
                "same, top-k selection included",
                f"{_SG}.b1_S0.6.incl",
                f"{_SG}.b1_S0.6.incl_us",
            ),
            Row(
                "decode",
                "cuBLAS bf16 baseline of the two rows above",
                f"{{{_SG}.b1_S0.6.dense_us|.1f}} us",
            ),
            Row(
                "decode",
                "same at S=0.5 / 0.7 / 0.8 (incl. / excl. selection)",
                "; ".join(
                    f"{{{_SG}.b1_S{s}.incl|.2f}}x / {{{_SG}.b1_S{s}.excl|.2f}}x"
                    for s in (0.5, 0.7, 0.8)
                ),
            ),
            Row(
                "decode",
                "same at batch 2 / 4 / 8, S=0.6 (incl.)",
                " / ".join(f"{{{_SG}.b{b}_S0.6.incl|.2f}}x" for b in (2, 4, 8)),
            ),
            Row(
                "decode",
                "1.3B projections, S=0.6, batch 1, incl. / excl.: qkv, o, gate_up, down",
                "; ".join(
                    f"{{{_SG}.1.3B_{p}.incl|.2f}}x / {{{_SG}.1.3B_{p}.excl|.2f}}x"
                    for p in ("qkv", "o", "gate_up", "down")
                ),
            ),
        ),
    ),  # fmt: skip
    Bench(
        "ternary_gemv",
        "ternary_gemv.py",
        repeat=3,
        rows=(
            _ratio_row(
                "decode",
                "ternary 2-bit GEMV (int8 activation quantization included), batch 1, vs cuBLAS",
                f"{_TG}.b1.ternary",
                f"{_TG}.b1.ternary_us",
                Goal(f"{_TG}.b1.ternary", ">=", 4.0, f"{_TG}.b1.dense_us"),
            ),
            _ratio_row(
                "decode",
                "ternary + top-k S=0.6 together, batch 1",
                f"{_TG}.b1.ternary_sparse",
                f"{_TG}.b1.ternary_sparse_us",
            ),
            Row(
                "decode",
                "cuBLAS bf16 baseline of the two rows above",
                f"{{{_TG}.b1.dense_us|.1f}} us",
            ),
            Row(
                "decode",
                "ternary at batch 2 / 4 / 8 (dense; + top-k)",
                " / ".join(f"{{{_TG}.b{b}.ternary|.2f}}x" for b in (2, 4, 8))
                + "; "
                + " / ".join(f"{{{_TG}.b{b}.ternary_sparse|.2f}}x" for b in (2, 4, 8)),
            ),
        ),
    ),  # fmt: skip
    *(
        Bench(
            f"decode_{tag}",
            "decode.py",
            ("--batch", "1", "--new-tokens", "128", *extra),
            rows=(
                Row(
                    "decode",
                    f"1.3B decode, batch 1, 128 tokens, CUDA graph, {label}: dense bf16",
                    f"{{decode.{tag}.dense.tokens_per_s|.1f}} tokens/s",
                ),
                Row(
                    "decode",
                    "same: BitNet b1.58 / BitNet+Q-Sparse S=0.6 / Q-Sparse S=0.6 vs dense",
                    " / ".join(
                        f"{{decode.{tag}.{m}.ratio|.2f}}x"
                        for m in ("bitnet", "bitnet_qsparse", "qsparse")
                    ),
                ),
            ),
        )
        for tag, extra, label in (
            ("eager", (), "eager step"),
            ("compile", ("--compile",), "step compiled (inductor)"),
        )
    ),
    # issue 11: 7B projection shapes, sparse GEMV with its selection; decode per mode/preset/batch
    Bench(
        "sparse_gemv_7b",
        "sparse_gemv_7b.py",
        repeat=3,
        rows=tuple(
            _ratio_row(
                "decode",
                f"7B {name} {kin}->{n} sparse GEMV, batch 1, S=0.6, top-k selection included, "
                "threshold carried from the previous call, then the list GEMV (as decode runs "
                "it), vs cuBLAS",
                f"{_S7}.{name}_b1_S0.6.carry_list",
                f"{_S7}.{name}_b1_S0.6.carry_list_us",
                Goal(
                    f"{_S7}.{name}_b1_S0.6.carry_list",
                    ">=",
                    1.5,
                    f"{_S7}.{name}_b1_S0.6.dense_us",
                ),
            )
            for name, (kin, n) in _SHAPES_7B.items()
        )
        + (
            Row(
                "decode",
                "same without the carried threshold (full selection every call); cuBLAS time: "
                "qkv, o, gate_up, down",
                "; ".join(
                    f"{{{_S7}.{p}_b1_S0.6.incl|.2f}}x ({{{_S7}.{p}_b1_S0.6.dense_us|.1f}} us)"
                    for p in _SHAPES_7B
                ),
            ),
            Row(
                "decode",
                "same, carried GEMV instead (`GemvConfig(carry=True)`, not the default: sums the "
                "inputs above the carried band while the selection runs, the rest after it): "
                "qkv, o, gate_up, down",
                "; ".join(
                    f"{{{_S7}.{p}_b1_S0.6.carry|.2f}}x ({{{_S7}.{p}_b1_S0.6.carry_us|.1f}} us)"
                    for p in _SHAPES_7B
                ),
            ),
            *(
                Row(
                    "decode",
                    f"7B input sites with their producer, batch {b}, S=0.6 (RMSNorm -> q|k|v, "
                    "RMSNorm -> gate|up, act(g)*u -> down): the selection kernel computing the "
                    "producer itself, carried threshold, then "
                    + ("the list GEMV" if b == 1 else "one cuBLAS GEMM")
                    + ", vs the torch producer + cuBLAS: qkv; gate_up; down",
                    "; ".join(
                        f"{{{_S7}.{p}_b{b}_S0.6.site_fused|.2f}}x "
                        f"({{{_S7}.{p}_b{b}_S0.6.site_fused_us|.1f}} vs "
                        f"{{{_S7}.{p}_b{b}_S0.6.site_dense_us|.1f}} us)"
                        for p in ("qkv", "gate_up", "down")
                    ),
                )
                for b in (1, 2, 4, 8)
            ),
            *(
                Row(
                    "decode",
                    f"7B shapes, batch {b}: ternary 2-bit GEMV with int8 activations (BitNet "
                    "b1.58), dp4a kernel with one program per column block (the default) / int8 "
                    "tensor-core kernel (opt-in); then with top-k S=0.6 (BitNet+Q-Sparse) the same two, vs "
                    "cuBLAS bf16: qkv; o; gate_up; down",
                    "; ".join(
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_dp4a|.2f}}x / "
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_dot|.2f}}x, "
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_dp4a_topk|.2f}}x / "
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_dot_topk|.2f}}x"
                        for p in _SHAPES_7B
                    ),
                )
                for b in (2, 4, 8)
            ),
            *(
                Row(
                    "decode",
                    f"same, batch {b}, dp4a with the words split over programs on narrow "
                    "outputs (`ternary_split_config`, opt-in: o 2, down 4 programs per column "
                    "block), dense / top-k: o; down",
                    "; ".join(
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_split|.2f}}x / "
                        f"{{{_S7}.{p}_b{b}_S0.6.ternary_split_topk|.2f}}x"
                        for p in ("o", "down")
                    ),
                )
                for b in (2, 4, 8)
            ),
            *(
                Row(
                    "decode",
                    f"7B shapes, batch {b}, S=0.6: top-k from carried thresholds + one cuBLAS "
                    "GEMM on the masked input (what decode runs at batch 2-16) / bit-bisection "
                    "top-k + GEMM / kept-row union kernel, vs cuBLAS: qkv; o; gate_up; down",
                    "; ".join(
                        f"{{{_S7}.{p}_b{b}_S0.6.topk_gemm|.2f}}x / "
                        f"{{{_S7}.{p}_b{b}_S0.6.bisect_gemm|.2f}}x / "
                        f"{{{_S7}.{p}_b{b}_S0.6.incl|.2f}}x"
                        for p in _SHAPES_7B
                    ),
                )
                for b in (2, 4, 8)
            ),
        ),
    ),
    *(
        Bench(
            f"decode_modes_{preset.lower()}_b1",
            "decode_modes.py",
            ("--presets", preset, "--batches", "1", "--hf-batches", ""),
            rows=(
                Row(
                    "decode",
                    f"{preset} decode, batch 1, {_NEW_TOKENS[preset]} tokens, CUDA graph, step "
                    "compiled (inductor): dense bf16",
                    f"{{{_DM}.{preset}.b1.compile.dense.tokens_per_s|.1f}} tokens/s",
                ),
                *(
                    Row(
                        "decode",
                        f"same: {label} vs dense",
                        f"{{{_DM}.{preset}.b1.compile.{mode}.ratio|.2f}}x "
                        f"({{{_DM}.{preset}.b1.compile.{mode}.tokens_per_s|.1f}} tokens/s)",
                        Goal(
                            f"{_DM}.{preset}.b1.compile.{mode}.ratio",
                            ">=",
                            goals[mode],
                            f"{_DM}.{preset}.b1.compile.dense.tokens_per_s",
                        )
                        if mode in goals
                        else None,
                    )
                    for mode, label in _DECODE_MODES
                ),
                Row(
                    "decode",
                    "same: BitNet+Q-Sparse S=0.6 vs BitNet b1.58 alone",
                    f"{{{_DM}.{preset}.b1.compile.bitnet_qsparse.vs_bitnet|.2f}}x",
                    Goal(
                        f"{_DM}.{preset}.b1.compile.bitnet_qsparse.vs_bitnet",
                        ">=",
                        vs_bitnet,
                        f"{_DM}.{preset}.b1.compile.bitnet.tokens_per_s",
                    ),
                ),
            ),
        )
        for preset, goals, vs_bitnet in (
            ("7B", {"qsparse": 1.8, "bitnet": 3.5, "bitnet_qsparse": 4.5}, 1.3),
            ("1.3B", {"qsparse": 1.3}, 1.0),
        )
    ),
    *(
        Bench(
            f"decode_modes_{preset.lower()}_b248",
            "decode_modes.py",
            ("--presets", preset, "--batches", "2,4,8", "--hf-batches", ""),
            rows=tuple(
                Row(
                    "decode",
                    f"{preset} decode, batch {b}, {_NEW_TOKENS[preset]} tokens, CUDA graph, eager "
                    "step: Q-Sparse S=0.6 / BitNet b1.58 / BitNet+Q-Sparse S=0.6 vs dense (goal: "
                    "the slowest no slower than dense)",
                    " / ".join(
                        f"{{{_DM}.{preset}.b{b}.eager.{m}.ratio|.2f}}x"
                        for m in ("qsparse", "bitnet", "bitnet_qsparse")
                    )
                    + f" (dense {{{_DM}.{preset}.b{b}.eager.dense.tokens_per_s|.1f}} tokens/s)",
                    Goal(
                        f"{_DM}.{preset}.b{b}.eager.min.ratio",
                        ">=",
                        1.0,
                        f"{_DM}.{preset}.b{b}.eager.dense.tokens_per_s",
                    ),
                )
                for b in (2, 4, 8)
            ),
        )
        for preset in ("7B", "1.3B")
    ),
    Bench(
        "decode_modes_transformers",
        "decode_modes.py",
        ("--presets", "1.3B,7B", "--batches", "1", "--modes", "dense", "--hf-batches", "1"),
        rows=tuple(
            Row(
                "decode",
                f"transformers `generate` on the same dense {preset} weights, batch 1, "
                f"{_NEW_TOKENS[preset]} tokens, greedy, bf16, eager, best of static / dynamic "
                "cache: tokens/s, vs qsparse dense (compiled step) of the same run",
                f"{{{_DM}.{preset}.b1.transformers.tokens_per_s|.1f}} tokens/s "
                f"({{{_DM}.{preset}.b1.transformers.ratio|.2f}}x; qsparse dense "
                f"{{{_DM}.{preset}.b1.compile.dense.tokens_per_s|.1f}} tokens/s)",
            )
            for preset in ("1.3B", "7B")
        ),
    ),
    # issue 17: TEAL's threshold through the sparse-input GEMV (no selection pass)
    Bench(
        "teal_gemv",
        "teal_gemv.py",
        repeat=3,
        rows=tuple(
            Row(
                "decode",
                f"TEAL threshold on 7B {name} {kin}->{n}, batch 1, S={s}: threshold list + "
                "sparse GEMV / top-k selection + sparse GEMV / same, threshold carried / the "
                "GEMV on a ready list, vs cuBLAS (equal kept fraction)",
                " / ".join(
                    f"{{{_TL}.{name}_S{s}.{p}|.2f}}x"
                    for p in ("threshold", "topk", "topk_carry", "list_only")
                )
                + f" (cuBLAS {{{_TL}.{name}_S{s}.dense_us|.1f}} us, kept "
                f"{{{_TL}.{name}_S{s}.kept_pct|.1f}}%)",
            )
            for name, (kin, n) in _SHAPES_7B.items()
            for s in ("0.4", "0.5")
        ),
    ),
    # issue 15: two GPUs (run on nvidia-h200-x2 with NVLink multicast off, see README)
    Bench(
        "fsdp_scaling",
        "fsdp_scaling.py",
        ("--out", "/tmp/qsparse_fsdp_out", "--steps", "16"),
        rows=(
            Row(
                "multi_gpu",
                "374M preset, Q-Sparse S=0.5, 8 x 2048 tokens per GPU per step: FSDP2 on 2 GPUs "
                "(`trainer=fsdp trainer.devices=2`) vs one GPU (`trainer=gpu`), tokens/s",
                "{fsdp2_over_one_gpu|.2f}x ({fsdp2_tokens_per_s|,.0f} vs "
                "{one_gpu_tokens_per_s|,.0f} tokens/s)",
                Goal("fsdp2_over_one_gpu", ">=", 1.85, "one_gpu_tokens_per_s"),
            ),
            Row(
                "multi_gpu",
                "7B preset, BitNet b1.58 + Q-Sparse S=0.5, FSDP2 on 2 GPUs, activation "
                "checkpointing, 1 x 2048 tokens per GPU: peak memory of rank 0, tokens/s",
                "{fsdp_7b_peak_gib|.1f} GiB, {fsdp_7b_tokens_per_s|,.0f} tokens/s",
            ),
            Row(
                "multi_gpu",
                "FSDP2 resume from the half-way sharded checkpoint: largest per-step training "
                "loss difference to the uninterrupted run",
                "{resume_max_abs_loss_diff|.2e} nats",
            ),
        ),
        timeout_s=900,
    ),
    # exploration scripts behind figures quoted in prose; every figure lands in the JSON
    Bench("gemv_variants", "gemv_variants.py"),
    Bench("sparse_gemv_shapes", "sparse_gemv_shapes.py"),
    Bench("gemv_profile", "gemv_profile.py"),
    Bench(
        "expert_gemv",
        "expert_gemv.py",
        rows=tuple(
            Row(
                "decode",
                f"MoE expert-block down GEMV ({label}, experts of 32, {int(keep * 100)}% of "
                "experts kept, batch 1) vs cuBLAS / vs sparse-input GEMV excl. / incl. top-k, "
                "same kept inputs",
                f"{{expert_gemv.{shape}_keep{keep}.vs_cublas|.2f}}x / "
                f"{{expert_gemv.{shape}_keep{keep}.vs_sparse_excl|.2f}}x / "
                f"{{expert_gemv.{shape}_keep{keep}.vs_sparse_incl|.2f}}x "
                f"({{expert_gemv.{shape}_keep{keep}.expert_us|.1f}} us)",
            )
            for shape, label in (
                ("7B_down", "7B 11008 -> 4096"),
                ("smollm2_down", "SmolLM2 1536 -> 576"),
            )
            for keep in (0.25, 0.4, 0.5)
        ),
    ),
]


# ---------------------------------------------------------------------------------------------
# running


def _git(*args: str) -> str | None:
    """``git <args>`` in the repository, or ``None`` where there is no git or no ``.git``."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit_state() -> tuple[str, bool | None]:
    """``(commit, dirty)``: from git when this is a checkout (dirty: tracked files other than
    the results and the tables differ from the commit); else from ``QSPARSE_COMMIT`` (a copy
    of the tree shipped to a GPU machine without ``.git``, or nested inside another
    checkout, whose commit would be the wrong one), tree state unknown (``None``)."""
    top = _git("rev-parse", "--show-toplevel")
    head = _git("rev-parse", "HEAD") if top and Path(top).resolve() == ROOT else None
    if head is None:
        return os.environ.get("QSPARSE_COMMIT") or "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    dirty = [
        line
        for line in status.splitlines()
        if "benchmarks/results/" not in line and not line.endswith("benchmarks/README.md")
    ]
    return head, bool(dirty)


def provenance() -> dict[str, object]:
    """Commit and tree state (:func:`commit_state`), device, UTC date and versions, recorded
    with every result."""
    commit, dirty = commit_state()
    info: dict[str, object] = {
        "commit": commit,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": "cpu",
        "versions": {"python": sys.version.split()[0]},
    }
    try:
        import torch

        info["versions"]["torch"] = torch.__version__  # type: ignore[index]
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import triton

        info["versions"]["triton"] = triton.__version__  # type: ignore[index]
    except ImportError:
        pass
    return info


def summarize(runs: Sequence[dict[str, dict]]) -> dict[str, dict[str, object]]:
    """Per figure over the runs that reported it: median ``value``, ``min``, ``max``, ``n``."""
    keys = dict.fromkeys(k for r in runs for k in r)
    out: dict[str, dict[str, object]] = {}
    for key in keys:
        vals = [float(r[key]["value"]) for r in runs if key in r]
        unit = next(r[key]["unit"] for r in runs if key in r)
        out[key] = {
            "value": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "unit": unit,
        }
    return out


def run_bench(
    bench: Bench, results_dir: Path, repeat: int | None = None, timeout_s: int | None = None
) -> dict:
    """Run ``bench`` (``repeat`` overrides its run count, ``timeout_s`` its time limit per run)
    and write ``<id>.json``. A run cut off by the limit keeps the figures it printed before
    (and the record says it timed out)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for path, cmd in bench.setup:
        if not Path(path).exists():
            subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / cmd[0]), *cmd[1:]],
                cwd=ROOT,
                env=env,
                check=True,
            )
    record: dict[str, object] = {"bench": bench.id, "command": bench.command(), **provenance()}
    runs, errors = [], []
    for _ in range(repeat or bench.repeat):
        try:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s or bench.timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            errors.append(f"timed out after {timeout_s or bench.timeout_s} s")
            out = exc.stdout or ""
            out = out.decode() if isinstance(out, bytes) else out
            sys.stdout.write(out)
            try:
                partial = parse(out)
            except ValueError:
                partial = {}
            if partial:
                runs.append(partial)
            continue
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            errors.append(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
            continue
        try:
            runs.append(parse(proc.stdout))
        except ValueError as err:  # a malformed or repeated FIGURE line: the script's bug
            errors.append(f"unreadable figures: {err}")
    record.update(runs=runs, figures=summarize(runs), errors=errors)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{bench.id}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# tables


def load_results(results_dir: Path) -> dict[str, dict]:
    """Bench id -> its result record, for every ``*.json`` in ``results_dir``."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        out[record["bench"]] = record
    return out


def fill(template: str, figures: dict[str, dict]) -> str | None:
    """``template`` with every placeholder replaced by its figure's value; ``None`` when one
    of them was not measured."""
    missing = [m.group(1) for m in PLACEHOLDER.finditer(template) if m.group(1) not in figures]
    if missing:
        return None
    return PLACEHOLDER.sub(
        lambda m: format(float(figures[m.group(1)]["value"]), m.group(2) or ".3g"), template
    )


def _spread(fig: dict) -> float:
    """Relative min-max range of one figure over its runs (0 for a single run)."""
    value = abs(float(fig["value"])) or 1.0
    return (float(fig["max"]) - float(fig["min"])) / value


def verdict(goal: Goal, figures: dict[str, dict]) -> str:
    """``"<= 1.1x: met"`` / ``"missed"``, qualified when the margin is inside the spread."""
    text = f"{goal.op} {goal.target:g}"
    fig = figures.get(goal.key)
    if fig is None:
        return text
    value = float(fig["value"])
    met = value <= goal.target if goal.op == "<=" else value >= goal.target
    margin = abs(value - goal.target) / goal.target
    spreads = [_spread(fig)]
    if goal.baseline in figures:
        spreads.append(_spread(figures[goal.baseline]))
    n = int(fig.get("n", 1))
    text += ": met" if met else ": MISSED"
    if n < 2:
        return text + " (1 run: spread unknown)"
    if margin <= max(spreads):
        return text + (
            f" (margin {100 * margin:.1f}% is inside the run-to-run spread, "
            f"{100 * max(spreads):.1f}% over {n} runs)"
        )
    return text + f" (margin {100 * margin:.1f}%, spread {100 * max(spreads):.1f}% over {n} runs)"


def render(table: str, results: dict[str, dict], registry: Sequence[Bench] | None = None) -> str:
    """The Markdown table ``table`` from ``results`` (see :func:`load_results`) for the rows of
    ``registry`` (default :data:`REGISTRY`)."""
    registry = REGISTRY if registry is None else registry
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for bench in registry:
        rows = [r for r in bench.rows if r.table == table]
        if not rows and table == "exploration" and not bench.rows:
            rows = [Row(table, f"every figure of `{bench.script}`", "")]
        record = results.get(bench.id)
        for row in rows:
            if record is None:
                goal = verdict(row.goal, {}) if row.goal else "-"
                cells = [
                    row.figure,
                    "not measured yet",
                    goal,
                    "-",
                    "-",
                    "-",
                    f"`{bench.command()}`",
                ]
            else:
                figures = record["figures"]
                if row.value:
                    value = fill(row.value, figures)
                else:
                    value = f"{len(figures)} figures in `benchmarks/results/{bench.id}.json`"
                if value is None:
                    value = "failed" if record.get("errors") else "not reported"
                elif record.get("errors"):
                    value += f" ({len(record['errors'])} failed run(s))"
                state = {True: "+dirty", False: "", None: " (tree state unknown)"}
                commit = str(record["commit"])[:10] + state[record.get("dirty")]
                cells = [
                    row.figure,
                    value,
                    verdict(row.goal, figures) if row.goal else "-",
                    str(record["device"]),
                    f"`{commit}`",
                    str(record["date"])[:10],
                    f"`{record['command']}`",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables_in(text: str) -> list[str]:
    """Names of the ``<!-- run_all:<name> begin -->`` blocks in ``text``."""
    return re.findall(r"<!-- run_all:(\S+) begin -->", text)


def regenerate(text: str, results: dict[str, dict], registry: Sequence[Bench] | None = None) -> str:
    """``text`` with every ``run_all`` block replaced by its freshly rendered table."""
    for name in tables_in(text):
        begin, end = f"<!-- run_all:{name} begin -->", f"<!-- run_all:{name} end -->"
        if end not in text:
            raise ValueError(f"{begin} has no matching {end}")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = render(name, results, registry)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def update_readme(readme: Path, results_dir: Path, check: bool = False) -> bool:
    """Regenerate the tables of ``readme``; return whether it changed (``check``: only
    compare, write nothing)."""
    old = readme.read_text()
    new = regenerate(old, load_results(results_dir))
    if new != old and not check:
        readme.write_text(new)
    return new != old


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run benchmarks (GPU), write results JSON, update tables")
    r.add_argument("--only", default="", help="comma list of benchmark ids (default: all)")
    r.add_argument("--repeat", type=int, default=None, help="runs per benchmark (override)")
    r.add_argument(
        "--timeout",
        type=int,
        default=None,
        help="seconds per run (override; figures printed before the limit are kept)",
    )
    t = sub.add_parser("tables", help="regenerate the tables from the results JSON")
    t.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    sub.add_parser("list", help="print the registry")
    for p in (r, t):
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for b in REGISTRY:
            print(f"{b.id:32s} x{b.repeat} {len(b.rows)} rows  {b.command()}")
        return 0
    if args.cmd == "run":
        ids = [i for i in args.only.split(",") if i]
        unknown = sorted(set(ids) - {b.id for b in REGISTRY})
        if unknown:
            ap.error(f"--only: unknown {unknown}; `run_all.py list` shows the ids")
        for bench in REGISTRY:
            if not ids or bench.id in ids:
                print(f"== {bench.id}: {bench.command()}", flush=True)
                record = run_bench(bench, args.results, args.repeat, args.timeout)
                for err in record["errors"]:
                    print(f"!! {bench.id}: {err}", file=sys.stderr)
    changed = update_readme(args.readme, args.results, check=getattr(args, "check", False))
    if getattr(args, "check", False) and changed:
        print(f"{args.readme}: tables are stale; run `benchmarks/run_all.py tables`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
