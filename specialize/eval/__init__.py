"""Evaluation: the task registry (tasks), generating and scoring completions (harness), the
perplexity evaluation (perplexity), and the comparison report with the paper's numbers (report,
paper_numbers)."""
