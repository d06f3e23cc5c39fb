"""wandb sweep files that drive ``qsparse-train``, and their offline runner (``qsparse-sweep``)."""
