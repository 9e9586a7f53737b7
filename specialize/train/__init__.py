"""Training: ``specialize train`` (run), the loop (trainer), its callbacks, the megatron-core
objects it drives (engine) and their forward step, and what ``--dry-run`` prints."""
