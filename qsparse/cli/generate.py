"""``qsparse-generate``: greedy decoding speed (and text) of dense / Q-Sparse / BitNet models.

Examples::

    # tokens/s of a randomly initialised 1.3B Llama in every mode (dense, qsparse, bitnet,
    # bitnet_qsparse, qsparse_threshold), batch 1
    qsparse-generate --preset 1.3B --mode all --batch 1 --new-tokens 128
    # continue a prompt with an exported checkpoint folder (its own qsparse settings)
    qsparse-generate --checkpoint out/export --prompt "The capital of France is"
    # the same with the step compiled by torch.compile (inductor) before the CUDA-graph capture
    qsparse-generate --preset 1.3B --mode all --compile
    # BitNet modes with a weight-only int8 lm head (rows labelled bitnet_int8head, ...)
    qsparse-generate --preset 1.3B --mode dense,bitnet,bitnet_qsparse --head-bits 8

For each mode the same random weights (same seed) are converted with :func:`qsparse.sparsify`
(``qsparse_threshold``: thresholds set on random tokens, :func:`qsparse.generate.convert`)
and decoded by :class:`qsparse.generate.DecodeEngine`; the table reports tokens/s and the ratio
to the dense bf16 run made in the same process.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from ..decode_view import check_environment, check_head_bits
from ..dtypes import dtype_names, torch_dtype
from ..errors import UserError, full_traceback_requested, report
from ..generate import MODES, DecodeEngine, compile_backend, convert, kept_fraction
from ..models.hf import check_hf_checkpoint
from ..models.presets import PRESETS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qsparse-generate", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="1.3B", help="qsparse LlamaConfig preset (random weights)")
    src.add_argument("--checkpoint", help="HF/qsparse checkpoint folder (qsparse.load)")
    ap.add_argument(
        "--mode",
        default="all",
        help=f"comma list of {MODES}; 'all' = every mode (preset) or the checkpoint as saved",
    )
    ap.add_argument("--sparsity", type=float, default=0.6, help="S for the Q-Sparse modes")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt length")
    ap.add_argument("--prompt", help="text prompt (needs --checkpoint with a tokenizer)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=dtype_names())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-kernels", action="store_true", help="PyTorch reference projections")
    ap.add_argument("--no-graph", action="store_true", help="do not capture CUDA graphs")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the decode step (fullgraph, static shapes); BACKEND defaults to "
        "inductor (aot_eager, eager: debugging)",
    )
    ap.add_argument(
        "--head-bits",
        type=int,
        default=None,
        help="8: weight-only int8 lm head (per-row symmetric) in every mode but dense, which "
        "stays the bf16 baseline; rows are labelled <mode>_int8head (default: the model's head)",
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _validate(args: argparse.Namespace) -> list[str]:
    """The modes to run; a :class:`~qsparse.errors.UserError` naming the option, environment
    variable or checkpoint file at fault (before any model is built)."""
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.new_tokens < 2:
        raise UserError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.prompt_len < 1:
        raise UserError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.prompt and not args.checkpoint:
        raise UserError("--prompt needs --checkpoint (a folder with a tokenizer)")
    try:
        compile_backend(args.compile)
    except ValueError as err:
        raise UserError(f"--compile: {err}") from None
    try:
        check_head_bits(args.head_bits, "--head-bits")
        check_environment()
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.checkpoint:
        check_hf_checkpoint(args.checkpoint, require_tokenizer=bool(args.prompt))
    elif args.preset not in PRESETS:
        raise UserError(
            f"--preset {args.preset!r} is not a preset: use one of {', '.join(PRESETS)}, or "
            "--checkpoint FOLDER"
        )
    if args.mode == "all":
        return ["checkpoint"] if args.checkpoint else list(MODES)
    modes = args.mode.split(",")
    for m in modes:
        if m not in MODES:
            raise UserError(f"--mode {m!r} must be one of {MODES} or 'all'")
    return modes


def _preset_model(args, dtype):
    from ..models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


def _threshold_calibration(
    args: argparse.Namespace, mode: str, vocab: int
) -> tuple[torch.Tensor | None, int]:
    """(token ids, skip) that ``convert`` sets a ``qsparse_threshold`` model's thresholds on:
    random tokens (``args.seed + 1``, not the timed prompt) of the timed length, read from
    position ``args.prompt_len`` on, the positions a decode reads; (None, 0) in other modes."""
    if mode != "qsparse_threshold":
        return None, 0
    gen = torch.Generator().manual_seed(args.seed + 1)
    length = args.prompt_len + args.new_tokens
    return torch.randint(0, vocab, (1, length), generator=gen), args.prompt_len


def measure(
    args: argparse.Namespace, modes: list[str]
) -> list[tuple[str, float, float | None, float | None]]:
    """Decode ``args.new_tokens`` tokens in each mode; rows (mode, tokens/s, ratio to the dense
    run of this call or None, share of inputs the threshold sites kept over the decoded
    positions or None). Prints a line per mode (and the text with ``--prompt``)."""
    dtype = torch_dtype(args.dtype, "--dtype")
    tokenizer = None
    rows = []
    dense_tps = None
    for mode in modes:
        if args.checkpoint:
            from ..models.hf import load

            model = load(args.checkpoint, dtype=dtype).to(args.device)
            if args.prompt and tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
        else:
            model = _preset_model(args, dtype)
        if mode != "checkpoint":  # every preset mode; a checkpoint with an explicit --mode
            calibration, skip = _threshold_calibration(args, mode, model.config.vocab_size)
            convert(model, mode, args.sparsity, calibration, skip)
        vocab = model.lm_head.out_features
        if tokenizer is not None:
            ids = tokenizer([args.prompt] * args.batch, return_tensors="pt").input_ids
        else:
            gen = torch.Generator().manual_seed(args.seed)
            ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen)
        head_bits = getattr(args, "head_bits", None) if mode != "dense" else None
        engine = DecodeEngine(
            model,
            use_kernels=not args.no_kernels,
            cuda_graph=not args.no_graph,
            compile=args.compile,
            head_bits=head_bits,
        )
        # warm-up at the timed shape: kernel compilation, the compiled step (specialised to
        # the (batch, length) shape) and the CUDA graph are built once, before the timed run
        engine.generate(ids, args.new_tokens)
        res = engine.generate(ids, args.new_tokens)
        if mode == "dense":
            dense_tps = res.tokens_per_s
        ratio = res.tokens_per_s / dense_tps if dense_tps else None
        label = f"{mode}_int8head" if head_bits else mode
        shown = f"{ratio:.2f}x" if ratio else "-"
        # a threshold site keeps what exceeds its threshold: say what this decode kept
        decoded = res.tokens.shape[1] > ids.shape[1]
        kept = kept_fraction(model, res.tokens, ids.shape[1]) if decoded else None
        rows.append((label, res.tokens_per_s, ratio, kept))
        kept_note = f", threshold sites kept {100 * kept:.1f}% of inputs" if kept else ""
        print(
            f"{label}: {res.tokens_per_s:.1f} tokens/s (batch {args.batch}), vs dense {shown}"
            + kept_note
        )
        if tokenizer is not None:
            print(tokenizer.decode(res.tokens[0].tolist(), skip_special_tokens=True))
        del engine, model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (``qsparse-generate``); 0 on success. A bad option, ``QSPARSE_*``
    setting or checkpoint folder prints one line ``qsparse-generate: <message>`` and returns 2
    before a model is built (``HYDRA_FULL_ERROR=1`` shows the traceback)."""
    args = _parser().parse_args(argv)
    try:
        modes = _validate(args)
    except UserError as err:
        if full_traceback_requested():
            raise
        return report("qsparse-generate", err)
    rows = measure(args, modes)
    src = args.checkpoint or f"preset {args.preset} (random weights)"
    on_cuda = args.device.startswith("cuda")  # what ran: DecodeEngine has neither off CUDA
    print(
        f"\n{src}, {args.dtype}, batch {args.batch}, {args.new_tokens} new tokens, "
        f"kernels={'on' if on_cuda and not args.no_kernels else 'off'}, "
        f"cuda_graph={on_cuda and not args.no_graph}, "
        f"compile={args.compile or 'off'}"
        + (f", head_bits={args.head_bits} (not dense)" if args.head_bits else "")
    )
    print("| mode | tokens/s | vs dense |\n| --- | --- | --- |")
    for mode, tps, ratio, _ in rows:
        print(f"| {mode} | {tps:.1f} | {f'{ratio:.2f}x' if ratio else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
