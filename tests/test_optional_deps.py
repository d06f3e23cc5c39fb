"""Optional extras: tests needing one skip, naming it, where it is not installed; a feature
needing one says which extra to install; the extras table matches pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def test_extras_table_matches_pyproject() -> None:
    """Every extra in pyproject.toml is in the table of ``qsparse.extras`` and back."""
    import re

    import qsparse.extras

    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(declared["optional-dependencies"])
    table = set(re.findall(r"^(\w+)\s{2,}", qsparse.extras.__doc__, flags=re.MULTILINE))
    assert extras == table - {"extra"}
    assert not any("torch==" in dep for dep in declared["dependencies"])  # a range, not a pin
    imported = set()
    for path in (ROOT / "qsparse").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:import|from) (\w+)", path.read_text(), re.MULTILINE))
    assert "torchmetrics" not in imported and "torchmetrics" not in str(declared)


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without matplotlib / bitsandbytes / scipy, the feature that needs one says which extra
    brings it."""
    from qsparse.analysis.scaling_law import PAPER_FULL_PRECISION
    from qsparse.extras import MissingExtraError
    from qsparse.training.optim_8bit import _import_bnb_optim
    from qsparse.training.plots import plot_loss_curve

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,5.0\n1,4.0\n")
    for name in ("matplotlib", "bitsandbytes", "bitsandbytes.optim", "scipy", "scipy.optimize"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError, match=r"loss curve .*pip install 'qsparse\[plots\]'"):
        plot_loss_curve(tmp_path, tmp_path / "curve.png")
    with pytest.raises(MissingExtraError, match=r"optim=adamw8bit .*'qsparse\[adamw8bit\]'"):
        _import_bnb_optim()
    with pytest.raises(MissingExtraError, match=r"S\* needs scipy.*'qsparse\[report\]'"):
        PAPER_FULL_PRECISION.optimal_sparsity()


def test_eval_tests_collect_without_lm_eval() -> None:
    """``pytest -m gpu`` (any selection) on a machine without the 'eval' extra collects
    tests/test_eval.py; only the tests that need lm-eval skip."""
    proc = pytest_without("lm_eval", "--collect-only", "-q", str(ROOT / "tests" / "test_eval.py"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "test_run_lm_eval_on_local_tasks" in proc.stdout
