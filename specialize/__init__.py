"""The engine: config, distributed set-up, data, training, checkpoints, CLI."""
