"""``specialize eval``'s command line: every flag is the ``EvalConfig`` field of the same name, so
flags, ``--config FILE`` and ``key=value`` overrides describe the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specialize.cli import _eval_flags, build_parser, main
from specialize.eval.config import EvalConfig, SamplingConfig, load_eval_config
from tests.conftest import gsm8k_train_lines

EVERY_FLAG = [
    "ckpt/run",
    "--tasks", "perplexity, gsm8k",
    "--data", "gsm8k=g.jsonl",
    "--data", "perplexity=a,b",
    "--mode", "chat",
    "--label", "m",
    "--workers", "3",
    "-o", "r.json",
    "--limit", "4",
    "--samples", "2",
    "--max-new-tokens", "16",
    "--temperature", "0.7",
    "--top-p", "0.9",
    "--seed", "5",
    "--tp", "2",
    "--pp", "2",
    "--dtype", "bf16",
    "--lengths", "64,128",
    "--long-context", "none,ntk+logn",
]  # fmt: skip
SAME_YAML = """\
checkpoint: ckpt/run
tasks: [perplexity, gsm8k]
data: {gsm8k: g.jsonl, perplexity: "a,b"}
mode: chat
label: m
workers: 3
output: r.json
limit: 4
sampling: {samples: 2, temperature: 0.7, top_p: 0.9, seed: 5}
max_new_tokens: 16
tp: 2
pp: 2
dtype: bf16
lengths: [64, 128]
long_context: [none, ntk+logn]
"""


def eval_config(argv: list[str]) -> EvalConfig:
    """The config `specialize eval ARGV` runs."""
    args = build_parser().parse_args(["eval", *argv])
    overrides, given = _eval_flags(args)
    return load_eval_config(args.config, overrides, given)


def test_flags_and_a_config_file_give_the_same_config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(SAME_YAML)
    from_flags = eval_config(EVERY_FLAG)
    assert from_flags == eval_config(["--config", str(path)]) == load_eval_config(path)
    assert from_flags.sampling == SamplingConfig(samples=2, temperature=0.7, top_p=0.9, seed=5)
    assert from_flags.data == {"gsm8k": "g.jsonl", "perplexity": "a,b"}


def test_flags_not_given_keep_the_config_files_values_and_given_ones_win(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(SAME_YAML)
    cfg = eval_config(["--config", str(path), "limit=9", "sampling.seed=8", "--limit", "3"])
    assert (cfg.limit, cfg.sampling.seed, cfg.workers, cfg.mode) == (3, 8, 3, "chat")
    assert eval_config(["--config", str(path), "other/ckpt"]).checkpoint == "other/ckpt"
    # Without a file, the defaults are EvalConfig's.
    defaults = eval_config(["ckpt", "--tasks", "gsm8k", "-o", "r.json"])
    assert defaults == EvalConfig(checkpoint="ckpt", tasks=["gsm8k"], output="r.json")


def test_a_checkpoint_path_holding_an_equals_sign_is_the_checkpoint():
    cfg = eval_config(["runs/lr=3e-5", "limit=2", "--tasks", "gsm8k", "-o", "r.json"])
    assert (cfg.checkpoint, cfg.limit) == ("runs/lr=3e-5", 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "64,x"], "eval: --lengths '64,x': expected comma-separated integers\n"),
        (["--data", "gsm8k"], "eval: --data 'gsm8k': expected NAME=VALUE\n"),
        (["limt=3"], "eval: override 'limt=3': limt: Key 'limt' not in 'EvalConfig'. Did you "),
        (["a", "b"], "eval: one checkpoint, got a b (overrides are key=value)\n"),
    ],
)
def test_bad_flags_and_keys_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--score", "c.jsonl", "--tasks", "gsm8k", "-o", "r.json", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def _flags_then_config(rank: int, world_size: int, run_dir: str, text: str) -> dict:
    import contextlib
    import io

    from specialize.eval.config import to_yaml
    from tests.specialize.infer.test_generate import _save

    ckpt = _save(rank, world_size, run_dir)
    results = Path(run_dir) / "results.json"
    gsm8k = Path(run_dir) / "gsm8k.jsonl"
    gsm8k.write_text("".join(line + "\n" for line in gsm8k_train_lines()[:2]))
    argv = [ckpt, "--tasks", "perplexity,gsm8k", "--mode", "chat", "-o", str(results)]
    argv += ["--data", f"perplexity={text}", "--data", f"gsm8k={gsm8k}", "--lengths", "32"]
    argv += ["--limit", "2", "--max-new-tokens", "3", "--long-context", "none,ntk"]
    out = {}
    for name, words in (("flags", argv), ("config", None)):
        if words is None:  # the same run from a config file
            config = Path(run_dir) / "eval.yaml"
            config.write_text(to_yaml(eval_config(argv)))
            words = ["--config", str(config)]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
            main(["eval", *words])
        assert exited.value.code == 0
        out[name] = {
            "stdout": printed.getvalue(),
            "results": results.read_bytes(),
            "completions": results.with_suffix(".completions.jsonl").read_bytes(),
            "table": results.with_suffix(".perplexity.md").read_bytes(),
        }
        for written in Path(run_dir).glob("results.*"):
            written.unlink()
    return out


def test_a_config_file_run_writes_what_the_flag_run_writes(tmp_path):
    from tests.distributed import run_distributed

    text = tmp_path / "text.txt"
    text.write_text(Path(json.__file__).read_text())
    out = run_distributed(_flags_then_config, str(tmp_path / "run"), str(text), world_size=1)
    assert out["config"] == out["flags"]
    results = json.loads(out["flags"]["results"])
    assert list(results["tasks"]) == ["perplexity", "gsm8k", "perplexity[none]", "perplexity[ntk]"]
    assert results["tasks"]["gsm8k"]["counts"]["total"] == 2
    assert out["flags"]["stdout"].endswith(f"results: {tmp_path / 'run' / 'results.json'}\n")


def test_the_command_line_is_built_without_torch_or_megatron():
    """`specialize --help`, `config` and `plan` start in a fraction of a second: building the parser
    imports neither torch nor megatron-core (both load only inside the commands that run models)."""
    code = (
        "import sys; from specialize.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
