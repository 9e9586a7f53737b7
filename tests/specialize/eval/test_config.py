"""``EvalConfig``: YAML plus ``key=value`` overrides plus given fields, in that order; unknown
keys, wrong types and contradictory settings are one-line errors naming the field or flag."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from specialize.config import ConfigError, field_docs
from specialize.eval.config import (
    EvalConfig,
    EvalError,
    SamplingConfig,
    load_eval_config,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[3]


def test_every_field_has_a_docstring():
    for cls in (EvalConfig, SamplingConfig):
        docs = field_docs(cls)
        assert [f.name for f in fields(cls) if not docs.get(f.name)] == [], cls.__name__


def test_the_example_config_loads():
    cfg = load_eval_config(ROOT / "configs" / "eval" / "example.yaml")
    assert cfg.tasks == ["humaneval", "mbpp"] and cfg.data == {"mbpp": "data/eval/mbpp.jsonl"}
    assert cfg.sampling == SamplingConfig(samples=10, temperature=0.8, top_p=0.95, seed=0)
    assert (cfg.tp, cfg.pp, cfg.model_label) == (2, 1, "code-qwen-7b")


def test_overrides_win_over_the_file_and_given_fields_over_both(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(
        "score: c.jsonl\ntasks: [gsm8k, math]\noutput: r.json\nlimit: 5\n"
        "data: {gsm8k: a.jsonl}\nsampling: {seed: 3}\n"
    )
    cfg = load_eval_config(
        path,
        ["limit=7", "data.math=b.jsonl", "sampling.temperature=0.5", "mode=chat"],
        {"mode": "base", "sampling": {"seed": 4}},
    )
    assert (cfg.limit, cfg.mode) == (7, "base")
    assert cfg.data == {"gsm8k": "a.jsonl", "math": "b.jsonl"}
    assert cfg.sampling == SamplingConfig(temperature=0.5, seed=4)


def test_a_config_written_reads_back_the_same(tmp_path):
    cfg = load_eval_config(ROOT / "configs" / "eval" / "example.yaml", ["lengths=[64,128]"])
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(cfg))
    assert load_eval_config(path) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("limt: 3", r"^\S+: limt: Key 'limt' not in 'EvalConfig'\. Did you mean: 'limit'\?$"),
        ("sampling: {top: 0.9}", r": sampling\.top: Key 'top' not in 'SamplingConfig'"),
        ("tp: two", r": tp: Value 'two' of type 'str' could not be converted to Integer$"),
        ("lengths: [64, x]", r": lengths\[1\]: Value 'x' of type 'str' could not be converted"),
        ("[a, b]", r": an eval config is a mapping, got ListConfig$"),
    ],
)
def test_a_bad_key_or_value_is_a_one_line_error_naming_it(tmp_path, text, message):
    path = tmp_path / "eval.yaml"
    path.write_text(f"score: c.jsonl\ntasks: [gsm8k]\noutput: r.json\n{text}\n")
    if text.startswith("["):
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_eval_config(path)
    assert "\n" not in str(error.value)


def test_a_bad_override_names_it():
    with pytest.raises(ConfigError, match=r"^override 'workers=many': workers: Value 'many'"):
        load_eval_config(None, ["workers=many"])
    with pytest.raises(EvalError, match=r"^override 'limit': expected key=value$"):
        load_eval_config(None, ["limit"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, r"^needs --tasks NAME\[,NAME\.\.\.\] and -o RESULTS\.json \(tasks, output\)$"),
        ({"score": "c.jsonl", "checkpoint": "ckpt"}, "give a checkpoint to generate from, or"),
        ({"checkpoint": "ckpt", "limit": 0}, r"^--limit 0: must be at least 1"),
        ({"checkpoint": "ckpt", "tp": 0}, r"^--tp 0: must be at least 1$"),
        ({"checkpoint": "ckpt", "dtype": "fp16"}, r"^--dtype 'fp16': must be fp32 or bf16$"),
        ({"checkpoint": "ckpt", "max_new_tokens": 0}, r"^--max-new-tokens 0: must be"),
        ({"checkpoint": "ckpt", "sampling": {"samples": 2}}, r"^--samples > 1 needs --temp"),
        ({"checkpoint": "ckpt", "data": {"math": "m.jsonl"}}, r"^--data given for math, "),
        ({"checkpoint": "ckpt", "long_context": ["ntk"]}, r"applies to task 'perplexity' only"),
    ],
)
def test_settings_that_contradict_each_other_are_one_line_errors(settings, message):
    base = {} if not settings else {"tasks": ["gsm8k"], "output": "r.json"}
    with pytest.raises(EvalError, match=message):
        load_eval_config(None, given={**base, **settings})


def test_sampling_settings_do_not_matter_when_scoring_a_file():
    given = {"score": "c.jsonl", "tasks": ["gsm8k"], "output": "r.json"}
    cfg = load_eval_config(None, given={**given, "sampling": {"samples": 4}})
    assert cfg.sampling.samples == 4


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="evaluation mode 'instruct'"):
        EvalConfig(score="c", tasks=["gsm8k"], output="r.json", mode="instruct").validate()


def test_the_model_label_defaults_to_the_checkpoint_then_the_results_file():
    assert EvalConfig(checkpoint="runs/a/", output="x/r.json").model_label == "a"
    assert EvalConfig(score="c.jsonl", output="x/r.json").model_label == "r"
    assert EvalConfig(checkpoint="runs/a", label="m", output="r.json").model_label == "m"
