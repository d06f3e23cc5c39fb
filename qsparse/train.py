"""``python -m qsparse.train [overrides]``: same as the ``qsparse-train`` console script."""

from qsparse.cli.train import main

if __name__ == "__main__":
    main()
