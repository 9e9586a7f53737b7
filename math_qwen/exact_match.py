"""Exact match of a checkpoint on held-out generated word problems (greedy, ChatML, 0-shot).

The measure of the CPU math-SFT demo: the question goes in as the user turn of the same chat
format SFT trains on, the reply is generated greedily until ``<|im_end|>``, and its final number
(after ``####``, else the last number) must equal the gold answer.

    python -m math_qwen.exact_match runs/demo/math-sft --n 200 [-o results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from math_qwen.answers import answers_match, extract_answer
from math_qwen.word_problems import generate


def exact_match(
    ckpt: str, n: int, seed: int = 1, split: str = "test", max_new_tokens: int = 48
) -> dict:
    """Score ``ckpt`` on ``n`` generated problems of ``split``; per-problem records included."""
    from base.tokenizer import QwenTokenizer
    from specialize.infer.generate import chat_answers
    from specialize.infer.model import load_model

    model, _ = load_model(ckpt)
    tokenizer = QwenTokenizer.load()
    problems = generate(n, seed, split)
    replies = chat_answers(model, tokenizer, [p["question"] for p in problems], max_new_tokens)
    records = []
    for problem, reply in zip(problems, replies):
        predicted = extract_answer(reply)
        records.append(
            {
                "id": problem["id"],
                "question": problem["question"],
                "completion": reply,
                "predicted": predicted,
                "answer": problem["answer"],
                "correct": answers_match(predicted, problem["answer"]),
            }
        )
    correct = sum(r["correct"] for r in records)
    return {
        "checkpoint": ckpt,
        "split": split,
        "seed": seed,
        "problems": n,
        "correct": correct,
        "exact_match": correct / n,
        "records": records,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint or run directory")
    parser.add_argument("--n", type=int, default=200, help="problems")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("-o", "--output", default=None, help="write the records here (JSON)")
    args = parser.parse_args(argv)
    result = exact_match(args.checkpoint, args.n, args.seed, args.split, args.max_new_tokens)
    print(
        f"{args.checkpoint}: exact match {result['correct']}/{result['problems']} = "
        f"{result['exact_match']:.1%} on {args.split} problems (seed {args.seed})"
    )
    for record in result["records"][:3]:
        print(f"  Q: {record['question']}\n  A: {record['completion']!r} (gold {record['answer']})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
