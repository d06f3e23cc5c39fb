"""Decode-time GEMV kernels: sparse-input bf16 and 2-bit ternary, with their references.

Weights are prepared once (:func:`prepare_dense`, :func:`pack_ternary`) in the layout the
kernels read.

- :func:`sparse_gemv`: ``y = (x * M) @ Wt`` with ``M`` the per-row top-k of |x|, ``Wt``: [K, N]
  (input-major, a kept input reads one contiguous row). A one-program kernel lists the kept
  inputs (the union over the batch), a second streams exactly those weight rows in full tiles:
  batch 1 reads ``k * N`` weights. ``hint=`` carries each row's threshold from call to call
  (one radix pass when it moved little); ``GemvConfig(carry=True)`` instead starts the GEMV on
  the inputs above the carried band before the selection is known (measured slower, opt-in).
- :func:`masked_topk`: ``x * M`` from carried thresholds, what decode runs before a dense GEMM
  at batch 2-16.
- :class:`Producer`: the op that makes a site's input (RMSNorm, or ``act(g) * u`` of a GLU),
  computed by the selection kernels of :func:`masked_topk` and :func:`sparse_gemv` (batch 1)
  from what it reads, so it needs no kernel of its own.
- :func:`ternary_gemv`: ``y = Q8(x) * M @ (alpha * T)`` with ``T`` in {-1, 0, 1} packed 16 per
  int32 along K ([ceil(K/16), N]: 1/8 of the bf16 bytes) and int8 activations (per-row absmax,
  BitNet b1.58 inference) multiplied with ``dp4a`` in int32; with ``k`` set, also top-k sparse
  (BitNet + Q-Sparse). ``act_bits=None`` (float activations) has no kernel: it dequantizes.
  Batch 2-16: dp4a with the words split over programs on narrow outputs
  (:func:`ternary_split_config`) by default, int8 tensor cores (:data:`TERNARY_MMA_CONFIG`)
  on request.

References: :func:`sparse_gemv_reference`, :func:`ternary_gemv_reference` (pure PyTorch, any
device). The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..env_flags import flag_at_import
from ..nn.quant import absmax_quantize
from ..nn.topk import topk_mask
from .topk import KEY_BITS


def _radix_digits(dtype: torch.dtype, digit_bits: int = 8) -> tuple[int, int]:
    """(LOW, NDIG): the key bits that can be non-zero for ``dtype`` start at bit LOW and
    span NDIG ``digit_bits``-bit digits."""
    if not 1 <= digit_bits <= 8:
        raise ValueError(
            f"digit_bits must be in [1, 8] (2^digit_bits histogram bins per radix pass), "
            f"got {digit_bits}; 5 is the tuned default"
        )
    bits = KEY_BITS[dtype]
    return 31 - bits, -(-bits // digit_bits)


def _pdl_ok(x: torch.Tensor) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that can launch it."""
    return x.device.type == "cuda" and _pdl_device_ok(x.device.index or 0)


