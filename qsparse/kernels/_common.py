"""Small Triton helpers shared by the kernels (imported only where Triton is installed)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(y):
    """``torch.round`` semantics (ties to even) for fp32 ``y`` with ``|y| < 2**22``.

    ``floor(y + 0.5)`` rounds ties up; a tie that landed on an odd integer steps back by one.
    Written out (rather than libdevice ``rint``) so the Triton interpreter runs it too.
    """
    r = tl.floor(y + 0.5)
    odd_tie = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(odd_tie, r - 1.0, r)
