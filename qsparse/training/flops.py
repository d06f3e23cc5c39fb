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

# (substring of torch.cuda.get_device_name(), dtype) -> peak dense FLOP/s (no 2:4 sparsity).
# "fp32" on tensor-core GPUs means TF32 (what float32 matmuls use with high precision off).
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def precision_dtype(precision: str | int | None) -> str:
    """Map a Lightning precision setting (``"bf16-mixed"``, ``"32-true"``, 16, ...) to a
    key of the peak table: ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    p = str(precision or "32").lower()
    if "bf16" in p:
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    return "fp32"


def peak_flops(device: torch.device | str, dtype: str) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` (``bf16``/``fp16``/``fp32``), ``None`` when
    unknown (CPU, unlisted GPU): then no MFU is reported rather than a made-up one."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def peak_flops_for_name(name: str, dtype: str) -> float | None:
    """Look ``name`` (e.g. ``"NVIDIA H100 80GB HBM3"``) up in the peak table."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype={dtype!r} must be one of bf16, fp16, fp32")
    for key, peaks in _PEAKS:
        if key.lower() in name.lower():
            return peaks.get(dtype)
    return None
