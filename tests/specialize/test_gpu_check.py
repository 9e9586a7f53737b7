"""``specialize gpu-check``: the CPU report, the JSON, each line's PASS/FAIL comparison, the
configurations the GPU lines run, and the worker processes (on CPU, with the local spec)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from specialize.gpu_check import select
from specialize.gpu_check import verdicts as v
from specialize.gpu_check.checks import (
    CHECKS,
    Check,
    CheckFailed,
    Context,
    Devices,
    Outcome,
    isolation_data,
    judge,
    run_checks,
)
from specialize.gpu_check.report import (
    EXIT_FAIL,
    EXIT_NO_CUDA,
    EXIT_OK,
    FAIL,
    PASS,
    SKIP,
    STATUSES,
    Record,
    exit_code,
    format_record,
)
from specialize.gpu_check.runs import (
    ROOT,
    DemoData,
    eval_runs,
    fp8_runs,
    gpu_spec,
    long_context_variants,
    packed_sft_runs,
    parallel_runs,
    throughput_plan,
)
from tests.conftest import gsm8k_train_lines
from tests.distributed import run_distributed

RECORD_KEYS = {"name", "status", "figure", "detail", "seconds"}


# ----------------------------------------------------------------------------- the CPU report


def test_without_cuda_every_line_is_skipped_cleanly(tmp_path, monkeypatch, capsys) -> None:
    import torch

    from specialize.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-check", "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == EXIT_NO_CUDA == 3
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(STATUSES)]
    assert len(lines) == len(CHECKS) == 6
    for i, (line, check) in enumerate(zip(lines, CHECKS), 1):
        assert line.startswith(f"SKIP [{i}/6] {check.name}  no CUDA device"), line
    assert out[0].startswith("gpu-check: no CUDA device")
    assert out[-1].startswith("gpu-check: 0 PASS, 0 FAIL, 6 SKIP")

    doc = json.loads((tmp_path / "work" / "gpu-check.json").read_text())
    assert doc["format"] == "specialize-gpu-check-1" and doc["devices"]["count"] == 0
    assert [r["name"] for r in doc["checks"]] == [c.name for c in CHECKS]
    for record in doc["checks"]:
        assert set(record) == RECORD_KEYS
        assert record["status"] == SKIP and record["figure"] is None
        assert record["detail"] == "no CUDA device" and isinstance(record["seconds"], float)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["gpu-check.json"]


def test_a_work_dir_that_cannot_be_made_is_one_line(tmp_path, capsys) -> None:
    from specialize.cli import main

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-check", "--work-dir", str(tmp_path / "file" / "work")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == f"gpu-check: --work-dir {tmp_path}/file/work: Not a directory\n"
    )


def test_only_selects_checks_by_number_or_name() -> None:
    names = [c.name for c in CHECKS]
    assert select(None, names) is None
    assert select("fp8,1, 3", names) == [1, 3, 5]
    with pytest.raises(ValueError, match=r"--only 'fp16': no such check \(known: 1 te-and"):
        select("fp16", names)


# ----------------------------------------------------------------------------- the runner


def _check(name: str, gpus: int, outcome: Outcome | Exception, needs_te: bool = True) -> Check:
    def run(ctx: Context) -> Outcome:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return Check(name, gpus, run, needs_te)


CHECKS_OF_EACH_KIND = [
    _check("one-gpu", 1, Outcome(PASS, "fine")),
    _check("four-gpus", 4, Outcome(PASS, "fine")),
    _check("broken", 1, CheckFailed("train x exited with 1: boom (log: x.log)")),
    _check("surprised", 2, KeyError("losses")),
    _check("no-te-needed", 1, Outcome(PASS, "fine"), needs_te=False),
]


def test_a_line_skips_only_for_lack_of_gpus_and_a_failure_does_not_stop_the_rest(tmp_path):
    lines: list[str] = []
    devices = Devices(count=2, name="NVIDIA H100 80GB HBM3", te_version="2.10.0")
    records = run_checks(Context(tmp_path, devices), CHECKS_OF_EACH_KIND, echo=lines.append)
    assert [r.status for r in records] == [PASS, SKIP, FAIL, FAIL, PASS]
    assert records[1].detail == "needs 4 GPUs, found 2"
    assert records[2].detail == "train x exited with 1: boom (log: x.log)"
    assert records[3].detail == "KeyError: 'losses'"
    assert lines[1] == "SKIP [2/5] four-gpus  needs 4 GPUs, found 2  (0.0 s)"
    assert exit_code(records, cuda=True) == EXIT_FAIL

    none = run_checks(Context(tmp_path, Devices()), CHECKS_OF_EACH_KIND, echo=lines.append)
    assert {(r.status, r.detail) for r in none} == {(SKIP, "no CUDA device")}

    selected = run_checks(Context(tmp_path, devices), CHECKS_OF_EACH_KIND, [1, 5], lines.append)
    assert [r.name for r in selected] == ["one-gpu", "no-te-needed"]
    assert exit_code(selected, cuda=True) == EXIT_OK


def test_without_transformer_engine_the_lines_that_need_it_fail(tmp_path) -> None:
    devices = Devices(count=8, name="NVIDIA H100", te_error="ImportError: libcudnn.so.9")
    records = run_checks(Context(tmp_path, devices), CHECKS_OF_EACH_KIND, echo=lambda _: None)
    assert [r.status for r in records] == [FAIL, FAIL, FAIL, FAIL, PASS]
    assert records[0].detail == (
        "needs Transformer Engine, which does not import: ImportError: libcudnn.so.9"
    )


def test_exit_codes() -> None:
    passed, skipped = Record("a", PASS, "1", "", 1.0), Record("b", SKIP, None, "x", 0.0)
    failed = Record("c", FAIL, None, "boom", 0.0)
    assert exit_code([passed, skipped], cuda=True) == EXIT_OK == 0
    assert exit_code([passed, failed, skipped], cuda=True) == EXIT_FAIL == 1
    assert exit_code([skipped, skipped], cuda=False) == EXIT_NO_CUDA
    with pytest.raises(ValueError, match="status 'OK'"):
        Record("d", "OK", None, "", 0.0)


def test_judge_lists_what_failed_and_a_failure_prints_its_detail() -> None:
    outcome = judge([("a holds", True), ("b holds", False), ("c holds", False)], "x 1.0", "log")
    assert outcome == Outcome(FAIL, "x 1.0", "failed: b holds; c holds (log)")
    assert judge([("a holds", True)], "x 1.0") == Outcome(PASS, "x 1.0", "a holds")
    record = Record("fp8", FAIL, "bf16 5.0, fp8 5.2", "failed: fp8 within 1%", 3.0)
    assert format_record(5, 6, record) == (
        "FAIL [5/6] fp8  bf16 5.0, fp8 5.2  (3.0 s)\n       failed: fp8 within 1%"
    )


# ----------------------------------------------------------------------------- each comparison


def test_te_and_local_losses_agree_within_1e_2_and_auto_equals_te() -> None:
    assert v.losses_agree(2.3104, 2.3171) and not v.losses_agree(2.3104, 2.3215)
    assert not v.losses_agree(math.nan, math.nan)
    assert v.auto_equals_te(2.3104, 2.3104)
    assert not v.auto_equals_te(2.3171, 2.3104)  # the local path's loss is not te's


def test_falling_losses() -> None:
    assert v.falling([11.9, 10.2, 8.7, 7.9, 7.1, 6.8, 6.5, 6.6])
    assert not v.falling([11.9, 11.9, 11.9, 11.9])
    assert not v.falling([6.0, 7.0, 8.0, 9.0])
    assert not v.falling([11.9, 8.0, math.inf, 6.0])
    assert not v.falling([11.9])


def test_a_resume_continues_the_loss() -> None:
    saved = [11.9, 9.0, 7.2, 6.1]
    assert v.resume_continues(saved, [6.3, 6.0])  # 3% from the last saved loss
    assert not v.resume_continues(saved, [11.8, 11.0])  # started over from random weights
    assert not v.resume_continues(saved, [])


def test_packing_isolation() -> None:
    assert v.isolated(same=0.0, neighbours=3.0, scale=18.0)
    assert v.isolated(same=0.1, neighbours=3.0, scale=18.0)  # bf16 rounding, 0.6% of the scale
    assert not v.isolated(same=0.5, neighbours=3.0, scale=18.0)  # the neighbours leak in
    assert not v.isolated(same=0.0, neighbours=0.01, scale=18.0)  # nothing changed at all
    assert not v.isolated(same=math.nan, neighbours=3.0, scale=18.0)


def test_fp8_within_one_percent_of_bf16() -> None:
    assert v.fp8_close(5.04, 5.0) and v.fp8_close(4.96, 5.0)
    assert not v.fp8_close(5.06, 5.0) and not v.fp8_close(math.nan, 5.0)


def test_te_version_inside_megatron_cores_declared_range() -> None:
    specifier = v.te_specifier(importlib.metadata.requires("megatron-core"))
    assert specifier is not None  # megatron-core 0.16.1: >=2.9.0a0,<2.12.0
    for version in ("2.9.0", "2.9.0rc1", "2.10.0+769ed77", "2.11.0"):
        assert v.te_version_ok(version, specifier), version
    for version in ("2.8.0", "2.12.0", "3.0.0", "not-a-version", None):
        assert not v.te_version_ok(version, specifier), version
    assert v.te_specifier(['tqdm; extra == "dev"']) is None


def test_pytest_counts_and_outcome() -> None:
    output = "....s\n3 passed, 1 skipped, 912 deselected, 2 warnings in 41.20s\n"
    counts = v.pytest_counts(output)
    assert counts == {"passed": 3, "skipped": 1, "deselected": 912, "warnings": 2}
    assert v.pytest_ok(0, counts)
    failed = v.pytest_counts("F.\n1 failed, 2 passed, 1 error in 3.01s (0:00:03)")
    assert failed == {"failed": 1, "passed": 2, "errors": 1} and not v.pytest_ok(1, failed)
    assert not v.pytest_ok(5, v.pytest_counts("916 deselected in 2.1s"))  # no gpu test ran
    assert v.pytest_counts("ImportError while loading conftest") == {}


def test_eval_comparisons() -> None:
    assert v.variants_agree({"none": 100.0, "ntk": 100.0, "ntk+logn+window": 100.4})
    assert not v.variants_agree({"none": 100.0, "window": 103.0})
    assert not v.variants_agree({"ntk": 100.0})
    assert v.samples_vary({"HumanEval/0": ["a", "b"], "HumanEval/1": ["c", "c"]})
    assert not v.samples_vary({"HumanEval/0": ["a", "a"], "HumanEval/1": ["c", "c"]})


def test_throughput_and_memory_against_the_plan() -> None:
    assert v.memory_ok(52e9, 55e9) and not v.memory_ok(80e9, 55e9) and not v.memory_ok(0, 5e9)
    assert v.throughput_ok(16_000, 30_000) and not v.throughput_ok(14_000, 30_000)
    assert not v.throughput_ok(math.nan, 30_000)


def test_failure_line_names_the_error() -> None:
    log = "step 1/40 | loss 11.9\nconfig error: parallel.tensor=3: must divide the 4 heads\n"
    assert v.failure_line(log) == "config error: parallel.tensor=3: must divide the 4 heads"
    assert v.failure_line("a\nlast words\n\n") == "last words"
    assert v.failure_line("") == "no output"


# ----------------------------------------------------------------------------- configurations


def _load(spec, world: int):
    from specialize.config import derive, load_config

    cfg = load_config(spec.recipe, list(spec.overrides), require_paths=False)
    return cfg, derive(cfg, world)


def test_packed_sft_runs_differ_only_in_the_spec(tmp_path) -> None:
    runs = packed_sft_runs(tmp_path, DemoData(tmp_path))
    init, init_derived = _load(runs["init"], 1)
    assert init.init.checkpoint is None and init.model.spec == "te" and init_derived.steps == 30
    loaded = {spec: _load(runs[spec], 1)[0] for spec in ("te", "local", "auto")}
    for spec, cfg in loaded.items():
        assert cfg.model.spec == spec and cfg.train.steps == 1
        assert cfg.init.checkpoint == str(tmp_path / "init")
        assert cfg.data.format == "sft" and cfg.data.paths == [str(tmp_path / "data/math-sft")]
        assert cfg.precision.dtype == "bf16" and cfg.train.micro_batch_size == 1  # THD: one each
        cfg.model.spec, cfg.checkpoint.dir = "te", ""
    assert loaded["te"] == loaded["local"] == loaded["auto"]


def test_parallel_runs_train_at_tp2_sp_pp2_vp2_and_resume_at_tp4(tmp_path) -> None:
    first, resumed = parallel_runs(tmp_path, DemoData(tmp_path))
    assert first.nproc == resumed.nproc == 4
    a, derived = _load(first, 4)
    assert (a.parallel.tensor, a.parallel.pipeline, a.parallel.virtual_pipeline) == (2, 2, 2)
    assert a.parallel.sequence_parallel and a.model.spec == "te" and a.precision.dtype == "bf16"
    assert derived.data_parallel == 1 and derived.micro_batches % a.parallel.pipeline == 0
    assert a.train.exit_after_steps == 30 and derived.steps == 40
    b, _ = _load(resumed, 4)
    assert (b.parallel.tensor, b.parallel.pipeline, b.parallel.virtual_pipeline) == (4, 1, None)
    assert b.train.exit_after_steps is None and b.checkpoint.dir == a.checkpoint.dir
    assert b.train.global_batch_size == a.train.global_batch_size  # the same batches continue


def test_fp8_runs_share_everything_but_the_precision(tmp_path) -> None:
    runs = fp8_runs(tmp_path, DemoData(tmp_path))
    loaded = {name: _load(spec, 1)[0] for name, spec in runs.items()}
    assert loaded["bf16"].precision.dtype == "bf16"
    assert loaded["fp8-delayed"].precision.fp8_recipe == "delayed"
    assert loaded["fp8-tensorwise"].precision.fp8_recipe == "tensorwise"
    for cfg in loaded.values():
        assert cfg.model.spec == "te" and cfg.train.steps == 20
        cfg.precision, cfg.checkpoint.dir = loaded["bf16"].precision, ""
    assert loaded["bf16"] == loaded["fp8-delayed"] == loaded["fp8-tensorwise"]


def test_eval_runs_cover_both_lengths_and_every_long_context_variant(tmp_path) -> None:
    variants = long_context_variants()
    assert variants[0] == "none" and len(variants) == 8 and "ntk+logn+window" in variants
    runs = eval_runs(tmp_path / "run", tmp_path, DemoData(tmp_path), train_length=256)
    assert runs.lengths == (256, 1024) and runs.nproc == 2
    for command in (runs.greedy, runs.sampled):
        assert command[:4] == ["-m", "specialize", "eval", str(tmp_path / "run")]
        text = " ".join(command)
        assert "--tp 2" in text and "--limit 2" in text and "--dtype bf16" in text
    greedy = " ".join(runs.greedy)
    assert "--tasks humaneval,perplexity" in greedy and "--lengths 256,1024" in greedy
    assert f"--long-context {','.join(variants)}" in greedy
    stdlib = sysconfig.get_paths()["stdlib"]  # the factory's held-out packages
    held_out = f"perplexity={stdlib}/email,{stdlib}/json,{stdlib}/xmlrpc"
    assert runs.greedy[runs.greedy.index("--data") + 1] == held_out
    sampled = runs.sampled
    assert sampled[sampled.index("--samples") + 1] == "2"
    assert float(sampled[sampled.index("--temperature") + 1]) > 0


def test_gpu_spec_for_the_plan() -> None:
    from specialize.plan import GiB

    h100, known = gpu_spec("NVIDIA H100 80GB HBM3", 79 * GiB)
    assert known and h100.bf16_tflops == 989.0 and h100.memory_bytes == 79 * GiB
    b200, known = gpu_spec("NVIDIA B200", 180 * GiB)
    assert known and b200.bf16_tflops == 2250.0
    _, known = gpu_spec("NVIDIA GeForce RTX 4090", 24 * GiB)
    assert not known


def test_throughput_runs_the_plans_layout_of_the_largest_preset_that_fits(tmp_path) -> None:
    from specialize.plan import GiB

    data = DemoData(tmp_path)
    h100, _ = gpu_spec("NVIDIA H100 80GB HBM3", 80 * GiB)
    chosen = throughput_plan(tmp_path, data, 8, h100)
    assert chosen.preset == "qwen-1.8b" and not chosen.run.save and chosen.run.nproc == 8
    cfg, derived = _load(chosen.run, 8)
    layout = chosen.plan.requested.layout
    assert chosen.plan.requested.fits and cfg.data.seq_length == chosen.plan.work.seq_len == 8192
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (layout.tp, layout.pp)
    assert cfg.train.micro_batch_size == layout.micro_batch and derived.data_parallel == layout.dp
    assert cfg.model.recompute == layout.recompute and cfg.logging.device_peak_tflops == 989.0

    small, _ = gpu_spec("NVIDIA GeForce RTX 4080", 16 * GiB)
    fallback = throughput_plan(tmp_path, data, 1, small, peak_known=False)
    assert fallback.preset == "qwen-tiny"
    cfg, _ = _load(fallback.run, 1)
    assert cfg.logging.device_peak_tflops is None and cfg.model.max_position_embeddings == 8192


# ----------------------------------------------------------------------------- processes


def test_a_command_over_its_time_is_stopped(tmp_path) -> None:
    ctx = Context(tmp_path, Devices(), timeout=0.5)
    assert ctx.run([sys.executable, "-c", "print('hi')"], tmp_path / "ok.log") == 0
    with pytest.raises(CheckFailed, match=r"timed out after 0 s \(log: .*slow.log\)"):
        ctx.run([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log")
    with pytest.raises(CheckFailed, match="train x exited with 2: config error: bad"):
        (tmp_path / "x.log").write_text("config error: bad\n")
        ctx.require(2, "train x", tmp_path / "x.log")


def _worker(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "specialize.gpu_check.worker", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def test_the_probe_reports_this_machine(tmp_path) -> None:
    _worker("probe", str(tmp_path / "probe.json"))
    doc = json.loads((tmp_path / "probe.json").read_text())
    assert doc["count"] == 0 and "fp8" not in doc
    if importlib.util.find_spec("transformer_engine") is None:
        assert doc["te_error"].startswith("ModuleNotFoundError")


def _worker_jobs(rank: int, world_size: int, tmp: Path, nano: str, common: list[str], a, b):
    from specialize.gpu_check.worker import isolation_job, train_job

    run = tmp / "run"
    train_job(
        str(tmp / "no-save.json"), nano, [*common, f"checkpoint.dir={tmp / 'unsaved'}"], False
    )
    train_job(str(tmp / "sft.json"), nano, [*common, f"checkpoint.dir={run}"], True)
    isolation_job(str(tmp / "iso.json"), str(run / "config.yaml"), str(run), [str(a), str(b)])


@pytest.mark.slow
def test_worker_trains_records_its_run_and_checks_isolation(tmp_path) -> None:
    """The worker jobs on CPU with the local spec: what the GPU lines run, minus CUDA."""
    chats = tmp_path / "chats.jsonl"
    records = [json.loads(line) for line in gsm8k_train_lines()[:40]]
    chats.write_text(
        "".join(
            json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n" for r in records
        )
    )
    # Two packed sequences starting with the same sample; the runs below train on both.
    a, b = isolation_data(tmp_path / "iso", chats, seq_length=512)
    common = [
        "model.spec=local",
        "data.format=sft",
        "data.seq_length=512",
        f"data.paths=[{a},{b}]",
        "data.split=1,0,0",
        "train.steps=2",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "schedule.warmup_steps=0",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    nano = str(ROOT / "configs" / "base" / "qwen-nano.yaml")
    run_distributed(_worker_jobs, tmp_path, nano, common, a, b, world_size=1)

    result = json.loads((tmp_path / "no-save.json").read_text())
    assert len(result["losses"]) == 2 and result["checkpoint"] is None
    assert result["layer"] == "ColumnParallelLinear" and result["world_size"] == 1
    assert result["metrics"]["tokens_per_s"] > 0 and "max_memory_allocated" in result["metrics"]
    assert not (tmp_path / "unsaved").exists()
    trained = json.loads((tmp_path / "sft.json").read_text())
    assert trained["checkpoint"] and Path(trained["checkpoint"]).is_dir()
    iso = json.loads((tmp_path / "iso.json").read_text())
    assert iso["attention"] == "mask" and iso["sample_positions"] > 100
    assert v.isolated(iso["same"], iso["neighbours"], iso["scale"]), iso
