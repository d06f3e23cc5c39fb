"""The ``qsparse-train`` entry point end to end on tiny configs: exact resume after a crash,
``-m`` multirun grouped in wandb offline files, 2-process DDP on CPU (gloo), configuration
errors raised before any training naming the key."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from hydra.errors import ConfigCompositionException

import qsparse.training.config  # noqa: F401  (registers the schema)
from qsparse.training.callbacks import SimulatedCrash
from qsparse.training.metrics_csv import read_metrics
from qsparse.training.run import train

ROOT = Path(__file__).resolve().parents[1]
# random tokens, the tiny model: seconds per run
FAST = [
    "data=random",
    "data.vocab_size=128",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.num_train=256",
    "data.num_val=8",
    "debug=fast",
    "export=false",
]


def _cli(
    args: list[str], cwd: Path, timeout: int = 240, pythonpath: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    path = os.pathsep.join(str(p) for p in (ROOT, *pythonpath))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path, "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "qsparse.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qsparse_cache")


def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path, data_cache: Path) -> None:
    """N steps == N/2 (+ 2 steps lost in a crash) + resume + N/2, on the real wiki data: the
    resumed run matches the uninterrupted one at every step up to checkpoint + 10."""
    n = 20
    common = [
        "recipe=from_scratch/qsparse_tiny",
        f"data.cache_dir={data_cache}",
        "data.max_documents=300",
        "data.vocab_size=384",
        "data.seq_len=32",
        "data.batch_size=4",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_hidden_layers=2",
        f"trainer.max_steps={n}",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "scheduler.warmup_steps=2",
        f"callbacks.checkpoint.every_n_train_steps={n // 2}",
        "export=false",
    ]
    full = train(compose_train([*common, f"run_dir={tmp_path / 'full'}", "logger=csv"]))

    split = tmp_path / "split"
    crash = [
        "+callbacks.crash._target_=qsparse.training.callbacks.StopAtStep",
        f"+callbacks.crash.step={n // 2 + 2}",
        "+callbacks.crash.mode=crash",
    ]
    with pytest.raises(SimulatedCrash):
        train(compose_train([*common, f"run_dir={split}", "logger=wandb", *crash]))
    run_id = (split / "wandb_run_id").read_text().strip()
    resumed = train(compose_train([*common, f"run_dir={split}", "logger=wandb", "resume=true"]))

    assert resumed["step"] == full["step"] == n
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-4)
    a, b = read_metrics(tmp_path / "full"), read_metrics(split)
    for key in ("train/loss", "train/lr"):
        xs, ys = dict(a[key]), dict(b[key])
        assert sorted(xs) == sorted(ys) == list(range(n))
        for step in xs:
            assert ys[step] == pytest.approx(xs[step], abs=1e-4), (key, step)
    # the resumed leg continued the same wandb run (same id, a second offline segment)
    assert (split / "wandb_run_id").read_text().strip() == run_id
    segments = sorted((split / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) >= 1 and all(s.name.endswith(run_id) for s in segments)


def test_resume_without_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume=true"):
        train(compose_train([*FAST, f"run_dir={tmp_path}", "resume=true"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sparsity.ratio=1.5", "sparsity.ratio"),
        ("sparsity.pattern=topk", "sparsity.pattern"),
        ("optim.lr=-0.001", "optim.lr"),
        ("scheduler.warmup_steps=-5", "scheduler.warmup_steps"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("quant.act_bits=1", "quant.act_bits"),
    ],
)
def test_out_of_range_value_fails_before_training(tmp_path: Path, override: str, key: str) -> None:
    cfg = compose_train([*FAST, f"run_dir={tmp_path}", override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sparsity.ratoi=0.3", "ratoi"),  # Hydra refuses to compose it
        ("sparsity.ratio=abc", "sparsity.ratio"),  # typed by the schema
        ("+sparsity.ratoi=0.3", "ratoi"),  # '+' passes Hydra; the schema check stops it
        ("+quant.bits=8", "bits"),
        ("+logger.wandb.projct=x", "projct"),
        ("+lerning_rate=1", "lerning_rate"),
    ],
)
def test_misspelled_key_fails_before_training(tmp_path: Path, override: str, key: str) -> None:
    try:
        cfg = compose_train([*FAST, "logger=wandb", f"run_dir={tmp_path}", override])
    except ConfigCompositionException as exc:
        assert key in str(exc) + str(exc.__cause__)
        return
    with pytest.raises(ValueError, match=key) as info:
        train(cfg)
    assert "config error" in str(info.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()


def test_cli_reports_bad_key_and_value_without_training(tmp_path: Path) -> None:
    bad_key = _cli([*FAST, "sparsity.ratoi=0.3", f"run_dir={tmp_path / 'a'}"], tmp_path)
    assert bad_key.returncode != 0
    assert "ratoi" in bad_key.stderr
    bad_value = _cli([*FAST, "sparsity.ratio=1.2", f"run_dir={tmp_path / 'b'}"], tmp_path)
    assert bad_value.returncode == 2
    assert "qsparse-train: sparsity.ratio=1.2 is outside [0, 1)" in bad_value.stderr
    assert "Traceback" not in bad_value.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()
    # a misspelled recipe is an error, not the base config trained in its place
    typo = _cli([*FAST, "recipe=from_scratch/qsparse_tyni", f"run_dir={tmp_path / 'c'}"], tmp_path)
    assert typo.returncode != 0
    assert "Could not find 'recipe/from_scratch/qsparse_tyni'" in typo.stderr
    assert not (tmp_path / "c").exists()


def test_multirun_sweep_makes_two_grouped_wandb_runs(tmp_path: Path) -> None:
    """Two sweep jobs, each a wandb run of the sweep's group; the command's output holds its
    own lines, not the libraries' tips, INFO lines or known warnings."""
    res = _cli(
        [
            "-m",
            *FAST,
            "sparsity=topk",
            "sparsity.ratio=0.3,0.6",
            "logger=wandb",
            "sweep_name=ratio_sweep",
            "trainer.max_steps=2",
            "export=true",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("exported transformers folder") == 2
    for noise in ("GPU available", "Tip:", "LeafSpec", "anonymous", "stopped:", "shards"):
        assert noise not in res.stdout + res.stderr, noise
    jobs = sorted((tmp_path / "multirun" / "ratio_sweep").glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    ids, ratios = set(), []
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, job
        run_id, group = _wandb_run_record(runs[0])
        assert group == "ratio_sweep"  # jobs of one sweep share the wandb group
        assert run_id == (job / "wandb_run_id").read_text().strip()
        ids.add(run_id)
        ratios.append(float(_yaml_value(job / "config.yaml", "ratio")))
    assert len(ids) == 2
    assert ratios == [0.3, 0.6]
    summaries = [read_metrics(job) for job in jobs]
    assert all("sparsity/overall" in s for s in summaries)


def _wandb_run_record(path: Path) -> tuple[str, str]:
    """(run id, group) from an offline ``.wandb`` file: a ``:W&B`` header (7 bytes) then
    LevelDB-log framed protobuf ``Record``s (32 KiB blocks, 7-byte chunk headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record / last chunk
            raw, buf = (chunk if kind == 1 else buf + chunk), b""
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "run":
                return record.run.run_id, record.run.run_group
        elif kind in (2, 3):  # first / middle chunk
            buf += chunk
    raise AssertionError(f"no run record in {path}")


def _yaml_value(path: Path, key: str) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(path).sparsity[key])


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """Two gloo ranks: each reads its own shard of the data, and after every step their
    parameters are bitwise equal (gradients all-reduced) and differ from the start."""
    run_dir, probe_dir = tmp_path / "ddp", tmp_path / "probe"
    probe = [
        "+callbacks.probe._target_=train_probe.RankProbe",
        f"+callbacks.probe.out_dir={probe_dir}",
    ]
    res = _cli(
        [*FAST, "trainer=ddp_cpu", "logger=csv", f"run_dir={run_dir}", "sparsity=topk", *probe],
        tmp_path,
        pythonpath=(ROOT / "tests",),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["step"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows)
    r0, r1 = (json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["batches"]) == len(r1["batches"]) == 4
    samples = [{tuple(s) for b in r["batches"] for s in b} for r in (r0, r1)]
    assert not samples[0] & samples[1], "the two ranks trained on overlapping samples"
    assert r0["initial"] == r1["initial"], "ranks started from different weights"
    assert r0["final"] == r1["final"], "parameters diverged: gradients were not synchronised"
    assert all(r0["final"][n] != h for n, h in r0["initial"].items() if "weight" in n)


def test_run_without_validation_still_finishes(tmp_path: Path) -> None:
    """No validation batches (trainer.limit_val_batches=0): the summary is still written, so
    the run counts as finished (resume=true then says so)."""
    from qsparse.training.run import train

    run_dir = tmp_path / "noval"
    cfg = compose_train([*FAST, "logger=csv", f"run_dir={run_dir}", "trainer.limit_val_batches=0"])
    summary = train(cfg)
    assert summary["step"] >= 1 and "val_loss" not in summary
    assert json.loads((run_dir / "summary.json").read_text())["step"] == summary["step"]
