"""Math specialization (Math-Qwen-Chat): math SFT data and math tasks."""

from math_qwen import tasks  # noqa: F401  (registers the math tasks)
