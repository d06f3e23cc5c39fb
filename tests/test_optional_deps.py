"""Tests needing an optional extra skip, naming it, where it is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pytest in a process where `import triton` fails as if the 'kernels' extra were absent
WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # import raises ModuleNotFoundError, find_spec returns None
    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
    """
)


def test_kernel_tests_skip_with_a_reason_without_triton() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON, "-q", "-rs", "-p", "no:cacheprovider"]
        + [str(ROOT / "tests" / "test_kernels.py")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("'kernels' extra" in line for line in skipped), proc.stdout[-4000:]
