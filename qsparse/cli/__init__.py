"""Command-line entry points (Hydra): ``qsparse-train`` and friends."""
