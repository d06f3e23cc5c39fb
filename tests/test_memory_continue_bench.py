"""benchmarks/memory_continue.py runs its variants one after another in one session: each run
gets its own folder, so the second never meets the first one's finished run (the H200 call
of 2026-12-02 lost its adamw8bit no-checkpointing row to exactly that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_variants_in_a_row_each_finish(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    script = [sys.executable, str(ROOT / "benchmarks" / "memory_continue.py")]
    ckpt = tmp_path / "ckpt"
    subprocess.run([*script, "make", str(ckpt), "--preset", "tiny"], check=True, env=env)
    out = tmp_path / "out.jsonl"
    for extra in (["--gc"], []):
        cmd = [*script, "run", str(ckpt), "--optim", "adamw", "--trainer", "cpu", "--batch", "2"]
        cmd += ["--seq", "32", "--steps", "3", "--json", str(out), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["gradient_checkpointing"] for r in rows] == [True, False]
    assert all(r["train_loss"] is not None and r["train_loss"] > 0 for r in rows)
