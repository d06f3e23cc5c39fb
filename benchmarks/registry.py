"""The registry of the benchmarks behind the figures of README.md and benchmarks/README.md:
for each, the script and its arguments, how many runs to take the median of, the table rows
it feeds (value templates over its ``FIGURE`` keys, goals), and the device-call group it runs
in with its estimated GPU time (:data:`GROUPS`). ``benchmarks/run_all.py`` runs it.

Estimates (``est_s``) are seconds on one H200 for the whole entry at its registered repeat
count, process starts, Triton/inductor compilation (the first run compiles, later runs hit the
caches) and model builds included, read off each script's steps, shapes and sweeps and the
durations of earlier device calls; ``run_all.py list`` prints them beside the wall time the
last run recorded. ``setup_s``: the one-off setup step (a checkpoint) counted once per group.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass


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
    summary: str = ""  # its label in README.md's generated summary (empty: not quoted there)


@dataclass(frozen=True)
class Bench:
    """A benchmark script run with ``args``; ``rows`` it feeds; ``repeat``: runs whose median
    is reported; ``setup``: ``(path, command)`` pairs run first when ``path`` is missing;
    ``group``: the device call it belongs to (:data:`GROUPS`); ``est_s``: estimated GPU
    seconds of all its runs, ``setup_s`` of its setup."""

    id: str
    script: str
    args: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    repeat: int = 1
    setup: tuple[tuple[str, tuple[str, ...]], ...] = ()
    timeout_s: int = 1800
    group: str = "exploration"
    est_s: int = 60
    setup_s: int = 0

    def command(self) -> str:
        return shlex.join(["python3", f"benchmarks/{self.script}", *self.args])


def _ratio_row(
    table: str, figure: str, key: str, unit_key: str, goal: Goal | None = None, summary: str = ""
) -> Row:
    """A row showing ``key`` as a ratio and the time ``unit_key`` (us or ms) behind it."""
    unit = "ms" if unit_key.endswith("ms") else "us"
    return Row(table, figure, f"{{{key}|.2f}}x ({{{unit_key}|.1f}} {unit})", goal, summary)


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
_B1_MODES = ("--modes", "dense,qsparse,bitnet,bitnet_qsparse")
#: decode_variants.py runs at 7B: (id suffix, mode, variants, estimate in s). The PDL chain
#: and GLU runs recorded at 55b427f and 39edc2d predate the GLU default for ternary sites, so
#: they name the same comparison `glu_selection` where these arguments now say
#: `no_glu_selection`.
_DECODE_VARIANTS_7B = (
    ("bitnet", "bitnet", "default,no_pdl,no_residual_sum", 130),
    ("qsparse", "qsparse", "default,no_pdl,no_residual_sum", 130),
    ("bitnet_qsparse", "bitnet_qsparse", "default,no_residual_sum", 100),
    ("qsparse_chain", "qsparse", "default,pdl_chain,glu_selection", 130),
    ("bitnet_qsparse_chain", "bitnet_qsparse", "default,pdl_chain,no_glu_selection", 130),
    ("bitnet_chain", "bitnet", "default,pdl_chain", 100),
    ("bitnet_qsparse_glu", "bitnet_qsparse", "default,no_glu_selection", 100),
    ("bitnet_glu", "bitnet", "default,no_glu_selection", 100),
    *(
        (f"{mode}_attention_evict", mode, "default,attention_preload,no_weights_evict_first", 130)
        for mode in ("qsparse", "bitnet", "bitnet_qsparse")
    ),
    ("qsparse_select_warps", "qsparse", "default,select_warps=16,select_warps=32", 130),
    ("qsparse_wide_select_warps", "qsparse", "default,wide_select_warps=16", 100),
)
_CKPT = "/tmp/qsparse-llama1b"
#: the training-stack benchmarks' model and batch (mfu.py, train_step.py)
_STACK_374M = ("--preset", "374M", "--batch", "8", "--seq", "2048")
_MEM = ("memory_continue.py", "run", _CKPT)

REGISTRY: list[Bench] = [
    Bench(
        "train_step_overhead",
        "train_step_overhead.py",
        repeat=2,
        group="core",
        est_s=120,
        rows=(
            _ratio_row(
                "training",
                "Q-Sparse training step (S=0.6, 374M HF Llama, 8x2048, bf16, eager) vs dense",
                f"{_TS}.eager.qsparse",
                f"{_TS}.eager.qsparse.ms",
                Goal(f"{_TS}.eager.qsparse", "<=", 1.10, f"{_TS}.eager.dense.ms"),
                "training step, 374M Llama, 8x2048 bf16, eager: Q-Sparse S=0.6 vs dense",
            ),
            _ratio_row(
                "training",
                "BitNet b1.58 + Q-Sparse training step vs dense (eager)",
                f"{_TS}.eager.bitnet+qsparse",
                f"{_TS}.eager.bitnet+qsparse.ms",
                Goal(f"{_TS}.eager.bitnet+qsparse", "<=", 1.25, f"{_TS}.eager.dense.ms"),
                "same: BitNet b1.58 + Q-Sparse vs dense",
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
                summary="same, kernels off (PyTorch reference, torch.topk): Q-Sparse / "
                "BitNet+Q-Sparse",
            ),
        ),
    ),
    Bench(
        "train_step_overhead_compiled",
        "train_step_overhead.py",
        ("--compile", "--only", "qsparse,bitnet,bitnet+qsparse"),
        group="training",
        est_s=250,
        rows=(
            _ratio_row(
                "training",
                "Q-Sparse training step, torch.compile on both, vs dense",
                f"{_TS}.compiled.qsparse",
                f"{_TS}.compiled.qsparse.ms",
                Goal(f"{_TS}.compiled.qsparse", "<=", 1.10, f"{_TS}.compiled.dense.ms"),
                "same, torch.compile on both: Q-Sparse vs dense",
            ),
            _ratio_row(
                "training",
                "BitNet b1.58 + Q-Sparse training step, compiled, vs dense",
                f"{_TS}.compiled.bitnet+qsparse",
                f"{_TS}.compiled.bitnet+qsparse.ms",
                Goal(f"{_TS}.compiled.bitnet+qsparse", "<=", 1.25, f"{_TS}.compiled.dense.ms"),
                "same, compiled: BitNet b1.58 + Q-Sparse vs dense",
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
        group="training",
        est_s=45,
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
    *(
        Bench(
            f"mfu_{tag}",
            "mfu.py",
            (*_STACK_374M, *extra),
            group=group,
            est_s=est_s,
            rows=(
                Row(
                    "training",
                    label,
                    f"{{mfu.{key}.mfu|.1f}}% ({{mfu.{key}.tokens_per_s|,.0f}} tokens/s, "
                    f"{{mfu.{key}.ms_per_step|.1f}} ms/step)",
                    goal,
                    summary,
                ),
            ),
        )
        for tag, key, extra, group, est_s, label, goal, summary in (
            (
                "compiled",
                "compile",
                ("--steps", "30", "--warmup", "10", "--compile"),
                "training_stack",
                100,
                "dense 374M training stack, 8x2048 bf16-mixed, compile on: MFU",
                Goal("mfu.compile.mfu", ">=", 40.0),
                "dense 374M through the training stack, compiled: MFU",
            ),
            (
                "eager",
                "eager",
                ("--steps", "20", "--warmup", "5"),
                "training",
                40,
                "dense 374M training stack, eager: MFU",
                None,
                "",
            ),
        )
    ),
    Bench(
        "train_step_stack",
        "train_step.py",
        (*_STACK_374M, "--steps", "15", "--warmup", "6", "--compile"),
        group="training_stack",
        est_s=220,
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
            group="training_stack",
            est_s=50,
            setup_s=40,
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
        group="core",
        est_s=90,
        rows=(
            _ratio_row(
                "decode",
                "sparse-input GEMV 4096->11008 bf16, batch 1, S=0.6, kept-input list given, "
                "vs cuBLAS",
                f"{_SG}.b1_S0.6.excl",
                f"{_SG}.b1_S0.6.excl_us",
                Goal(f"{_SG}.b1_S0.6.excl", ">=", 2.0, f"{_SG}.b1_S0.6.dense_us"),
                "sparse-input GEMV 4096->11008, batch 1, S=0.6, kept-input list given, vs cuBLAS",
            ),
            _ratio_row(
                "decode",
                "same, top-k selection included",
                f"{_SG}.b1_S0.6.incl",
                f"{_SG}.b1_S0.6.incl_us",
                summary="same, top-k selection included",
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
        group="core",
        est_s=95,
        rows=(
            _ratio_row(
                "decode",
                "ternary 2-bit GEMV (int8 activation quantization included), batch 1, vs cuBLAS",
                f"{_TG}.b1.ternary",
                f"{_TG}.b1.ternary_us",
                Goal(f"{_TG}.b1.ternary", ">=", 4.0, f"{_TG}.b1.dense_us"),
                "ternary 2-bit GEMV 4096->11008, batch 1, int8 activations, vs cuBLAS",
            ),
            _ratio_row(
                "decode",
                "ternary + top-k S=0.6 together, batch 1",
                f"{_TG}.b1.ternary_sparse",
                f"{_TG}.b1.ternary_sparse_us",
                summary="same with top-k S=0.6 on its input",
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
            group="decode",
            est_s=40,
            rows=(
                Row(
                    "decode",
                    f"1.3B decode, batch 1, 128 tokens, CUDA graph, {label}: dense bf16",
                    f"{{decode.{tag}.dense.tokens_per_s|.1f}} tokens/s",
                    summary=f"1.3B decode, batch 1, CUDA graph, {label}: dense bf16",
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
        # the compiled step at batch 1 is decode_modes_1.3b_b1 (same preset, tokens and modes)
        for tag, extra, label in (("eager", (), "eager step"),)
    ),
    # issue 11: 7B projection shapes, sparse GEMV with its selection; decode per mode/preset/batch
    Bench(
        "sparse_gemv_7b",
        "sparse_gemv_7b.py",
        repeat=3,
        group="decode_extra",
        est_s=150,
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
                f"7B {name} {kin}->{n} sparse GEMV, batch 1, S=0.6, selection (carried threshold) "
                "included, vs cuBLAS",
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
                    "b1.58), dp4a kernel with one program per column block / int8 "
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
                    "outputs (`ternary_split_config`: o 2, down 4 programs per column block; the "
                    "default from 2026-12-02), dense / top-k: o; down",
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
            (
                *("--presets", preset, "--batches", "1", "--hf-batches", ""),
                *("--attention-ab", *_B1_MODES),
            ),
            group="core" if preset == "1.3B" else "decode",
            est_s=295 if preset == "1.3B" else 400,
            rows=(
                Row(
                    "decode",
                    f"{preset} decode, batch 1, {_NEW_TOKENS[preset]} tokens, CUDA graph, step "
                    "compiled (inductor): dense bf16",
                    f"{{{_DM}.{preset}.b1.compile.dense.tokens_per_s|.1f}} tokens/s",
                    summary=f"{preset} decode, batch 1, compiled step + CUDA graph: dense bf16",
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
                        f"same: {label} vs dense",
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
                    "same: BitNet+Q-Sparse vs BitNet alone",
                ),
                Row(
                    "decode",
                    "same, each mode on the fused decode attention (RoPE, cache write and "
                    "attention in one kernel, the default) vs the model's attention path "
                    "(RoPE, `index_copy_`, SDPA) in the same run: dense / Q-Sparse / BitNet / "
                    "BitNet+Q-Sparse",
                    " / ".join(
                        f"{{{_DM}.{preset}.b1.compile.{m}.vs_{m}_sdpa|.3f}}x"
                        for m in ("dense", "qsparse", "bitnet", "bitnet_qsparse")
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
            (
                *("--presets", preset, "--batches", "2,4,8", "--hf-batches", ""),
                *_B1_MODES,
            ),
            group="decode",
            est_s=90 if preset == "7B" else 70,
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
                    f"{preset} decode, batch {b}, eager step + CUDA graph: Q-Sparse / BitNet / "
                    "BitNet+Q-Sparse vs dense",
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
        group="decode_extra",
        est_s=160,
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
    # the fused decode attention against the model's path on a long generation at batch 8,
    # where the static cache's masked SDPA reads the whole buffer every step
    Bench(
        "decode_attention_7b_long",
        "decode_modes.py",
        (
            *("--presets", "7B", "--batches", "8", "--new-tokens", "512", "--hf-batches", ""),
            *("--modes", "dense,qsparse", "--attention-ab"),
        ),
        group="decode_threshold",
        est_s=150,
        rows=(
            Row(
                "decode",
                "7B decode, batch 8, 512 new tokens (cache of 528 positions), CUDA graph, eager "
                "step: dense / Q-Sparse S=0.6 on the fused decode attention vs the same mode on "
                "the model's attention path (RoPE, `index_copy_`, masked SDPA over the whole "
                "cache) in the same run",
                f"{{{_DM}.7B.b8.eager.dense.vs_dense_sdpa|.3f}}x / "
                f"{{{_DM}.7B.b8.eager.qsparse.vs_qsparse_sdpa|.3f}}x "
                f"(dense {{{_DM}.7B.b8.eager.dense.tokens_per_s|.1f}} tokens/s; Q-Sparse "
                f"{{{_DM}.7B.b8.eager.qsparse.ratio|.2f}}x dense)",
            ),
        ),
    ),
    # fixed per-site thresholds (sparsity=threshold, TEAL) against per-token top-k, end to end
    Bench(
        "teal_decode",
        "teal_gemv.py",
        ("--decode", "7B,1.3B", "--sparsity", "0.6", "--decode-tokens", "64"),
        group="decode_threshold",
        est_s=360,
        rows=tuple(
            Row(
                "decode",
                f"{preset} decode, batch 1, 64 tokens, compiled step + CUDA graph, S=0.6: "
                "Q-Sparse top-k / a fixed threshold per site (`qsparse_threshold`, calibrated "
                "on the decoded positions of random tokens) vs dense of the same run; share "
                "of inputs the threshold sites kept",
                f"{{{_TL}.decode_{preset}.qsparse|.2f}}x / "
                f"{{{_TL}.decode_{preset}.threshold|.2f}}x (dense "
                f"{{{_TL}.decode_{preset}.dense.tokens_per_s|.1f}} tokens/s; kept "
                f"{{{_TL}.decode_{preset}.threshold.kept_pct|.1f}}%)",
            )
            for preset in ("7B", "1.3B")
        ),
    ),
    # issue 17: TEAL's threshold through the sparse-input GEMV (no selection pass)
    Bench(
        "teal_gemv",
        "teal_gemv.py",
        repeat=3,
        group="decode_extra",
        est_s=90,
        rows=tuple(
            Row(
                "decode",
                f"TEAL threshold on 7B {name} {kin}->{n}, batch 1, S={s}: threshold_gemv (list "
                "kernel + sparse GEMV) / the list built by PyTorch ops / top-k selection + "
                "sparse GEMV / same, threshold carried / the GEMV on a ready list, vs cuBLAS "
                "(equal kept fraction)",
                " / ".join(
                    f"{{{_TL}.{name}_S{s}.{p}|.2f}}x"
                    for p in ("threshold", "threshold_torch", "topk", "topk_carry", "list_only")
                )
                + f" (cuBLAS {{{_TL}.{name}_S{s}.dense_us|.1f}} us, kept "
                f"{{{_TL}.{name}_S{s}.kept_pct|.1f}}%)",
            )
            for name, (kin, n) in _SHAPES_7B.items()
            for s in ("0.4", "0.5")
        )
        + tuple(
            Row(
                "decode",
                f"same, S={s}, threshold_gemv (the GEMV as the list kernel's programmatic "
                "dependent, packed list words) / the list kernel launched alone with two lists "
                "(before 2026-12-03), vs cuBLAS: qkv; o; gate_up; down",
                "; ".join(
                    f"{{{_TL}.{name}_S{s}.threshold|.2f}}x / "
                    f"{{{_TL}.{name}_S{s}.threshold_plain|.2f}}x"
                    for name in _SHAPES_7B
                ),
            )
            for s in ("0.4", "0.5")
        ),
    ),
    # issue 11: the lm head in BitNet modes, int8 weight-only vs the cuBLAS bf16 head
    Bench(
        "int8_head_gemv",
        "int8_head_gemv.py",
        ("--quick",),
        repeat=3,
        group="decode_extra",
        est_s=75,
        rows=tuple(
            _ratio_row(
                "decode",
                f"int8 weight-only lm head GEMV {v} x {d} ({name}), per-row scales, batch 1, "
                "vs cuBLAS bf16 head (weights rotated past L2)",
                f"int8_head.{name}_b1.int8",
                f"int8_head.{name}_b1.int8_us",
            )
            for name, (v, d) in (
                ("1.3B", (32000, 2048)),
                ("7B", (32000, 4096)),
                ("smollm2", (49152, 576)),
            )
        ),
    ),
    # issue 15: two GPUs (run on nvidia-h200-x2 with NVLink multicast off, see README)
    Bench(
        "fsdp_scaling",
        "fsdp_scaling.py",
        ("--out", "/tmp/qsparse_fsdp_out", "--steps", "16"),
        group="multi_gpu",
        est_s=240,  # about 190 s measured at 6f6ad64, before the re-run leg
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
                "loss difference to the uninterrupted run / of a second uninterrupted run "
                "(the GPU's run-to-run noise)",
                "{resume_max_abs_loss_diff|.2e} / {rerun_max_abs_loss_diff|.2e} nats",
            ),
        ),
        timeout_s=900,
    ),
    # exploration scripts behind figures quoted in prose; every figure lands in the JSON
    Bench("gemv_variants", "gemv_variants.py", est_s=150),
    Bench("sparse_gemv_shapes", "sparse_gemv_shapes.py", est_s=90),
    Bench("gemv_profile", "gemv_profile.py", est_s=60),
    Bench("select_latency", "select_latency.py", ("--warps", "8", "16"), est_s=150),
    Bench(
        "select_latency_ternary", "select_latency.py", ("--ternary", "--warps", "8", "16"), est_s=90
    ),
    Bench(
        "select_latency_spread",
        "select_latency.py",
        (
            "--producer",
            "none",
            "--spread",
            "0.2",
            "--widths",
            "4096",
            "11008",
            "--warps",
            "8",
            "16",
        ),
        est_s=60,
    ),
    Bench("ternary_sparse_gemv", "ternary_sparse_gemv.py", ("--decode", "1.3B"), est_s=150),
    Bench(
        "decode_timeline_7b",
        "decode_profile.py",
        ("--preset", "7B", "--compile", "--graph", "--timeline", "--steps", "3")
        + ("--modes", "dense,qsparse,bitnet,bitnet_qsparse"),
        est_s=170,
    ),
    Bench("grid_barrier", "grid_barrier.py", ("--programs", "32", "66", "132"), est_s=30),
    Bench("decode_attention_kernel", "decode_attention_kernel.py", est_s=60),
    Bench(
        "select_latency_cold",
        "select_latency.py",
        ("--cold", "96", "--widths", "4096", "11008", "--warps", "8", "16", "32"),
        est_s=60,
    ),
    *(
        Bench(
            f"decode_variants_7b_{suffix}",
            "decode_variants.py",
            ("--preset", "7B", "--mode", mode, "--variants", variants),
            est_s=est_s,
        )
        for suffix, mode, variants, est_s in _DECODE_VARIANTS_7B
    ),
    Bench(
        "expert_gemv",
        "expert_gemv.py",
        group="decode_extra",
        est_s=70,
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

#: device-call groups in the order a full re-run takes them, each sized for one call of at most
#: 600 s on one H200 (the estimates are in ``run_all.py list``); ``all`` is these minus
#: ``multi_gpu`` (needs ``nvidia-h200-x2``) and ``exploration`` (figures only the history prose
#: quotes)
GROUPS = (
    "core",
    "decode",
    "decode_extra",
    "decode_threshold",
    "training",
    "training_stack",
    "multi_gpu",
    "exploration",
)
ALL = ("core", "decode", "decode_extra", "decode_threshold", "training", "training_stack")


def in_groups(names: Sequence[str], registry: Sequence[Bench] | None = None) -> list[Bench]:
    """The benches of ``registry`` (default :data:`REGISTRY`) in the named groups (``all``:
    :data:`ALL`), in registry order; an unknown name raises ``ValueError`` naming the known."""
    registry = REGISTRY if registry is None else registry
    wanted = {g for name in names for g in (ALL if name == "all" else (name,))}
    unknown = sorted(wanted - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; choose from {['all', *GROUPS]}")
    return [b for b in registry if b.group in wanted]


def estimate(benches: Sequence[Bench]) -> int:
    """Estimated GPU seconds of running ``benches`` one after another: their runs plus each
    distinct setup step once."""
    setups = {path: b.setup_s for b in benches for path, _ in b.setup}
    return sum(b.est_s for b in benches) + sum(setups.values())
