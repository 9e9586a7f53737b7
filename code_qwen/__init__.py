"""Code specialization (Code-Qwen): corpus, code SFT data and code tasks."""

# Importing registers the code languages, corpus filters and code tasks with the engine.
from code_qwen import corpus, humanevalpack, tasks  # noqa: F401
