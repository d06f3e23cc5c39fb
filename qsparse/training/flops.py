"""Peak dense matrix-multiply throughput by device, for model FLOPs utilisation (MFU).

``MFU = tokens_per_s * flops_per_token / (peak_flops * n_devices)`` where ``flops_per_token``
counts the model's dense training FLOPs (forward + backward, ``~6 N`` plus attention), so
MFU compares runs independently of how much work sparsity could skip.

The table is ours rather than Lightning's ``get_available_flops`` (lightning 2.6) for the
device this project measures on: Lightning keys the H200 as ``h200 sxm1`` / ``h200 nvl1``,
which the device name ``NVIDIA H200`` does not match (no peak, no MFU), and its H200 entries
are the 2:4-sparse peaks (bf16 2.0 / 1.7 PFLOP/s, twice the dense 989 / 835 TFLOP/s).
"""

from __future__ import annotations

import torch

from ..dtypes import ALIASES, DTYPES, dtype_names

# (substring of torch.cuda.get_device_name(), dtype) -> peak dense FLOP/s (no 2:4 sparsity).
# "float32" on tensor-core GPUs means TF32 (what float32 matmuls use with high precision off).
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("GH200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),  # SXM
    ("H800", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("B200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("A10G", {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("RTX 4090", {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
    ("T4", {"float16": 65e12, "float32": 8.1e12}),
)


def precision_dtype(precision: str | int | None) -> str:
    """Map a Lightning precision setting (``"bf16-mixed"``, ``"32-true"``, 16, ...) to the
    dtype name (:mod:`qsparse.dtypes`) its matrix multiplies run in: ``"bfloat16"``,
    ``"float16"`` or ``"float32"``."""
    p = str(precision or "32").lower()
    if "bf16" in p:
        return "bfloat16"
    if p.startswith("16"):
        return "float16"
    return "float32"


def peak_flops(device: torch.device | str, dtype: str) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` (a name of :mod:`qsparse.dtypes`:
    ``bfloat16``/``float16``/``float32`` or ``bf16``/``fp16``/``fp32``), ``None`` when unknown
    (CPU, unlisted GPU): then no MFU is reported rather than a made-up one."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def peak_flops_for_name(name: str, dtype: str) -> float | None:
    """Look ``name`` (e.g. ``"NVIDIA H100 80GB HBM3"``) up in the peak table."""
    key = ALIASES.get(dtype, dtype)
    if key not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {dtype_names()}")
    for device, peaks in _PEAKS:
        if device.lower() in name.lower():
            return peaks.get(key)
    return None
