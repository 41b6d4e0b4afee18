"""Training: one fold (loop, runtime, checkpoints, distributed) and one experiment (run folder)."""
