"""``qsparse-train`` / ``python -m qsparse.train``: Hydra entry point of training.

    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo
    qsparse-train recipe=from_scratch/qsparse model=700M trainer=ddp
    qsparse-train -m recipe=from_scratch/qsparse_tiny sparsity.ratio=0.3,0.6 sweep_name=s1
    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo resume=true

The config directory ``qsparse/conf`` ships inside the package, so installed users get the
same groups and recipes (``--info defaults`` lists what a command composes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qsparse.training.config import ConfigError  # also registers train_schema


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from qsparse.training.run import train

    try:
        train(cfg)
    except ConfigError as exc:  # a user's mistake: the message, not a traceback
        _record_error(exc)
        print(f"qsparse-train: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        _record_error(exc)
        raise


def _record_error(exc: BaseException) -> None:
    """Write the traceback to ``<job output dir>/error.txt`` so that ``qsparse-report`` can
    say why a sweep job failed (the multirun itself only stops at the end)."""
    import traceback

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text("".join(traceback.format_exception(exc)))
    except Exception:  # never hide the original error
        pass


def main() -> None:
    """Console-script entry (``qsparse-train``). A config error (bad value, missing required
    key) prints one line naming the key and exits with status 2; a misspelled key is reported by
    Hydra while composing (status 1); other failures keep their traceback."""
    _main()


if __name__ == "__main__":
    main()
