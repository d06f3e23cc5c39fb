"""Tests needing an optional extra skip, naming it, where it is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pytest in a process where `import <module>` fails as if its extra were not installed
PYTEST_WITHOUT = textwrap.dedent(
    """
    import sys
    sys.modules[{module!r}] = None  # import raises ModuleNotFoundError, find_spec returns None
    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
    """
)


def pytest_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run pytest with ``args`` in a fresh process where ``module`` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", PYTEST_WITHOUT.format(module=module), "-p", "no:cacheprovider"]
        + list(args),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_kernel_tests_skip_with_a_reason_without_triton() -> None:
    proc = pytest_without("triton", "-q", "-rs", str(ROOT / "tests" / "test_kernels.py"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("'kernels' extra" in line for line in skipped), proc.stdout[-4000:]


def test_eval_tests_collect_without_lm_eval() -> None:
    """``pytest -m gpu`` (any selection) on a machine without the 'eval' extra collects
    tests/test_eval.py; only the tests that need lm-eval skip."""
    proc = pytest_without("lm_eval", "--collect-only", "-q", str(ROOT / "tests" / "test_eval.py"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "test_run_lm_eval_on_local_tasks" in proc.stdout
