"""``qsparse-train`` / ``python -m qsparse.train``: Hydra entry point of training.

    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo
    qsparse-train recipe=from_scratch/qsparse model=700M trainer=ddp
    qsparse-train -m recipe=from_scratch/qsparse_tiny sparsity.ratio=0.3,0.6 sweep_name=s1
    qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo resume=true

The config directory ``qsparse/conf`` ships inside the package, so installed users get the
same groups and recipes (``--info defaults`` lists what a command composes).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from qsparse.training.run import train

    train(cfg)


def main() -> None:
    """Console-script entry (``qsparse-train``). Hydra reports a failing job (a config error
    names the key) on stderr and exits with status 1."""
    _main()


if __name__ == "__main__":
    main()
