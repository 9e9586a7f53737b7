"""Evaluation: the options of one run (config) and the run itself (run), the task registry
(tasks), generating and scoring completions (harness), the perplexity task (perplexity), and the
comparison report with the paper's numbers (report, paper_numbers)."""