@functools.cache
def _pdl_device_ok(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the GEMV kernels.

    ``block_k``: kept rows per tile (sparse) or 16-input groups per tile (ternary);
    ``block_n``: output columns per program; ``split``: programs sharing one column block
    (sparse, and ternary at batch > 1; > 1: the last one to finish sums their fp32
    partials); ``select_warps``: warps of the one-program selection kernel; ``use_dot``:
    tensor-core dot with the batch padded to 16 (sparse; None: when batch > 1; ternary at
    batch > 1: opt-in, :data:`TERNARY_MMA_CONFIG`); ``carry``: at batch 1 with a carried
    threshold (``hint=``) and row-major weights, the GEMV sums the inputs above the carried band while
    the selection still runs and only the rest after it (docs/decode.md). Off by default: on
    an H200 it was slower than the list GEMV on every 7B shape but the down projection
    (benchmarks/README.md). ``packed``: at batch 1 with a bf16 input, the selection lists each
    kept input as one int32 word (``bf16 bits << 16 | index``) that the GEMV unpacks, instead
    of an index list and an fp32 value list (one scattered store per kept input, not two).
    """

    block_k: int = 128
    block_n: int = 64
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3  # sparse: tiles in flight in the software-pipelined (cp.async) loop
    select_warps: int = 0  # 0: by the padded row width (:func:`select_warps_for`)
    use_dot: bool | None = None
    radix: bool = True  # selection by radix histograms (False: bisection)
    bits_per_pass: int = 2  # bisection selection (radix=False): bits decided per pass
    digit_bits: int = 5  # radix digit width: 2^digit_bits histogram bins per pass
    pdl: bool = True  # launch the GEMV as a programmatic dependent (Hopper+, CUDA only)
    carry: bool = False  # sparse, batch 1, ``hint=``: start before the selection (measured slower)
    packed: bool = True  # sparse, batch 1, bf16 input: the list as one word per kept input


#: when True, the one-program kernel of a site (selection, list or ternary activation kernel)
#: is launched as a programmatic dependent of the kernel before it and waits for that kernel's
#: output before reading anything, and the decode GEMVs let the kernel after them launch once
#: their own inputs are there, so the next site's launch overlaps the previous site's weight
#: stream (Hopper, with ``GemvConfig.pdl``). Off by default: on an H100 (2026-12-05, 7B, batch
#: 1, CUDA graph) it made the whole decode step slower in every mode (Q-Sparse 0.964x, BitNet +
#: Q-Sparse 0.977x, BitNet 0.984x; docs/decode.md). ``QSPARSE_PDL_CHAIN=1`` in the environment
#: (read at import) or setting this before a step is captured turns it on.
PDL_CHAIN: bool = flag_at_import("QSPARSE_PDL_CHAIN", False)

#: when True, the batch-1/batched list GEMV and the 2-bit ternary GEMV load their weights with
#: the L2 policy ``evict_first``: a decode step reads each weight byte once, so the weight
#: stream need not push the step's small, reused data out of L2 (activations, lists, KV
#: caches, thresholds, the kernels' code). Read when a step is captured. On by default: the 7B
#: decode step at batch 1 ran 1.061-1.062x faster with it in BitNet + Q-Sparse (two runs, one
#: H200, 2026-12-06), 1.009x in BitNet b1.58 (H100 and H200) and 1.000-1.003x in Q-Sparse
#: (benchmarks/README.md, thirteenth round). ``QSPARSE_WEIGHTS_EVICT_FIRST=0`` in the
#: environment (read at import) or setting this before a step is captured turns it off.
WEIGHTS_EVICT_FIRST: bool = flag_at_import("QSPARSE_WEIGHTS_EVICT_FIRST", True)

#: the floor of the activation absmax ``gamma = max(max |x|, ACT_EPS)`` in the ternary GEMVs'
#: int8 quantization (:func:`ternary_gemv`, :mod:`qsparse.kernels.ternary_rows`): a constant
#: of the kernels, ``QuantConfig.eps``'s default; a site with another eps does not use them
#: (:mod:`qsparse.decode_view`)
ACT_EPS = 1e-5
#: tuned on an H100 at 4096 -> 11008, batch 1 (benchmarks/README.md): dense activations ...
TERNARY_CONFIG = GemvConfig(block_k=64, block_n=16, num_warps=2, num_stages=3)
#: ... and with top-k (the longer activation kernel hides more weight loads behind it)
TERNARY_SPARSE_CONFIG = GemvConfig(block_k=128, block_n=32, num_warps=4, num_stages=3)
#: batch 2-16: the dp4a kernel (benchmarks/ternary_gemv.py: 2.22x / 1.82x / 1.51x cuBLAS at
#: batch 2/4/8 on an H100; the batch-1 configs hold [B, block_k, block_n] int32 accumulators
#: in 64 threads and spill), one program per column block; the default at batch > 1 is
#: :func:`ternary_split_config`, which splits its words over programs on narrow outputs
TERNARY_BATCH_CONFIG = GemvConfig(block_k=16, block_n=32, num_warps=4, use_dot=False)
#: batch 2-16 on int8 tensor cores (``use_dot=True``, opt-in): the codes unpacked to an int8
#: operand per tile, one ``mma`` per tile. Slower than dp4a on every 7B shape at batch 2-8 on
#: an H200 (benchmarks/README.md): the unpacking, not the product, is the cost
TERNARY_MMA_CONFIG = GemvConfig(block_k=8, block_n=64, num_warps=4, num_stages=4, use_dot=True)
#: programs a split batch > 1 ternary GEMV aims for (about four per SM of an H200)
TERNARY_PROGRAMS = 528


def ternary_config_for(
    batch: int, sparse: bool, n: int | None = None, k_in: int | None = None
) -> GemvConfig:
    """Launch shape :func:`ternary_gemv` uses when given no ``cfg``: batch 1
    :data:`TERNARY_CONFIG` (or :data:`TERNARY_SPARSE_CONFIG` with top-k); batch > 1
    :func:`ternary_split_config` for ``n`` (padded) outputs and ``k_in`` inputs, or
    :data:`TERNARY_BATCH_CONFIG` when the problem size is not given."""
    if batch > 1:
        if n is None or k_in is None:
            return TERNARY_BATCH_CONFIG
        return ternary_split_config(n, k_in)
    return TERNARY_SPARSE_CONFIG if sparse else TERNARY_CONFIG


def ternary_split_config(n: int, k_in: int) -> GemvConfig:
    """:data:`TERNARY_BATCH_CONFIG` with the words of each column block split over up to 8
    programs, so that ``n`` outputs give about :data:`TERNARY_PROGRAMS` programs, each
    keeping at least 8 tiles of the ``k_in`` inputs (7B: o 2, down 4, q|k|v and gate|up 1).
    For the narrow outputs, where one program per column block leaves the dp4a kernel
    latency-bound at batch 2-8. The default at batch > 1 (:func:`ternary_config_for`):
    on an H200 (benchmarks/sparse_gemv_7b.py, ``ternary_split`` vs ``ternary_dp4a``, commit
    0762a01) it took the 7B down projection from 0.73x / 0.69x / 0.66x cuBLAS to 1.63x /
    1.34x / 0.84x at batch 2 / 4 / 8, and o from 1.16x / 0.95x / 0.85x to 1.35x / 1.18x /
    0.96x; q|k|v and gate|up keep one program per column block (split 1)."""
    blocks = -(-n // TERNARY_BATCH_CONFIG.block_n)
    tiles = -(-k_in // (16 * TERNARY_BATCH_CONFIG.block_k))
    split = max(1, min(8, TERNARY_PROGRAMS // blocks, tiles // 8))
    return replace(TERNARY_BATCH_CONFIG, split=split)


#: programs the batch-1 carried-threshold GEMV aims for (about four per SM of an H200): its
#: first sweep reads row-masked tiles, so it needs more tiles in flight than the list GEMV
CARRY_PROGRAMS = 528


def sparse_config_for(k_in: int, n: int, k: int, batch: int = 1, carry: bool = False) -> GemvConfig:
    """Launch shape :func:`sparse_gemv` uses when given no ``cfg``, from the problem size
    (``k_in`` inputs, ``n`` padded output columns, ``k`` kept inputs per row).

    Measured on an H100 at batch 1 on the 1.3B preset's four projection shapes and on
    4096 -> 11008 (benchmarks/README.md): 64 columns per program when that still gives at
    least one program per SM (132), else 32; below 132 programs with at least 2048 kept rows,
    the list is split over 4 programs per column block (5460 -> 2048: 8.7 instead of 11.3 us).
    Batch > 1: tensor-core tiles of 32 kept rows. ``carry``: the carried GEMV
    (``GemvConfig.carry``, batch 1 with a carried threshold; not the default): the slices of K
    split over up to 8 programs per column block, for about :data:`CARRY_PROGRAMS` programs
    (the fastest of split 1-8 x block_k 64/128 on the 7B o shape, one of the two fastest on
    down)."""
    if batch > 1:
        return GemvConfig(block_k=32, block_n=64, num_warps=4)
    block_n = 64 if n // 64 >= 132 else 32
    if carry:
        split = max(1, min(8, CARRY_PROGRAMS // -(-n // block_n)))
        return GemvConfig(block_n=block_n, split=split, carry=True)
    split = 4 if -(-n // block_n) < 132 and k >= 2048 else 1
    return GemvConfig(block_n=block_n, split=split)


def sparse_config_for_weights(wt: torch.Tensor, k: int, batch: int = 1) -> GemvConfig:
    """:func:`sparse_config_for` the shape of ``wt`` (:func:`prepare_dense`'s layout) at ``k``
    kept inputs, its program width narrowed to divide the panel width of a panel layout."""
    k_in, n_pad, panel = _wt_dims(wt)
    cfg = sparse_config_for(k_in, n_pad, k, batch)
    if panel is not None:  # the program width must divide the panel width
        cfg = replace(cfg, block_n=math.gcd(cfg.block_n, panel))
    return cfg


def select_warps_for(width: int, warps: int = 0, lanes_per_warp: int = 512) -> int:
    """Warps of the one-program selection kernels for rows of ``width`` inputs: ``warps`` if
    set, else one per ``lanes_per_warp`` padded inputs, 8 to 16 (512: measured on an H100,
    benchmarks/README.md; the batch-1 list kernel takes 1024, measured on an H200 by
    ``benchmarks/select_latency.py``: 8 warps beat 16 at 8192 lanes, 16 beat 8 at 16384)."""
    if warps:
        return warps
    import triton

    return max(8, min(16, triton.next_power_of_2(width) // lanes_per_warp))


#: rows wider than this many inputs get :data:`WIDE_LIST_WARPS` in the batch-1 list kernel
WIDE_LIST_FROM: int = 8192
#: warps of the batch-1 radix list kernel (:func:`compact_rows`) for rows wider than
#: :data:`WIDE_LIST_FROM` (the 7B down site, 11008 inputs). In a decode step the weight stream
#: before it leaves its row cold in L2: there 32 warps took 14.0 us against 18.2 with 16 (H200,
#: ``benchmarks/select_latency.py --cold``; warm 14.2 against 12.5), and the 7B Q-Sparse step
#: ran 1.028x and 1.029x faster (two runs, H100, 2026-12-06, ``decode_variants.py``).
WIDE_LIST_WARPS: int = 32


def list_select_warps(width: int, warps: int = 0) -> int:
    """Warps of the batch-1 radix list kernel for rows of ``width`` inputs: ``warps`` if set,
    :data:`WIDE_LIST_WARPS` above :data:`WIDE_LIST_FROM` inputs, else one per 1024 padded
    inputs, 8 to 16 (:func:`select_warps_for`)."""
    if warps:
        return warps
    if width > WIDE_LIST_FROM:
        return WIDE_LIST_WARPS
    return select_warps_for(width, 0, 1024)


def _cfg_ints(cfg: GemvConfig) -> list[int]:
    """``cfg`` as the int list the custom ops take (field order; None -> -1, bools -> 0/1)."""
    return [-1 if v is None else int(v) for v in (getattr(cfg, f.name) for f in fields(cfg))]


def _cfg_from_ints(vals: list[int]) -> GemvConfig:
    """Inverse of :func:`_cfg_ints` (a field whose default is None or a bool reads back so)."""
    out = {}
    for f, v in zip(fields(GemvConfig), vals, strict=True):
        if f.default is None:
            out[f.name] = None if v < 0 else bool(v)
        else:
            out[f.name] = bool(v) if isinstance(f.default, bool) else v
    return GemvConfig(**out)


def _check_x(x: torch.Tensor, k_in: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, in_features], got shape {tuple(x.shape)}")
    if x.shape[1] != k_in:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k_in}")
    if x.dtype not in KEY_BITS:
        raise ValueError(f"x.dtype must be bf16/fp16/fp32, got {x.dtype}")


def _check_k(k: int | None, width: int) -> None:
    if k is not None and not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}] (inputs kept per row), got {k}")


#: producers a selection kernel can compute itself (``producer=`` of :func:`masked_topk` and
#: :func:`sparse_gemv`): the site input is ``rmsnorm``: ``w * round(x / sqrt(mean(x^2) +
#: eps))`` of x [B, K] (``qsparse.models.llama.RMSNorm``), or ``relu2_glu`` / ``silu_glu``:
#: ``act(g) * u`` of the fused gate|up output x = [g | u] [B, 2K] (ReLU^2 / SiLU GLU)
PRODUCERS = ("none", "rmsnorm", "relu2_glu", "silu_glu")


@dataclass(frozen=True)
class Producer:
    """The op that makes a sparse site's input, fused into its selection kernel (one
    :data:`PRODUCERS` name; ``weight``: the RMSNorm weight [K], ``eps`` its epsilon)."""

    kind: str = "none"
    weight: torch.Tensor | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in PRODUCERS:
            raise ValueError(f"producer kind {self.kind!r} must be one of {PRODUCERS}")
        if (self.kind == "rmsnorm") != (self.weight is not None):
            raise ValueError("producer: an RMSNorm weight goes with kind='rmsnorm' only")

    @property
    def code(self) -> int:
        """The kernels' ``PROD`` constant (:func:`~qsparse.kernels._gemv_triton._produce`)."""
        return PRODUCERS.index(self.kind)

    def width(self, k_in: int) -> int:
        """Columns of the producer's input x for a site of ``k_in`` inputs."""
        return 2 * k_in if self.kind.endswith("_glu") else k_in

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether the kernels compute it for ``x`` (fp32 or bf16, weight of x's dtype);
        otherwise :meth:`reference` runs first."""
        if self.kind == "none":
            return True
        w_ok = self.weight is None or self.weight.dtype == x.dtype
        return x.dtype in (torch.float32, torch.bfloat16) and w_ok

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The site input in PyTorch (the model's own modules' arithmetic): [B, K]."""
        if self.kind == "none":
            return x
        if self.kind == "rmsnorm":
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * xf.to(x.dtype)
        g, u = x.chunk(2, dim=-1)
        act = torch.relu(g).square() if self.kind == "relu2_glu" else F.silu(g)
        return act * u


NO_PRODUCER = Producer()


@dataclass(frozen=True)
class SubLN:
    """BitNet's SubLN (``ActivationSparsifier.norm``, a ``torch.nn.RMSNorm``) in front of a
    ternary site's activation quantization, computed by :func:`ternary_gemv`'s activation
    kernel after the site's :class:`Producer`: ``round(v / sqrt(mean(v^2) + eps) * weight)``
    over the K inputs of each row, in fp32, rounded once to the activation dtype (torch's own
    arithmetic: ``torch.nn.functional.rms_norm``)."""

    weight: torch.Tensor
    eps: float

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether the kernel computes it for ``x`` (fp32 or bf16, weight of x's dtype)."""
        return x.dtype in (torch.float32, torch.bfloat16) and self.weight.dtype == x.dtype

    def reference(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [B, K] normalized by torch."""
        return F.rms_norm(v, (v.shape[-1],), self.weight, self.eps)


def _prod_args(prod: Producer, x: torch.Tensor) -> tuple[int, torch.Tensor, float]:
    """(code, weight or an empty tensor, eps): what the custom ops take for ``prod``."""
    w = prod.weight if prod.weight is not None else x.new_empty(0)
    return prod.code, w.contiguous(), float(prod.eps)


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x: {tuple(x.shape)} {x.dtype}, got "
            f"{tuple(residual.shape)} {residual.dtype}"
        )


def _residual_fused(x: torch.Tensor, producer: Producer) -> bool:
    """Whether a selection / activation kernel forms the residual sum ``x + d`` itself: it
    does in front of the RMSNorm producer it computes (2-D x of a dtype it fuses)."""
    return producer.kind == "rmsnorm" and x.dim() == 2 and producer.fuses(x)


def _residual_args(
    x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, r) for the custom ops: the residual (contiguous) and the buffer the kernel writes
    ``x + d`` to, or two empty tensors without a residual."""
    if residual is None:
        return x.new_empty(0), x.new_empty(0)
    return residual.contiguous(), torch.empty_like(x)


def _wait_opts(x: torch.Tensor, pdl: bool = True) -> dict[str, bool]:
    """The keywords of a site's one-program kernel under :data:`PDL_CHAIN`: ``WAIT`` (and
    ``launch_pdl``): launched as a programmatic dependent of the kernel before it, waiting for
    it before reading its inputs. ``pdl``: the config's own setting (``GemvConfig.pdl``)."""
    if pdl and chain_next(x):
        return {"WAIT": True, "launch_pdl": True}
    return {"WAIT": False}


def chain_next(x: torch.Tensor) -> bool:
    """Whether a kernel on ``x``'s device that comes before a site's one-program kernel should
    let it launch early (``gdc_launch_dependents``; :data:`PDL_CHAIN`, Hopper)."""
    return PDL_CHAIN and _pdl_ok(x)


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _weights_evict(interp: bool) -> str:
    """The weight loads' L2 eviction policy (:data:`WEIGHTS_EVICT_FIRST`; none in the
    interpreter, where it means nothing)."""
    return "evict_first" if WEIGHTS_EVICT_FIRST and not interp else ""


def _gemv_launch_opts(cfg: GemvConfig, pdl: bool, interp: bool) -> dict[str, bool | int]:
    """The keywords every decode GEMV launch takes: ``PDL`` (a programmatic dependent of the
    kernel before it, ``launch_pdl``), ``NEXT`` (with PDL and :data:`PDL_CHAIN`: let the
    kernel after it launch once its inputs are there), ``ASM`` (inline PTX; off in the interpreter, which
    cannot run it) and the config's ``num_warps``/``num_stages``."""
    opts: dict[str, bool | int] = {
        "PDL": pdl,
        "NEXT": pdl and PDL_CHAIN,
        "ASM": not interp,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    if pdl:
        opts["launch_pdl"] = True
    return opts


def select_rows(
    x: torch.Tensor, k: int | None, num_warps: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``x[B, K]``: (thr int32 [B], cut int32 [B], gamma fp32 [B]).

    Entry i of row b is kept iff ``bits|x_bi| > thr_b`` or (``== thr_b`` and ``i <= cut_b``);
    ``gamma_b = max_i |x_bi|``. With ``k=None`` only gamma is meaningful.
    """
    import triton

    from ._gemv_triton import _select_kernel

    bsz, width = x.shape
    thr = torch.empty(bsz, dtype=torch.int32, device=x.device)
    cut = torch.empty(bsz, dtype=torch.int32, device=x.device)
    gamma = torch.empty(bsz, dtype=torch.float32, device=x.device)
    _select_kernel[(bsz,)](
        x,
        thr,
        cut,
        gamma,
        width,
        k if k is not None else width,
        BLOCK=triton.next_power_of_2(width),
        KEY_BITS=KEY_BITS[x.dtype],
        SELECT=k is not None and k < width,
        num_warps=num_warps,
    )
    return thr, cut, gamma


def compact_rows(
    x: torch.Tensor,
    k: int,
    num_warps: int = 0,
    radix: bool = True,
    bits_per_pass: int = 2,
    digit_bits: int = 5,
    pdl: bool = False,
    hint: torch.Tensor | None = None,
    prod: int = 0,
    prod_w: torch.Tensor | None = None,
    eps: float = 0.0,
    packed: bool = False,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    wait: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept inputs of ``x[B, K]`` as a list: (idx int32 [K], val fp32 [B, K], cnt int32 [1]).

    ``idx[:cnt]``: ascending indices kept by at least one row (batch 1: ``cnt = k``);
    ``val[b, p] = x[b, idx[p]]`` where row b keeps it, else 0. ``pdl``: let a kernel launched
    next as a programmatic dependent start early (it must wait for these outputs). ``hint``:
    int32 [>= B] (:func:`new_hint`), the threshold carried over from the previous call at this
    site and updated in place (radix only; one pass instead of several when the row's
    distribution moved little, the same selection either way). ``prod``: a
    :attr:`Producer.code` (batch 1, radix): select from the producer's output of x (then x is
    [1, 2K] for a GLU), ``prod_w``/``eps`` its RMSNorm weight and epsilon. ``packed`` (batch 1,
    radix, bf16 x, K <= 65536): ``idx[p] = bf16 bits of the value << 16 | index`` instead, and
    ``val`` is empty (:attr:`GemvConfig.packed`). ``residual = (d, r)`` (with the RMSNorm
    producer, ``prod == 1``): the norm reads the residual sum ``x + d`` (rounded to x's dtype),
    which the kernel also writes to ``r`` ([1, K] each, x's dtype). ``wait``: launch it as a
    programmatic dependent of the kernel before it (:data:`PDL_CHAIN`, Hopper), which must
    let it launch (a decode GEMV does) and whose writes it waits for.
    """
    import triton

    from ._gemv_triton import _compact_kernel

    bsz, width = x.shape
    if prod:
        if bsz != 1 or not radix:
            raise ValueError("a fused producer needs batch 1 and the radix selection")
        width = width // 2 if prod >= 2 else width
    if residual is not None and prod != 1:
        raise ValueError("a residual sum goes with the RMSNorm producer (prod=1) only")
    if packed and not _packs(x, width, radix):
        raise ValueError(
            "packed=True needs batch 1, the radix selection, a bf16 x and at most 65536 inputs; "
            f"got batch {bsz}, radix={radix}, {x.dtype}, {width} inputs"
        )
    idx = torch.empty(width, dtype=torch.int32, device=x.device)
    val = torch.empty(0 if packed else bsz, width, dtype=torch.float32, device=x.device)
    cnt = torch.empty(1, dtype=torch.int32, device=x.device)
    low, ndig = _radix_digits(x.dtype, digit_bits)
    use_hint = hint is not None and radix
    _compact_kernel[(1,)](
        x,
        idx,
        idx if packed else val,  # packed: val is empty and never written
        cnt,
        hint if use_hint else cnt,
        bsz,
        width,
        k,
        BB=triton.next_power_of_2(bsz),
        BLOCK=triton.next_power_of_2(width),
        KEY_BITS=KEY_BITS[x.dtype],
        RADIX=radix,
        LOW=low,
        NDIG=ndig,
        BPP=1 if x.dtype == torch.float32 else bits_per_pass,
        DBITS=digit_bits,
        PDL=pdl and _pdl_ok(x),
        HINT=use_hint,
        w_ptr=prod_w if prod_w is not None and prod_w.numel() else cnt,
        eps=float(eps),
        PROD=prod,
        BF16=x.dtype == torch.bfloat16,
        PACKED=packed,
        d_ptr=residual[0] if residual is not None else cnt,  # cnt: never read without ADD
        r_ptr=residual[1] if residual is not None else cnt,
        ADD=residual is not None,
        num_warps=(
            list_select_warps(width, num_warps)
            if bsz == 1 and radix
            else select_warps_for(width, num_warps)
        ),
        **_wait_opts(x, wait),
    )
    return idx, val, cnt


def _packs(x: torch.Tensor, width: int, radix: bool) -> bool:
    """Whether :func:`compact_rows` can pack the list of ``x`` (``width`` site inputs): batch 1,
    radix selection, bf16 values (the site input is rounded to bf16 either way) and indices
    that fit 16 bits."""
    return x.shape[0] == 1 and radix and x.dtype == torch.bfloat16 and width <= 65536


def masked_topk(
    x: torch.Tensor,
    k: int,
    hint: torch.Tensor | None = None,
    digit_bits: int = 5,
    producer: Producer = NO_PRODUCER,
) -> torch.Tensor:
    """``v * topk_mask(v, k)`` for the site input ``v[B, K]`` (values copied, same dtype): one
    program per row, radix select starting from the row's carried threshold (``hint``:
    :func:`new_hint`, updated in place; one pass instead of several when it moved little).
    ``v = producer.reference(x)``, computed inside the kernel (RMSNorm of x, or act(g) * u of
    x = [g | u]), so the producer's own kernels do not run. What decode runs before the dense
    GEMM at batch 2-16 (the custom op ``qsparse::masked_topk``)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, features], got shape {tuple(x.shape)}")
    if not producer.fuses(x):
        x, producer = producer.reference(x), NO_PRODUCER
    width = x.shape[1] // 2 if producer.kind.endswith("_glu") else x.shape[1]
    _check_x(x, producer.width(width))
    _check_k(k, width)
    _radix_digits(x.dtype, digit_bits)
    code, w, eps = _prod_args(producer, x)
    return masked_topk_op(
        x.contiguous(), k, digit_bits, _hint_arg(hint, x.shape[0], x.device), code, w, eps
    )


@torch.library.custom_op("qsparse::masked_topk", mutates_args=("hint",))
def masked_topk_op(
    x: torch.Tensor,
    k: int,
    digit_bits: int,
    hint: torch.Tensor,
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Launch behind :func:`masked_topk` (validated arguments; ``hint`` empty: none; ``prod``:
    :attr:`Producer.code`, ``prod_w`` its weight or empty). Returns [B, K]."""
    import triton

    from ._gemv_triton import _masked_topk_kernel

    bsz, width = x.shape
    width = width // 2 if prod >= 2 else width
    out = torch.empty(bsz, width, dtype=x.dtype, device=x.device)
    low, ndig = _radix_digits(x.dtype, digit_bits)
    use_hint = hint.numel() > 0
    _masked_topk_kernel[(bsz,)](
        x,
        out,
        hint if use_hint else out,
        prod_w if prod_w.numel() else out,
        eps,
        width,
        k,
        BLOCK=triton.next_power_of_2(width),
        LOW=low,
        NDIG=ndig,
        DBITS=digit_bits,
        HINT=use_hint,
        PROD=prod,
        BF16=x.dtype == torch.bfloat16,
        num_warps=select_warps_for(width),
    )
    return out


@masked_topk_op.register_fake
def _masked_topk_fake(x, k, digit_bits, hint, prod, prod_w, eps) -> torch.Tensor:
    width = x.shape[1] // 2 if prod >= 2 else x.shape[1]
    return x.new_empty((x.shape[0], width))


def new_hint(batch: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """A threshold-carry buffer for ``hint=`` of :func:`sparse_gemv` / :func:`ternary_gemv`
    (one per input site, for up to ``batch`` rows; zeros: the first call runs the full
    radix select). Each entry is a word :func:`hint_fields` reads."""
    return torch.zeros(batch, dtype=torch.int32, device=device)


def hint_fields(hint: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The fields of carried-threshold words (:func:`new_hint`) for inputs of ``dtype``:
    ``(key, e, calm)``, int32 tensors of ``hint``'s shape. ``key``: the last threshold's key
    ``thr >> LOW`` (:func:`_radix_digits`); ``e``: the band's bin width ``2^e`` of the next
    call's first pass; ``calm``: calls in a row a band half as wide would have held (the width
    shrinks at 8). fp32 keys fill the word (``e`` and ``calm`` 0); 16-bit dtypes keep the key
    in bits 0..23, ``calm`` in 24..26 and ``e`` in 28..29."""
    if _radix_digits(dtype)[0] < 8:  # LOW: fp32 keys leave no room
        return hint, torch.zeros_like(hint), torch.zeros_like(hint)
    return hint & 0xFFFFFF, (hint >> 28) & 3, (hint >> 24) & 7


def _hint_arg(hint: torch.Tensor | None, bsz: int, device: torch.device) -> torch.Tensor:
    """The ``hint`` the custom ops take: the caller's (validated) or an empty int32 tensor
    (no carry). Always a tensor: torch 2.11 mis-indexes a mutated argument left at None."""
    if hint is None:
        return torch.empty(0, dtype=torch.int32, device=device)
    if hint.dtype != torch.int32 or hint.numel() < bsz:
        raise ValueError(f"hint must be an int32 tensor of >= {bsz} entries (new_hint)")
    return hint


def prepare_dense(
    weight: torch.Tensor, block_n: int | None = None, align: int = 64
) -> torch.Tensor:
    """``nn.Linear.weight`` [N, K] -> the layout :func:`sparse_gemv` reads.

    ``block_n=None`` (default, fastest on an H100): row-major ``Wt`` [K, N'] with N zero-padded
    to ``N'``, a multiple of ``align`` (so no program has masked-off columns, which would cost
    the vectorized loads: 20.0 vs 9.9 us at 2048 -> 10920); a kept input's weights are one
    contiguous row and the programs reading it together cover it whole. ``block_n`` set:
    column panels ``[ceil(N / block_n), K, block_n]`` (zero-padded), so the kept rows one
    program reads lie in one contiguous panel. :func:`sparse_gemv`'s ``n_out`` drops padding.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
    if align < 1:
        raise ValueError(f"align must be >= 1 (columns), got {align}")
    wt = weight.t()
    n = wt.shape[1]
    pad = -n % (align if block_n is None else block_n)
    if pad:
        wt = torch.cat([wt, wt.new_zeros(wt.shape[0], pad)], dim=1)
    if block_n is None:
        return wt.contiguous()
    return wt.reshape(wt.shape[0], -1, block_n).permute(1, 0, 2).contiguous()


def dense_layout(wt: torch.Tensor) -> torch.Tensor:
    """Row-major ``Wt`` [K, N'] of a :func:`prepare_dense` result (``N'``: padded N)."""
    if wt.dim() == 2:
        return wt
    nblk, k_in, bn = wt.shape
    return wt.permute(1, 0, 2).reshape(k_in, nblk * bn)


_SEMAPHORES: dict[tuple[str, int], torch.Tensor] = {}


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for split GEMVs, one set per (device, stream): each call leaves
    them at zero again, so calls on one stream can share them (calls run one after another
    there); another stream gets its own set."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    sem = _SEMAPHORES.get(key)
    if sem is None or sem.numel() < count:
        sem = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = sem
    return sem


def _gemv_outputs(
    x: torch.Tensor, rows: int, n: int, out_dtype: torch.dtype, split: int, interp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, part) of a decode GEMV launch: ``y`` [rows, n] in ``out_dtype`` (fp32 under the
    interpreter, which casts to bf16/fp16 by truncation) and, for ``split > 1``, the fp32
    partial sums [split, rows, n] its programs sum (``_store_out``); else ``y`` stands in
    (never read)."""
    y = torch.empty(rows, n, dtype=torch.float32 if interp else out_dtype, device=x.device)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else y
    return y, part


def _wt_dims(wt: torch.Tensor) -> tuple[int, int, int | None]:
    """(K, N (padded), panel width; None for row-major) of a :func:`prepare_dense` result."""
    if wt.dim() == 3:
        nblk, k_in, panel = wt.shape
        return k_in, nblk * panel, panel
    if wt.dim() == 2:
        return wt.shape[0], wt.shape[1], None
    raise ValueError(f"wt must come from prepare_dense, got shape {tuple(wt.shape)}")


def _panels(wt: torch.Tensor, cfg: GemvConfig) -> tuple[int, int, int, int, int, int]:
    """(K, N (padded), block_n, row_stride, block_stride, programs per panel) of ``wt``."""
    k_in, n, panel = _wt_dims(wt)
    if panel is None:
        return k_in, n, cfg.block_n, n, cfg.block_n, 1
    block_n = min(cfg.block_n, panel)
    if panel % block_n:
        raise ValueError(f"cfg.block_n={cfg.block_n} must divide the panel width {panel} of wt")
    return k_in, n, block_n, panel, k_in * panel, panel // block_n


def sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    k: int | None = None,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_out: int | None = None,
    hint: torch.Tensor | None = None,
    producer: Producer = NO_PRODUCER,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y[B, N] = (x * M) @ W^T`` for ``x[B, K]`` and ``wt = prepare_dense(W)`` (``M``: top-``k``
    of |x| per row). Each program owns ``min(cfg.block_n, panel width)`` columns (which must
    divide the panel width; a row-major ``wt`` counts as one panel); ``cfg=None``:
    :func:`sparse_config_for` the shape. ``k=None`` (or
    ``k = K``) is a plain dense product (cuBLAS). ``rows``: :func:`compact_rows` of ``(x, k)``
    when already computed (the selection is then skipped). ``n_out``: keep the first ``n_out``
    columns (drops the panel padding). ``hint``: the site's threshold carry (:func:`new_hint`,
    see :func:`compact_rows`). ``producer``: x is what the site's producer reads (RMSNorm
    input, or the gate|up output [B, 2K]); at batch 1 the selection kernel computes the site
    input itself (:class:`Producer`), elsewhere :meth:`Producer.reference` runs first.
    ``residual``: ``d`` [B, K] of x's dtype, the output of the block before: the site reads the
    residual sum ``h = x + d`` (rounded to x's dtype, as the layer's add) and the call returns
    ``(y, h)``; at batch 1 with the RMSNorm producer the selection kernel forms h (and writes
    it), so the add runs as no kernel of its own (:func:`_residual_fused`). The kernels run
    inside the custom op ``qsparse::sparse_gemv``, so ``torch.compile`` traces a call without
    a graph break."""
    if residual is not None:
        _check_residual(x, residual)
        if cfg is None:
            cfg = sparse_config_for_weights(wt, k if k is not None else _wt_dims(wt)[0], x.shape[0])
        fused = _residual_fused(x, producer) and x.shape[0] == 1 and rows is None
        if not (fused and cfg.radix and k is not None and k < _panels(wt, cfg)[0]):
            h = x + residual
            return sparse_gemv(h, wt, k, cfg, out_dtype, rows, n_out, hint, producer), h
    if producer.kind != "none" and (
        x.dim() != 2 or x.shape[0] != 1 or rows is not None or not producer.fuses(x)
    ):
        x, producer = producer.reference(x), NO_PRODUCER
    if cfg is None:
        cfg = sparse_config_for_weights(wt, k if k is not None else _wt_dims(wt)[0], x.shape[0])
    k_in, _, _, _, _, _ = _panels(wt, cfg)
    _check_x(x, producer.width(k_in))
    _check_k(k, k_in)
    out_dtype = out_dtype or x.dtype
    if k is None or k == k_in:
        x = producer.reference(x)
        y = (x.to(wt.dtype) @ dense_layout(wt)).to(out_dtype)
        return y[:, :n_out] if n_out is not None else y
    if cfg.use_dot is False and x.shape[0] > 1:
        raise ValueError("cfg.use_dot=False supports batch 1 only")
    _radix_digits(x.dtype, cfg.digit_bits)  # validates digit_bits
    hint = _hint_arg(hint, x.shape[0], x.device)
    idx, val, cnt = rows if rows is not None else (None, None, None)
    code, w, eps = _prod_args(producer, x)
    add, res = _residual_args(x, residual)
    y = sparse_gemv_op(
        x.contiguous(), wt, k, idx, val, cnt, out_dtype, _cfg_ints(cfg), hint, code, w, eps,
        add, res,
    )  # fmt: skip
    y = y[:, :n_out] if n_out is not None else y
    return y if residual is None else (y, res)


@torch.library.custom_op("qsparse::sparse_gemv", mutates_args=("hint", "res"))
def sparse_gemv_op(
    x: torch.Tensor,
    wt: torch.Tensor,
    k: int,
    idx: torch.Tensor | None,
    val: torch.Tensor | None,
    cnt: torch.Tensor | None,
    out_dtype: torch.dtype,
    cfg: list[int],
    hint: torch.Tensor,
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
    add: torch.Tensor,
    res: torch.Tensor,
) -> torch.Tensor:
    """Sparse GEMV launch behind :func:`sparse_gemv` (validated arguments; ``cfg``:
    :func:`_cfg_ints`; ``hint`` updated in place, empty: none; ``prod``/``prod_w``/``eps``:
    the fused producer, :func:`_prod_args`; ``add``/``res``: the residual and the sum written,
    empty: none, :func:`_residual_args`). Returns [B, N (padded)] in ``out_dtype``."""
    rows = (idx, val, cnt) if idx is not None else None
    carry = hint if hint.numel() else None
    return _sparse_gemv_launch(
        x, wt, k, _cfg_from_ints(cfg), out_dtype, rows, carry, (prod, prod_w, eps),
        residual=(add, res) if add.numel() else None,
    )  # fmt: skip


@sparse_gemv_op.register_fake
def _sparse_gemv_fake(x, wt, k, idx, val, cnt, out_dtype, cfg, hint, prod, prod_w, eps, add, res):
    return x.new_empty((x.shape[0], _wt_dims(wt)[1]), dtype=out_dtype)


def _sparse_gemv_launch(
    x: torch.Tensor,
    wt: torch.Tensor,
    k: int,
    cfg: GemvConfig,
    out_dtype: torch.dtype,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    hint: torch.Tensor | None = None,
    prod: tuple[int, torch.Tensor, float] = (0, None, 0.0),
    list_rows: Callable[[bool, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    | None = None,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The list kernel (unless ``rows`` are given), then the sparse-input GEMV. ``list_rows(pdl,
    packed)``: launches a list kernel other than the top-k selection (:func:`compact_rows`'
    output format; ``pdl``: as a programmatic primary of the GEMV, ``packed``: packed words),
    e.g. the fixed-threshold list of :func:`qsparse.kernels.threshold_gemv.threshold_rows`."""
    import triton

    from ._gemv_triton import _compact_gemv_kernel

    k_in, n, block_n, row_stride, block_stride, ppp = _panels(wt, cfg)
    bsz = x.shape[0]
    interp = _interpreted(x)
    pdl = cfg.pdl and rows is None and _pdl_ok(x)
    if (
        cfg.carry
        and prod[0] == 0
        and hint is not None
        and rows is None
        and list_rows is None
        and bsz == 1
        and cfg.radix
        and wt.dim() == 2
        and triton.next_power_of_2(k_in) <= 16384  # the list kernel's packed scan
    ):
        return _carry_gemv_launch(x, wt, k, cfg, out_dtype, hint, pdl, interp)
    use_dot = bsz > 1 if cfg.use_dot is None else cfg.use_dot
    packed = cfg.packed and rows is None and not use_dot and _packs(x, k_in, cfg.radix)
    if rows is None and list_rows is not None:
        rows = list_rows(pdl, packed)
    idx, val, cnt = (
        rows
        if rows is not None
        else compact_rows(
            x,
            k,
            cfg.select_warps,
            cfg.radix,
            cfg.bits_per_pass,
            cfg.digit_bits,
            pdl,
            hint,
            *prod,
            packed=packed,
            residual=residual,
            wait=cfg.pdl,
        )
    )
    bb = max(16, triton.next_power_of_2(bsz)) if use_dot else 1
    split = max(1, cfg.split)
    y, part = _gemv_outputs(x, bsz, n, out_dtype, split, interp)
    grid = (triton.cdiv(n, block_n), split)
    sem = _semaphores(x.device, grid[0]) if split > 1 else cnt
    _compact_gemv_kernel[grid](
        idx,
        idx if packed else val,  # packed: val is empty and never read
        cnt,
        wt,
        y,
        part,
        sem,
        bsz,
        k_in,
        n,
        k if bsz == 1 else -1,
        row_stride,
        block_stride,
        BB=bb,
        BK=cfg.block_k,
        BN=block_n,
        PPP=ppp,
        SPLIT=split,
        USE_DOT=use_dot,
        DOT_F32=interp,
        STAGES=cfg.num_stages,
        CMASK=n % block_n != 0,
        PACKED=packed,
        EVICT=_weights_evict(interp),
        **_gemv_launch_opts(cfg, pdl, interp),
    )
    return y.to(out_dtype)


def _carry_gemv_launch(
    x: torch.Tensor,
    wt: torch.Tensor,
    k: int,
    cfg: GemvConfig,
    out_dtype: torch.dtype,
    hint: torch.Tensor,
    pdl: bool,
    interp: bool,
) -> torch.Tensor:
    """Batch 1 with a carried threshold: :func:`_band_list_kernel` (exact selection, the list
    of kept inputs inside the carried band) and :func:`_carry_gemv_kernel` (the inputs above
    the band while the selection runs, then the list), a programmatic dependent on Hopper."""
    import triton

    from ._gemv_triton import _band_list_kernel, _carry_gemv_kernel

    k_in, n = wt.shape
    block_n = cfg.block_n
    idx = torch.empty(k_in, dtype=torch.int32, device=x.device)
    val = torch.empty(1, k_in, dtype=torch.float32, device=x.device)
    cnt = torch.empty(3, dtype=torch.int32, device=x.device)
    low, ndig = _radix_digits(x.dtype, cfg.digit_bits)
    _band_list_kernel[(1,)](
        x,
        idx,
        val,
        cnt,
        hint,
        k_in,
        k,
        BLOCK=triton.next_power_of_2(k_in),
        LOW=low,
        NDIG=ndig,
        DBITS=cfg.digit_bits,
        PDL=pdl,
        num_warps=select_warps_for(k_in, cfg.select_warps),
    )
    split = max(1, cfg.split)
    grid = (triton.cdiv(n, block_n), split)
    y, part = _gemv_outputs(x, 1, n, out_dtype, split, interp)
    sem = _semaphores(x.device, grid[0] + 1)
    _carry_gemv_kernel[grid](
        x,
        hint,
        idx,
        val,
        cnt,
        wt,
        y,
        part,
        sem,
        k_in,
        n,
        n,
        BK=cfg.block_k,
        BN=block_n,
        SPLIT=split,
        STAGES=cfg.num_stages,
        LOW=low,
        DBITS=cfg.digit_bits,
        CMASK=n % block_n != 0,
        EVICT=_weights_evict(interp),
        **_gemv_launch_opts(cfg, pdl, interp),
    )
    return y.to(out_dtype)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary ``codes`` [N, K] (``nn.Linear`` layout, values in {-1, 0, 1}) -> int32
    [ceil(K/16), N].

    Word ``P[g, n]`` holds inputs ``16g..16g+15`` of output ``n`` as ``code + 1``: input
    ``16g + 4s + j`` in bits ``8j + 2s .. 8j + 2s + 1``, so ``(P >> 2s) & 0x03030303`` holds
    inputs ``16g + 4s .. 16g + 4s + 3`` in its four bytes, in the order of four consecutive
    int8 activations read as one int32. Inputs past ``K`` (padding to a multiple of 16) hold
    code 0 (weight 0).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out_features, in_features], got {tuple(codes.shape)}")
    n, k_in = codes.shape
    c = codes.to(torch.int64) + 1  # [N, K] in {0, 1, 2}
    if bool(((c < 0) | (c > 2)).any()):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    pad = -k_in % 16
    if pad:
        c = torch.cat([c, torch.ones(n, pad, dtype=c.dtype, device=c.device)], dim=1)
    c = c.reshape(n, (k_in + pad) // 16, 4, 4)  # [N, g, s, j]
    j = torch.arange(4, device=c.device, dtype=torch.int64)
    shifts = 2 * j[:, None] + 8 * j[None, :]  # [s, j]
    words = (c << shifts).sum((-1, -2))  # < 2^32, fits int64
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).t().contiguous()


def unpack_ternary(packed: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int32 [G, N] -> int8 codes [N, in_features]
    (``in_features`` default ``16 * G``)."""
    g, n = packed.shape
    j = torch.arange(4, device=packed.device, dtype=torch.int64)
    shifts = 2 * j[:, None] + 8 * j[None, :]  # [s, j]
    c = (packed.t().to(torch.int64)[:, :, None, None] >> shifts) & 3  # [N, G, s, j]
    c = c.reshape(n, g * 16)[:, : (in_features or g * 16)]
    return (c - 1).to(torch.int8).contiguous()


def ternarize(weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, float]:
    """BitNet b1.58 absmean ternarization of a ``[N, K]`` weight: (int8 codes, alpha)."""
    alpha = weight.detach().float().abs().mean().clamp_min(eps)
    codes = (weight.detach().float() / alpha).round().clamp(-1, 1).to(torch.int8)
    return codes, float(alpha)


def _alpha_arg(alpha: float | torch.Tensor, n: int, device: torch.device):
    if not isinstance(alpha, torch.Tensor):
        return None, float(alpha)
    if alpha.numel() != n:
        raise ValueError(f"alpha must be a float or an [{n}] tensor, got {tuple(alpha.shape)}")
    return alpha.to(device=device, dtype=torch.float32).reshape(n).contiguous(), 0.0


def ternary_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None = None,
    act_bits: int | None = 8,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    hint: torch.Tensor | None = None,
    producer: Producer = NO_PRODUCER,
    subln: SubLN | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y[B, N] = alpha * (Q(v) * M) @ T`` with ``T = unpack_ternary(packed, K).T`` ([K, N])
    and the site input ``v = subln(producer(x))`` (each optional, computed inside the
    activation kernel: ``x`` is then what the producer reads, e.g. the layer's input before its
    RMSNorm; a producer or SubLN the kernel cannot compute for x's dtype runs in PyTorch first).

    ``Q``: per-row absmax quantization to ``act_bits`` (2..8 bits; ``None``: float
    activations, served by a dequantized cuBLAS product, no kernel), ``M``: top-``k`` of |x|
    (``None``: dense). ``alpha``: a float or an fp32 [N] tensor (one scale per output
    column, for fused projections such as q|k|v). Two kernels: one program per row
    quantizes (and selects) and writes the int8 codes; the GEMV streams the packed weights
    once for the whole batch (on Hopper it starts during the first kernel, ``cfg.pdl``).
    ``cfg`` default: :func:`ternary_config_for` (batch 1: :data:`TERNARY_CONFIG`, or
    :data:`TERNARY_SPARSE_CONFIG` with top-k; batch > 1: :func:`ternary_split_config`). The
    kernels run inside the custom op ``qsparse::ternary_gemv`` (no ``torch.compile`` graph
    break). ``hint``: the site's threshold carry with top-k (:func:`new_hint`, see
    :func:`compact_rows`). ``residual``: ``d`` [B, K] of x's dtype, the output of the block
    before: the site reads the residual sum ``h = x + d`` (rounded to x's dtype) and the call
    returns ``(y, h)``; with the RMSNorm producer the activation kernel forms h (and writes it),
    elsewhere it is summed in PyTorch first.
    """
    if residual is not None:
        _check_residual(x, residual)
        if not (_residual_fused(x, producer) and act_bits is not None):
            h = x + residual
            y = ternary_gemv(h, packed, alpha, k, act_bits, cfg, out_dtype, hint, producer, subln)
            return y, h
    if (producer.kind != "none" or subln is not None) and (
        x.dim() != 2
        or act_bits is None
        or not producer.fuses(x)
        or (subln is not None and not subln.fuses(x))
    ):
        x = producer.reference(x)
        x = subln.reference(x) if subln is not None else x
        producer, subln = NO_PRODUCER, None
    width = x.shape[-1] // 2 if producer.kind.endswith("_glu") else x.shape[-1]
    sparse_in = k is not None and x.dim() == 2 and k < width
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D int32 tensor (pack_ternary), got {packed.dtype}")
    g, n = packed.shape
    if x.dim() == 2 and -(-width // 16) != g:
        raise ValueError(f"x has {width} features, the packed weight expects {16 * g}")
    k_in = width if x.dim() == 2 else 16 * g
    cfg = cfg or ternary_config_for(x.shape[0] if x.dim() == 2 else 1, sparse_in, n, k_in)
    _check_x(x, producer.width(k_in))
    _check_k(k, k_in)
    out_dtype = out_dtype or x.dtype
    if act_bits is not None and not 2 <= act_bits <= 8:
        raise ValueError(
            f"act_bits must be in [2, 8] or None for the ternary kernel, got {act_bits}"
        )
    if act_bits is None:
        return ternary_gemv_reference(x, packed, alpha, k, None).to(out_dtype)
    alpha_vec, alpha_f = _alpha_arg(alpha, packed.shape[1], x.device)
    _radix_digits(x.dtype, cfg.digit_bits)  # validates digit_bits
    hint = _hint_arg(hint, x.shape[0], x.device)
    code, w, eps = _prod_args(producer, x)
    nw = subln.weight.contiguous() if subln is not None else x.new_empty(0)
    neps = float(subln.eps) if subln is not None else 0.0
    add, res = _residual_args(x, residual)
    y = ternary_gemv_op(
        x.contiguous(),
        packed,
        alpha_vec,
        alpha_f,
        -1 if k is None else k,
        act_bits,
        out_dtype,
        _cfg_ints(cfg),
        hint,
        code,
        w,
        eps,
        nw,
        neps,
        add,
        res,
    )
    return y if residual is None else (y, res)


@torch.library.custom_op("qsparse::ternary_gemv", mutates_args=("hint", "res"))
def ternary_gemv_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha_vec: torch.Tensor | None,
    alpha_f: float,
    k: int,
    act_bits: int,
    out_dtype: torch.dtype,
    cfg: list[int],
    hint: torch.Tensor,
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
    subln_w: torch.Tensor,
    subln_eps: float,
    add: torch.Tensor,
    res: torch.Tensor,
) -> torch.Tensor:
    """Ternary GEMV launch behind :func:`ternary_gemv` (validated arguments; ``k`` -1: dense;
    ``alpha_vec`` None: the scalar ``alpha_f``; ``cfg``: :func:`_cfg_ints`; ``hint`` updated
    in place, empty: none; ``prod``: :attr:`Producer.code`, ``prod_w`` its weight or empty;
    ``subln_w``: the SubLN weight, empty: none; ``add``/``res``: the residual and the sum
    written, empty: none, :func:`_residual_args`). Returns [B, N] in ``out_dtype``."""
    import triton

    from ._gemv_triton import _ternary_dp4a_kernel, _ternary_mma_kernel, _ternary_prep_kernel

    cfg = _cfg_from_ints(cfg)
    g, n = packed.shape
    k_in = x.shape[1] // 2 if prod >= 2 else x.shape[1]
    k = None if k < 0 else k
    bsz = x.shape[0]
    interp = _interpreted(x)
    pdl = cfg.pdl and _pdl_ok(x)
    sparse = k is not None and k < k_in
    xq = torch.empty(bsz, 16 * g, dtype=torch.int8, device=x.device)
    qsum = torch.empty(bsz, dtype=torch.int32, device=x.device)
    scale = torch.empty(bsz, dtype=torch.float32, device=x.device)
    low, ndig = _radix_digits(x.dtype, cfg.digit_bits)
    use_hint = hint.numel() > 0 and sparse
    _ternary_prep_kernel[(bsz,)](
        x,
        xq,
        qsum,
        scale,
        hint if use_hint else qsum,
        k_in,
        16 * g,
        k if k is not None else k_in,
        BLOCK=triton.next_power_of_2(16 * g),
        SPARSE=sparse,
        QMAX=2 ** (act_bits - 1) - 1,
        LOW=low,
        NDIG=ndig,
        DBITS=cfg.digit_bits,
        PDL=pdl,
        HINT=use_hint,
        w_ptr=prod_w if prod_w.numel() else x,  # x: a pointer the kernel never reads
        eps=eps,
        nw_ptr=subln_w if subln_w.numel() else x,
        neps=subln_eps,
        PROD=prod,
        SUBLN=subln_w.numel() > 0,
        BF16=x.dtype == torch.bfloat16,
        d_ptr=add if add.numel() else x,  # x: never read without ADD
        r_ptr=res if add.numel() else x,
        ADD=add.numel() > 0,
        num_warps=select_warps_for(k_in, cfg.select_warps),
        **_wait_opts(x, cfg.pdl),
    )
    alpha_arg = alpha_vec if alpha_vec is not None else scale
    split = max(1, cfg.split)
    y, part = _gemv_outputs(x, bsz, n, out_dtype, split, interp)
    sem = _semaphores(x.device, triton.cdiv(n, cfg.block_n)) if split > 1 else qsum
    if bsz > 1 and cfg.use_dot:
        # tensor cores: int8 codes x int8 activations, batch padded to 16
        _ternary_mma_kernel[(triton.cdiv(n, cfg.block_n), split)](
            xq,
            qsum,
            scale,
            packed,
            y,
            alpha_arg,
            alpha_f,
            part,
            sem,
            bsz,
            g,
            n,
            16 * g,
            BB=max(16, triton.next_power_of_2(bsz)),
            BG=cfg.block_k,
            BN=cfg.block_n,
            SPLIT=split,
            ALPHA_VEC=alpha_vec is not None,
            DOT_F32=interp,
            STAGES=cfg.num_stages,
            **_gemv_launch_opts(cfg, pdl, interp),
        )
        return y.to(out_dtype)
    _ternary_dp4a_kernel[(triton.cdiv(n, cfg.block_n), split)](
        xq.view(torch.int32),
        qsum,
        scale,
        packed,
        y,
        alpha_arg,
        alpha_f,
        bsz,
        g,
        n,
        BB=triton.next_power_of_2(bsz),
        BG=cfg.block_k,
        BN=cfg.block_n,
        ALPHA_VEC=alpha_vec is not None,
        part_ptr=part,
        sem_ptr=sem,
        SPLIT=split,
        EVICT=_weights_evict(interp),
        **_gemv_launch_opts(cfg, pdl, interp),
    )
    return y.to(out_dtype)


@ternary_gemv_op.register_fake
def _ternary_gemv_fake(
    x, packed, alpha_vec, alpha_f, k, act_bits, out_dtype, cfg, hint, prod, prod_w, eps, sw, seps,
    add, res,
):  # fmt: skip
    return x.new_empty((x.shape[0], packed.shape[1]), dtype=out_dtype)


def sparse_gemv_reference(x: torch.Tensor, wt: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """fp32 reference of :func:`sparse_gemv`: ``(x * topk_mask(x, k)) @ Wt``, cast to x.dtype
    (``wt``: row-major [K, N] or panels; the output keeps the panel padding)."""
    xs = x * topk_mask(x, k) if k is not None and k < x.shape[-1] else x
    acc = torch.promote_types(x.dtype, torch.float32)
    return (xs.to(acc) @ dense_layout(wt).to(acc)).to(x.dtype)


def ternary_gemv_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None = None,
    act_bits: int | None = 8,
) -> torch.Tensor:
    """fp32 reference of :func:`ternary_gemv` (dequantized activations times alpha * T)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xq = absmax_quantize(x.to(acc), act_bits, ste=False) if act_bits else x.to(acc)
    if k is not None and k < x.shape[-1]:
        xq = xq * topk_mask(x, k)
    t = unpack_ternary(packed, x.shape[-1]).to(acc)  # [N, K]
    a = alpha.to(device=x.device, dtype=acc) if isinstance(alpha, torch.Tensor) else alpha
    return (F.linear(xq, t) * a).to(x.dtype)
