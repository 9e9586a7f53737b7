"""Math specialization (Math-Qwen-Chat): math SFT data and math tasks."""
