"""Small Triton helpers shared by the kernels (imported only where Triton is installed)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# On the GPU round with the hardware instruction (cvt.rni): written out as floor(y + 0.5) the
# compiler may contract the product that forms y into an FMA with the + 0.5 and round the
# exact product instead of the fp32 one, which moves near-ties to a different integer than
# torch.round. The interpreter (tests on CPU) has no libdevice: it runs the written-out form.
_HW_RINT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def round_half_even(y):
    """``torch.round`` semantics (ties to even) for fp32 ``y`` with ``|y| < 2**22``.

    Interpreter form: ``floor(y + 0.5)`` rounds ties up; a tie that landed on an odd integer
    steps back by one.
    """
    if _HW_RINT:
        return libdevice.rint(y)
    else:
        r = tl.floor(y + 0.5)
        odd_tie = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
        return tl.where(odd_tie, r - 1.0, r)
