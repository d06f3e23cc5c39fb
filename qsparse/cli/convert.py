"""``qsparse-convert SRC DST``: dense -> sparse conversion of a checkpoint, without training.

    qsparse-convert ./Mistral-7B ./mistral-qsparse-50 --sparsity 0.5
    qsparse-convert ./tiny-llama ./tiny-bitnet --sparsity 0.6 --quant bitnet --activation relu2
    qsparse-convert ./tiny-llama ./tiny-block --sparsity 0.5 --pattern block_topk --block-size 32

Loads SRC (a local transformers Llama / Mistral / Qwen2 folder, or a folder exported by
qsparse), applies :func:`qsparse.sparsify` with the given settings and writes DST with
:func:`qsparse.models.export.export`: the weights (unchanged by the conversion: top-k acts on
activations, ternary weights are computed from the latent weights on the fly), the qsparse
settings in ``config.json`` and SRC's tokenizer. ``qsparse.load(DST)`` brings back the
sparse model; ``transformers`` loads DST as the dense model.

Quantization presets (``--quant``, as ``conf/quant``): ``none``; ``int8`` (per-token absmax
8-bit activations, Eq. 4-7); ``ternary`` (absmean 1.58-bit weights only); ``bitnet``
(ternary weights + int8 activations + SubLN, Eq. 8-10). A training-free conversion to
ternary weights destroys a dense model's quality; it is meant as the start of continued
training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..dtypes import dtype_names, torch_dtype
from ..errors import full_traceback_requested, report
from ..nn.config import QUANT_PRESETS


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsparse-convert",
        description="Convert a dense HF checkpoint to a Q-Sparse one (no training).",
    )
    p.add_argument("src", help="local checkpoint folder (Llama, Mistral or Qwen2)")
    p.add_argument("dst", help="output folder (created; an existing checkpoint is replaced)")
    p.add_argument("--sparsity", type=float, default=0.5, help="S, fraction zeroed (0.5)")
    p.add_argument("--pattern", default="token_topk", choices=("token_topk", "block_topk", "none"))
    p.add_argument("--block-size", type=int, default=32, help="block for block_topk (32)")
    p.add_argument(
        "--quant", default="none", choices=tuple(QUANT_PRESETS), help="quantization preset"
    )
    p.add_argument(
        "--activation",
        default="keep",
        choices=("keep", "relu2", "silu"),
        help="keep the FFN activation (default) or swap it",
    )
    p.add_argument("--rescale", action="store_true", help="L2 rescale after top-k")
    p.add_argument(
        "--keep-dense",
        nargs="*",
        default=["lm_head"],
        metavar="NAME",
        help="module names left dense (default: lm_head)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=dtype_names(allow_auto=True),
        help="weights dtype (auto=as SRC)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (HYDRA_FULL_ERROR=1)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the report as json")
    return p


def convert(
    src: str,
    dst: str,
    sparsity: float = 0.5,
    pattern: str = "token_topk",
    block_size: int = 32,
    quant: str = "none",
    activation: str = "keep",
    rescale: bool = False,
    keep_dense: tuple[str, ...] = ("lm_head",),
    dtype: str = "auto",
) -> dict:
    """Load ``src``, sparsify, export to ``dst``; return a summary dict (report + paths).

    Raises:
        CheckpointError (``ValueError``): ``src`` is not a complete supported checkpoint.
        ValueError: a setting is out of range (the message names it).
    """

    from qsparse.convert import sparsify
    from qsparse.models.export import export
    from qsparse.models.hf import check_hf_checkpoint, load
    from qsparse.nn import QuantConfig, SparsityConfig

    if quant not in QUANT_PRESETS:
        raise ValueError(f"--quant {quant!r} must be one of {sorted(QUANT_PRESETS)}")
    load_dtype = torch_dtype(dtype, "--dtype", allow_auto=True)
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError("DST must differ from SRC (the source checkpoint is not overwritten)")
    sp = SparsityConfig(
        ratio=float(sparsity), pattern=pattern, block_size=int(block_size), rescale=rescale
    )
    qc = QuantConfig.preset(quant)
    check_hf_checkpoint(src)
    model = load(src, dtype=load_dtype)
    report = sparsify(
        model,
        sparsity=sp,
        quant=qc if qc.enabled else None,
        activation=activation,
        modules_to_not_convert=tuple(keep_dense),
    )
    tokenizer = src if _has_tokenizer_files(Path(src)) else None
    out = export(model, dst, tokenizer=tokenizer)
    return {
        "src": str(src),
        "dst": str(out),
        "converted": len(report.converted),
        "skipped": report.skipped,
        "total_parameters": report.total_parameters,
        "activated_parameters": report.activated_parameters,
        "activated_fraction": report.activated_fraction,
        "settings": report.settings,
        "tokenizer": tokenizer is not None,
    }


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (``qsparse-convert``); exit status 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        # every option but --debug and --json is a parameter of convert, by name
        options = {k: v for k, v in vars(args).items() if k not in ("debug", "json_out")}
        summary = convert(**{**options, "keep_dense": tuple(args.keep_dense)})
    except (ValueError, FileNotFoundError) as err:
        if full_traceback_requested(args.debug):
            raise
        return report("qsparse-convert: error", err)
    print(
        f"converted {summary['converted']} projections; {summary['activated_parameters']:,} of "
        f"{summary['total_parameters']:,} parameters activated per token "
        f"({100 * summary['activated_fraction']:.1f}%, configured ratios)"
    )
    for name, reason in summary["skipped"].items():
        print(f"  kept dense: {name} ({reason})")
    if not summary["tokenizer"]:
        print("  note: SRC has no tokenizer files; DST has none either")
    print(f"wrote {summary['dst']}  (load with qsparse.load)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
