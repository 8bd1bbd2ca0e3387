"""The thin trainer: model setup, loop, FSDP2, checkpoints, metrics."""
