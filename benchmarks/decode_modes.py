"""Figure: end-to-end greedy decode tokens/s per mode (dense bf16, Q-Sparse S=0.6, BitNet b1.58,
BitNet + Q-Sparse S=0.6) on the 1.3B and 7B presets (random weights) at batch 1, 2, 4 and 8,
each relative to the dense run of the same preset and batch in the same process
(:func:`qsparse.cli.generate.measure`: fused projections, Triton GEMVs, CUDA graph; the step
compiled by inductor at the batch sizes in ``--compile-batches``), plus transformers' own
``generate`` on the same dense weights (greedy, static and dynamic cache, eager; the best is
reported).

    PYTHONPATH=$PWD python3 benchmarks/decode_modes.py --json decode.json
    python3 benchmarks/decode_modes.py --plot decode.json docs/decode_modes.png   # no GPU
    python3 benchmarks/decode_modes.py --plot benchmarks/results/decode_modes_*.json \
        benchmarks/decode_modes.png    # from the run_all records (devices, commits shown)
    PYTHONPATH=$PWD python3 benchmarks/decode_modes.py --presets tiny --batches 1 \\
        --new-tokens 2 --compile-backend eager -- --device cpu --no-kernels --no-graph
    # BitNet modes also with the weight-only int8 lm head (rows bitnet_int8head, ...)
    PYTHONPATH=$PWD python3 benchmarks/decode_modes.py --head-bits 8 --hf-batches ''

Arguments after ``--`` go to every ``qsparse-generate`` run (the last line: a CPU check).
Rows are appended to the JSON file after every measurement, so a run cut short keeps what it
measured.

For ``benchmarks/run_all.py`` it prints ``FIGURE`` lines per preset, batch and step (``tag``:
``eager`` or ``compile``, as in ``benchmarks/decode.py``), under
``decode_modes.<preset>.b<batch>.<tag>``: ``<mode>.tokens_per_s`` and ``<mode>.ratio`` (to
dense), ``min.ratio`` (the slowest mode other than dense, vs dense) and
``bitnet_qsparse.vs_bitnet`` (BitNet + Q-Sparse vs BitNet alone); with ``--head-bits 8`` the
BitNet modes are measured a second time with the int8 lm head (``<mode>_int8head``, ratio to
the same dense run) and ``<mode>_int8head.vs_<mode>`` is the head's own gain; with
``--attention-ab`` every mode is measured a second time on the model's own attention path
(``<mode>_sdpa``: ``qsparse.decode_view.FUSED_ATTENTION`` off) and ``<mode>.vs_<mode>_sdpa``
is the fused decode attention's gain; and under
``decode_modes.<preset>.b<batch>``: ``transformers_<cache>.tokens_per_s`` and ``.ratio`` (to
qsparse's dense run), ``transformers.*`` for the best cache.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._figures import emit
from qsparse import decode_view
from qsparse.cli.generate import _parser, measure
from qsparse.generate import MODES

NEW_TOKENS = {"1.3B": 128, "7B": 64}


def transformers_baseline(
    preset: str, batch: int, new_tokens: int, device: str = "cuda"
) -> dict[str, float]:
    """tokens/s of ``transformers.LlamaForCausalLM.generate`` (greedy, bf16, eager) on the
    preset's dense weights (seed 0, as the qsparse runs), per cache implementation."""
    cuda = device.startswith("cuda")
    from transformers import LlamaForCausalLM as HFLlama

    from qsparse.dtypes import default_dtype
    from qsparse.models import LlamaConfig, LlamaForCausalLM
    from qsparse.models.hf_config import to_hf_config

    cfg = LlamaConfig.from_preset(preset)
    torch.manual_seed(0)
    with torch.device(device):
        ours = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with default_dtype(torch.bfloat16):
            hf = HFLlama(to_hf_config(cfg)).eval()
    hf.load_state_dict(ours.state_dict())
    del ours
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen).to(device)
    out = {}
    for cache in ("static", "dynamic"):
        kw = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation=cache,
            pad_token_id=0,
            disable_compile=True,  # transformers would compile the static-cache step itself
        )
        with torch.no_grad():
            hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(ids, **kw)
            if cuda:
                torch.cuda.synchronize()
        out[cache] = batch * new_tokens / (time.perf_counter() - start)
    del hf
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _save(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


def emit_mode(key: str, mode: str, tps: float, ratio: float | None) -> None:
    """``FIGURE`` lines of one mode of one preset/batch/step: tokens/s and ratio to dense."""
    emit(f"{key}.{mode}.tokens_per_s", tps, "tokens/s")
    if ratio is not None:
        emit(f"{key}.{mode}.ratio", ratio)


def emit_summary(key: str, measured: Sequence[tuple[str, float, float | None]]) -> None:
    """``FIGURE`` lines comparing the modes of one preset/batch/step: the slowest non-dense
    mode's ratio to dense (``min.ratio``), BitNet + Q-Sparse vs BitNet alone, and each mode
    on the fused decode attention vs the model's attention path (``--attention-ab``)."""
    tps = {mode: t for mode, t, _ in measured}
    others = [  # the --attention-ab rows measure the attention path, not a mode
        r for mode, _, r in measured if mode != "dense" and not mode.endswith("_sdpa") and r
    ]
    if others:
        emit(f"{key}.min.ratio", min(others))
    if tps.get("bitnet") and "bitnet_qsparse" in tps:
        emit(f"{key}.bitnet_qsparse.vs_bitnet", tps["bitnet_qsparse"] / tps["bitnet"])
    for mode in ("bitnet", "bitnet_qsparse"):
        if tps.get(mode) and f"{mode}_int8head" in tps:
            emit(f"{key}.{mode}_int8head.vs_{mode}", tps[f"{mode}_int8head"] / tps[mode])
    for mode in MODES:
        if tps.get(f"{mode}_sdpa") and mode in tps:
            emit(f"{key}.{mode}.vs_{mode}_sdpa", tps[mode] / tps[f"{mode}_sdpa"])


def emit_transformers(key: str, rates: dict[str, float], dense: float | None) -> None:
    """``FIGURE`` lines of the transformers rows: per cache and the best cache, tokens/s and
    the ratio to qsparse's dense run of the same preset and batch (when there is one)."""
    best = max(rates, key=rates.__getitem__)
    for name, t in [
        *((f"transformers_{c}", t) for c, t in rates.items()),
        ("transformers", rates[best]),
    ]:
        emit(f"{key}.{name}.tokens_per_s", t, "tokens/s")
        if dense:
            emit(f"{key}.{name}.ratio", t / dense)


def run(args: argparse.Namespace, generate_args: Sequence[str] = ()) -> None:
    rows: list[dict] = []
    modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    for preset in args.presets.split(","):
        n = args.new_tokens or NEW_TOKENS.get(preset, 64)
        for batch in [int(b) for b in args.batches.split(",")]:
            argv = ["--preset", preset, "--batch", str(batch), "--new-tokens", str(n)]
            compiled = str(batch) in args.compile_batches.split(",")
            if compiled:
                argv += ["--compile", args.compile_backend]
            gen_args = _parser().parse_args([*argv, *generate_args])
            # (label, mode, args, model's attention path): with --head-bits, BitNet modes again
            # on the int8 head; with --attention-ab, every mode again on the model's attention
            runs = []
            for mode in modes:
                runs.append((mode, mode, gen_args, False))
                if args.head_bits and mode.startswith("bitnet"):
                    head = copy.copy(gen_args)
                    head.head_bits = args.head_bits
                    runs.append((f"{mode}_int8head", mode, head, False))
                if args.attention_ab:
                    runs.append((f"{mode}_sdpa", mode, gen_args, True))
            start = time.perf_counter()
            key = f"decode_modes.{preset}.b{batch}"
            step_key = f"{key}.{'compile' if compiled else 'eager'}"
            measured: list[tuple[str, float, float | None]] = []
            dense_tps = None
            for mode, base_mode, run_args, sdpa in runs:  # one at a time: a run cut short
                fused = decode_view.FUSED_ATTENTION  # keeps what it measured
                decode_view.FUSED_ATTENTION = fused and not sdpa
                try:
                    ((_, tps, _, _),) = measure(run_args, [base_mode])
                finally:
                    decode_view.FUSED_ATTENTION = fused
                dense_tps = tps if mode == "dense" else dense_tps
                ratio = tps / dense_tps if dense_tps else None
                measured.append((mode, tps, ratio))
                rows.append(
                    dict(preset=preset, batch=batch, mode=mode, tokens_per_s=tps, ratio=ratio)
                    | dict(compiled=compiled, new_tokens=n)
                )
                shown = f"{ratio:.2f}x" if ratio is not None else "-"
                print(f"RATIO decode {preset} batch {batch} {mode}: {shown} ({tps:.1f} tok/s)")
                emit_mode(step_key, mode, tps, ratio)
                _save(args.json, rows)
            emit_summary(step_key, measured)
            print(f"# {preset} batch {batch}: {time.perf_counter() - start:.0f} s", flush=True)
            if batch in [int(b) for b in args.hf_batches.split(",") if b]:
                dense = next((t for m, t, _ in measured if m == "dense"), None)
                rates = transformers_baseline(preset, batch, n, gen_args.device)
                for cache, tps in rates.items():
                    ratio = tps / dense if dense else None
                    rows.append(
                        dict(preset=preset, batch=batch, mode=f"transformers_{cache}")
                        | dict(tokens_per_s=tps, ratio=ratio, compiled=False, new_tokens=n)
                    )
                    shown = f"{ratio:.2f}x" if ratio is not None else "-"
                    print(
                        f"RATIO decode {preset} batch {batch} transformers generate ({cache} "
                        f"cache, eager): {shown} of qsparse dense ({tps:.1f} tok/s)"
                    )
                emit_transformers(key, rates, dense)
                _save(args.json, rows)


_RECORD_KEY = re.compile(r"decode_modes\.(.+)\.b(\d+)\.(compile|eager)\.(\w+)\.tokens_per_s")


def short_device(name: str | None) -> str | None:
    """A record's device for a plot label: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``."""
    if not name:
        return None
    words = name.removeprefix("NVIDIA ").split()
    return words[0] if words else None


def rows_from_records(records: Sequence[dict]) -> list[dict]:
    """The rows :func:`plot` draws, from ``benchmarks/run_all.py`` records of this script
    (``benchmarks/results/decode_modes_*.json``): one per preset, batch and mode, with the
    commit and the GPU (:func:`short_device`) each was measured on. Where several records hold
    the same preset, batch, mode and compile setting, the newest (its ``date``) wins, so that a
    bar group does not mix a rerun with an older run on another card."""
    rows, seen = [], set()
    for rec in sorted(records, key=lambda r: str(r.get("date", "")), reverse=True):
        for key, fig in rec.get("figures", {}).items():
            m = _RECORD_KEY.fullmatch(key)
            if m:
                preset, batch, how, mode = m.groups()
                if (preset, batch, how, mode) in seen:
                    continue  # a newer record has it
                seen.add((preset, batch, how, mode))
                rows.append(
                    dict(
                        preset=preset,
                        batch=int(batch),
                        mode=mode,
                        tokens_per_s=fig["value"],
                        compiled=how == "compile",
                        commit=str(rec.get("commit", "unknown"))[:7],
                        device=short_device(rec.get("device")),
                    )
                )
    return rows


def _batch_label(batch: int, rows: Sequence[dict]) -> str:
    """``"batch 1\ncompiled, H100"``: a bar group's tick label, with whether its step was
    compiled and the GPUs its rows were measured on (rows of several runs may differ)."""
    notes = ["compiled"] if any(r["compiled"] for r in rows) else []
    notes += sorted({r["device"] for r in rows if r.get("device")})
    return f"batch {batch}" + (f"\n{', '.join(notes)}" if notes else "")


def plot(src: str | Sequence[str], dst: str) -> None:
    """Bar chart of tokens/s per mode, one panel per preset, bars grouped by batch (the
    ``--attention-ab`` rows left out). ``src``: a JSON file of rows (``--json``), or run_all
    record files (:func:`rows_from_records`)."""
    from qsparse.extras import pyplot

    plt = pyplot(feature="the decode-modes plot")
    files = [src] if isinstance(src, str) else list(src)
    loaded = [json.loads(Path(f).read_text()) for f in files]
    if all(isinstance(d, dict) and "figures" in d for d in loaded):
        rows = rows_from_records(loaded)
    else:
        rows = [r for d in loaded for r in d]
    rows = [r for r in rows if not r["mode"].endswith("_sdpa")]  # --attention-ab baselines
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    # one colour per mode across the panels (a preset may lack some modes)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["mode"] for r in rows))}
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
            xs = [i + j * width for i in range(len(batches))]
            ax.bar(xs, vals, width, label=mode, color=colours[mode])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))])
        ax.set_xticklabels([_batch_label(b, [r for r in sub if r["batch"] == b]) for b in batches])
        ax.set_ylabel("tokens/s")
        commits = sorted({r["commit"] for r in sub if r.get("commit")})
        at = f" ({', '.join(commits)})" if commits else ""
        ax.set_title(f"{preset} preset, greedy decode{at}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="arguments after -- go to qsparse-generate"
    )
    ap.add_argument("--presets", default="1.3B,7B")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--modes", default="all", help=f"comma list of {MODES} or 'all'")
    ap.add_argument("--new-tokens", type=int, default=None, help=f"default {NEW_TOKENS}, else 64")
    ap.add_argument("--compile-batches", default="1", help="batch sizes run with --compile")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--hf-batches", default="1", help="batch sizes with the transformers row")
    ap.add_argument(
        "--head-bits",
        type=int,
        default=None,
        help="8: measure the BitNet modes also with the int8 lm head (<mode>_int8head rows)",
    )
    ap.add_argument(
        "--attention-ab",
        action="store_true",
        help="measure every mode also on the model's attention path (RoPE, index_copy_, SDPA; "
        "<mode>_sdpa rows) instead of the fused decode attention kernel",
    )
    ap.add_argument("--json", help="write the rows here (after each measurement)")
    ap.add_argument(
        "--plot",
        nargs="+",
        metavar="FILE",
        help="only plot: JSON files (a --json file, or benchmarks/results/decode_modes_*.json "
        "records), then the PNG to write",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    from qsparse.decode_view import check_head_bits

    try:
        check_head_bits(args.head_bits, "--head-bits")
    except ValueError as err:
        ap.error(str(err))
    if args.plot:
        if len(args.plot) < 2:
            ap.error("--plot: give one or more JSON files, then the PNG to write")
        plot(args.plot[:-1], args.plot[-1])
    else:
        run(args, argv[cut + 1 :])


if __name__ == "__main__":
    main()
