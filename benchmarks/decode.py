"""Figure: end-to-end greedy decode tokens/s of a 1.3B Llama (random weights, bf16) in dense,
Q-Sparse (S=0.6), BitNet b1.58 and BitNet + Q-Sparse modes, each relative to the dense run in
the same process (``qsparse-generate``: fused projections, Triton GEMV kernels, CUDA graphs).

    PYTHONPATH=$PWD python3 benchmarks/decode.py --batch 1 --new-tokens 128

Besides ``qsparse-generate``'s own output it prints ``FIGURE decode.<eager|compile>.<mode>.*``
lines (tokens/s and the ratio to dense) for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys

from benchmarks._figures import emit
from qsparse.cli.generate import main

#: the per-mode line qsparse-generate prints: "<mode>: <t> tokens/s (batch <b>), vs dense <r>"
MODE_LINE = re.compile(r"^(\S+): ([0-9.]+) tokens/s \(batch \d+\)", re.MULTILINE)


class _Tee(io.StringIO):
    """Keeps what is written and passes it on to the real stdout as it comes."""

    def write(self, s: str) -> int:
        sys.__stdout__.write(s)
        sys.__stdout__.flush()
        return super().write(s)


def run(argv: list[str]) -> int:
    """Run ``qsparse-generate --preset 1.3B --mode all *argv`` and emit its figures."""
    tee = _Tee()
    with contextlib.redirect_stdout(tee):
        code = main(["--preset", "1.3B", "--mode", "all", *argv])
    tag = "compile" if "--compile" in argv else "eager"
    rates = {m.group(1): float(m.group(2)) for m in MODE_LINE.finditer(tee.getvalue())}
    for mode, tps in rates.items():
        emit(f"decode.{tag}.{mode}.tokens_per_s", tps, "tokens/s")
        if rates.get("dense"):
            emit(f"decode.{tag}.{mode}.ratio", tps / rates["dense"])
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
