"""Code specialization (Code-Qwen): corpus, code SFT data and code tasks."""
