"""Training: the trainer's loop, the iteration's four phases, the engines and networks per role,
the generator's EMA, metrics and per-rank logs."""
