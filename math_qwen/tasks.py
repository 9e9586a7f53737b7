"""The math evaluation tasks: GSM8K, MATH (MATH500) and Math401 (data and decontamination texts)."""

from __future__ import annotations

from specialize.tasks import HubSource, Task, register

GSM8K = register(
    Task(
        name="gsm8k",
        domain="math",
        description="GSM8K: 1,319 grade-school word problems; the answer ends with '#### N'",
        hub=HubSource("openai/gsm8k", config="main", split="test"),
        required_fields=("question", "answer"),
        reference_fields=("question", "answer"),
    )
)

MATH = register(
    Task(
        name="math",
        domain="math",
        description="MATH500: 500 competition problems (Lightman et al. subset of MATH)",
        hub=HubSource("HuggingFaceH4/MATH-500", split="test"),
        required_fields=("problem", "solution", "answer"),
        reference_fields=("problem", "solution"),
    )
)

# Math401 has no canonical hub dataset: its 401 {"query", "response"} lines come as a local file.
MATH401 = register(
    Task(
        name="math401",
        domain="math",
        description="Math401: 401 arithmetic expressions, correct when |pred - target| < 1e-3",
        required_fields=("query", "response"),
        reference_fields=("query",),
    )
)
