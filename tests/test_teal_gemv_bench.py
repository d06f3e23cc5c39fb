"""benchmarks/teal_gemv.py (TEAL's threshold through the sparse-input GEMV): its correctness
check through the Triton interpreter on CPU, and the FIGURE keys its run_all rows read."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import _figures, registry, run_all  # noqa: E402
from benchmarks import teal_gemv as tg  # noqa: E402


def test_threshold_rows_list_the_kept_inputs_by_hand() -> None:
    import torch

    x = torch.tensor([[0.5, -2.0, 0.1, 1.5, -0.3]])
    idx, val, cnt = tg.threshold_rows_torch(x, 0.4)  # keeps |x| > 0.4: inputs 0, 1, 3
    assert int(cnt[0]) == 3 and idx[:3].tolist() == [0, 1, 3]
    assert val[0, :3].tolist() == [0.5, -2.0, 1.5] and val[0, 3:].tolist() == [0.0, 0.0]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_threshold_gemv_matches_the_reference_under_the_interpreter() -> None:
    from conftest import run_interpreted

    script = (
        "from benchmarks import teal_gemv as tg\n"
        "tg.main(['--device', 'cpu', '--check-only', '--calibration', '64'])\n"
    )
    out = run_interpreted(script, timeout=600)
    assert out.count("threshold list + GEMV ok") == len(tg.CPU_SHAPES) * len(tg.SPARSITIES)


def test_teal_gemv_emits_every_key_its_rows_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Timing stubbed, shapes shrunk (same names), on CPU: the keys cover the rows."""
    assert registry._SHAPES_7B == tg.SHAPES
    bench = next(b for b in run_all.REGISTRY if b.id == "teal_gemv")
    times = iter(range(100, 1000))
    monkeypatch.setattr(tg, "SHAPES", {name: (64, 32) for name in tg.SHAPES})
    monkeypatch.setattr(tg, "check", lambda *args: None)
    monkeypatch.setattr(tg, "time_graph", lambda calls: float(next(times)))
    tg.main([*bench.args, "--device", "cpu", "--buffers", "1", "--calibration", "16"])
    figures = _figures.parse(capsys.readouterr().out)
    assert figures["teal_gemv.qkv_S0.4.threshold"]["value"] == pytest.approx(100 / 103)
    assert 40 < figures["teal_gemv.qkv_S0.4.kept_pct"]["value"] < 80
    for row in bench.rows:
        assert run_all.fill(row.value, figures) is not None, row.value
