"""Figure: end-to-end greedy decode tokens/s of a 1.3B Llama (random weights, bf16) in dense,
Q-Sparse (S=0.6), BitNet b1.58 and BitNet + Q-Sparse modes, each relative to the dense run in
the same process (``qsparse-generate``: fused projections, Triton GEMV kernels, CUDA graphs).

    PYTHONPATH=$PWD python3 benchmarks/decode.py --batch 1 --new-tokens 128
"""

from __future__ import annotations

import sys

from qsparse.cli.generate import main

if __name__ == "__main__":
    sys.exit(main(["--preset", "1.3B", "--mode", "all", *sys.argv[1:]]))
