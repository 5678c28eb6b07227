"""Studies: hyperparameter sweeps and scaling ladders over the trainer, and the `scaleplan` CLI."""
