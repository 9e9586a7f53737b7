"""The six checks of ``specialize gpu-check`` and the runner that skips what the GPUs cannot run.

Each check drives the project's own commands in subprocesses — ``specialize pipeline`` for the
demo's data, ``specialize train``'s functions and ``specialize eval`` under torchrun, ``pytest`` —
and judges their figures with ``verdicts``. The driver itself never touches CUDA: a probe process
reports the devices and whether Transformer Engine imports (a build that does not match torch can
crash at import), so the GPUs stay free for the runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from specialize.gpu_check import verdicts as v
from specialize.gpu_check.report import FAIL, NO_CUDA, PASS, SKIP, Record, format_record
from specialize.gpu_check.runs import (
    ROOT,
    DemoData,
    RunSpec,
    eval_runs,
    fp8_runs,
    gpu_spec,
    packed_sft_runs,
    parallel_runs,
    throughput_plan,
)

GiB = 1024**3


class CheckFailed(Exception):
    """A command of a check failed; the message is one line naming it and its log."""


@dataclass(frozen=True)
class Devices:
    """What the probe process found."""

    count: int = 0
    name: str = ""
    capability: tuple[int, int] = (0, 0)
    memory_bytes: int = 0
    te_version: Optional[str] = None
    te_error: Optional[str] = None
    """Why ``import transformer_engine.pytorch`` failed (None: it imports)."""
    fp8: bool = False
    fp8_reason: str = ""
    """Transformer Engine's reason when FP8 (delayed or per-tensor scaling) is unavailable."""

    def describe(self) -> str:
        if not self.count:
            return NO_CUDA
        major, minor = self.capability
        return (
            f"{self.count} x {self.name} (sm{major}{minor}, {self.memory_bytes / GiB:.0f} GiB); "
            f"Transformer Engine {self.te_version or 'does not import'}"
        )


@dataclass(frozen=True)
class Outcome:
    status: str
    figure: Optional[str]
    detail: str = ""


def judge(conditions: Sequence[tuple[str, bool]], figure: str, where: str = "") -> Outcome:
    """PASS when every condition holds; the detail lists what was checked, or what failed."""
    failed = [name for name, ok in conditions if not ok]
    checked = "; ".join(name for name, _ in (conditions if not failed else ()))
    detail = f"failed: {'; '.join(failed)}" if failed else checked
    if where:
        detail = f"{detail} ({where})"
    return Outcome(FAIL if failed else PASS, figure, detail)


@dataclass
class Context:
    """Where the checks work and what they share."""

    work: Path
    devices: Devices
    timeout: float = 3600.0
    """Seconds any one command may take before it is stopped and its check fails."""
    _data: Optional[DemoData] = field(default=None, repr=False)

    def fresh(self, name: str) -> Path:
        """An empty directory for one check's runs (a rerun starts over, never resumes)."""
        path = self.work / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def run(self, words: Sequence[str], log: Path, cwd: Path | None = None) -> int:
        """Run a command with its output in ``log``; stopped (with its process group) after
        ``timeout`` seconds or when the check itself is interrupted."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            process = subprocess.Popen(
                list(words), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
            try:
                return process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _stop(process)
                raise CheckFailed(f"timed out after {self.timeout:.0f} s (log: {log})") from None
            except BaseException:
                _stop(process)
                raise

    def torchrun(self, module_args: Sequence[str], nproc: int, log: Path) -> int:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return self.run([*launch, f"--nproc-per-node={nproc}", *module_args], log)

    def require(self, code: int, what: str, log: Path, result: Path | None = None) -> None:
        if code != 0 or (result is not None and not result.is_file()):
            reason = v.failure_line(log.read_text(errors="replace")) if log.is_file() else ""
            raise CheckFailed(f"{what} exited with {code}: {reason} (log: {log})")

    def data(self) -> DemoData:
        """The demo's code corpus and packed math SFT data under ``<work>/data``, prepared by the
        demo factory's own steps the first time."""
        if self._data is None:
            data = DemoData(self.work)
            log = self.work / "data-prepare.log"
            code = self.run([sys.executable, *data.prepare_command()], log, cwd=ROOT)
            self.require(code, "preparing the demo data (specialize pipeline)", log)
            self._data = data
        return self._data

    def train(self, spec: RunSpec, name: str, where: Path) -> dict[str, Any]:
        """A worker ``train`` job under torchrun; its JSON result."""
        out, log = where / f"{name}.json", where / f"{name}.log"
        args = ["-m", "specialize.gpu_check.worker", "train", str(out), str(spec.recipe)]
        args += [*spec.overrides, *([] if spec.save else ["--no-save"])]
        self.require(self.torchrun(args, spec.nproc, log), f"train {name}", log, out)
        return json.loads(out.read_text())


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun passes it on), SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def probe(work: Path, timeout: float = 600.0) -> Devices:
    """The devices, Transformer Engine and FP8 support, asked in a process of their own."""
    out, log = work / "probe.json", work / "probe.log"
    ctx = Context(work, Devices(), timeout)
    code = ctx.run([sys.executable, "-m", "specialize.gpu_check.worker", "probe", str(out)], log)
    ctx.require(code, "the device probe", log, out)
    doc = json.loads(out.read_text())
    doc["capability"] = tuple(doc.get("capability", (0, 0)))
    return Devices(**doc)


# ----------------------------------------------------------------------------- the checks


def check_te(ctx: Context) -> Outcome:
    """1. Transformer Engine imports, inside megatron-core's range; ``pytest -m gpu`` passes."""
    import importlib.metadata

    if ctx.devices.te_error:
        return Outcome(
            FAIL,
            None,
            f"transformer_engine does not import ({ctx.devices.te_error}); install it with "
            "pip install -e '.[gpu]'",
        )
    version = ctx.devices.te_version
    specifier = v.te_specifier(importlib.metadata.requires("megatron-core") or [])
    mcore = importlib.metadata.version("megatron-core")
    where = ctx.fresh("1-te")
    log = where / "pytest.log"
    tests = ROOT / "tests"
    code = -1
    if tests.is_dir():
        code = ctx.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(tests)], log, ROOT)
    counts = v.pytest_counts(log.read_text(errors="replace")) if log.is_file() else {}
    tally = ", ".join(f"{n} {k}" for k, n in counts.items() if k not in ("deselected", "warnings"))
    figure = (
        f"TE {version} (megatron-core {mcore} wants {specifier}); "
        f"pytest -m gpu: {tally or 'no result'}"
    )
    return judge(
        [
            (
                f"TE {version} satisfies transformer-engine{specifier}",
                v.te_version_ok(version, specifier),
            ),
            (f"pytest -m gpu passes in {tests}", v.pytest_ok(code, counts)),
        ],
        figure,
        f"log: {log}",
    )


def isolation_data(where: Path, words: Path, seq_length: int) -> tuple[Path, Path]:
    """Two packed directories whose first sequence starts with the same sample (the longest that
    fits beside the two shortest) followed by different neighbours."""
    from base.tokenizer import QwenTokenizer
    from specialize.data.chat import conversation, render
    from specialize.data.sft_prepare import SFTOptions, prepare_sft
    from specialize.data.sources import Source

    where.mkdir(parents=True, exist_ok=True)
    tokenizer = QwenTokenizer.load()
    with words.open() as f:
        records = [json.loads(line) for _, line in zip(range(200), f)]
    length = [len(render(conversation(r), tokenizer)[0]) for r in records]
    order = sorted(range(len(records)), key=length.__getitem__)
    b, c = order[0], order[1]
    # A sample of n tokens takes n - 1 positions; both pairs must fit one sequence.
    fits = [i for i in order[2:] if length[i] + length[c] - 2 <= seq_length]
    if not fits:
        raise CheckFailed(f"{words}: no sample fits {seq_length} positions beside another")
    a = fits[-1]
    dirs = []
    for name, pair in (("with-b", (a, b)), ("with-c", (a, c))):
        source = where / f"{name}.jsonl"
        source.write_text("".join(json.dumps(records[i]) + "\n" for i in pair))
        prepare_sft(
            [Source("jsonl", str(source))],
            where / name,
            tokenizer,
            SFTOptions(seq_length, pack=True),
        )
        dirs.append(where / name)
    return dirs[0], dirs[1]


def check_packed_sft(ctx: Context) -> Outcome:
    """2. One packed-SFT step with the te, local and auto specs from the same weights; packing
    isolation of a sample's logits under TE/THD."""
    where = ctx.fresh("2-packed-sft")
    data = ctx.data()
    runs = packed_sft_runs(where, data)
    results = {name: ctx.train(spec, name, where) for name, spec in runs.items()}
    te, local, auto = (results[k]["losses"][0] for k in ("te", "local", "auto"))
    init_dir = runs["init"].run_dir
    seq = yaml.safe_load((init_dir / "config.yaml").read_text())["data"]["seq_length"]
    packed = isolation_data(where / "isolation", data.math_words, seq)
    out, log = where / "isolation.json", where / "isolation.log"
    args = ["-m", "specialize.gpu_check.worker", "isolation", str(out)]
    args += [str(init_dir / "config.yaml"), str(init_dir), *map(str, packed)]
    ctx.require(ctx.torchrun(args, 1, log), "the isolation forward", log, out)
    iso = json.loads(out.read_text())
    figure = (
        f"first loss te {te:.4f}, local {local:.4f} (|Δ| {abs(te - local):.1e}), auto {auto:.4f} "
        f"(|Δ| {abs(auto - te):.1e}); a sample's logits with other neighbours: max |Δ| "
        f"{iso['same']:.1e} of {iso['scale']:.1f} ({iso['attention']})"
    )
    return judge(
        [
            ("the init run's losses fall", v.falling(results["init"]["losses"])),
            (
                f"te builds Transformer Engine layers ({results['te']['layer']})",
                results["te"]["layer"].startswith("TE"),
            ),
            (f"te and local agree within {v.SPEC_LOSS_TOLERANCE:g}", v.losses_agree(te, local)),
            (
                f"auto builds te's layers ({results['auto']['layer']})",
                results["auto"]["layer"] == results["te"]["layer"],
            ),
            (f"auto equals te within {v.AUTO_TOLERANCE:g}", v.auto_equals_te(auto, te)),
            ("THD packing under te", iso["attention"] == "thd"),
            (
                f"a sample's logits stay within {v.ISOLATION_TOLERANCE:g} of their scale when its "
                "neighbours change",
                v.isolated(iso["same"], iso["neighbours"], iso["scale"]),
            ),
        ],
        figure,
        f"runs: {where}",
    )


def check_parallel(ctx: Context) -> Outcome:
    """3. TP=2 + SP, PP=2 with virtual stages on 4 GPUs, saved, resumed at TP=4 PP=1."""
    where = ctx.fresh("3-parallel")
    first, resumed = parallel_runs(where, ctx.data())
    saved = ctx.train(first, "tp2-sp-pp2-vp2", where)
    cont = ctx.train(resumed, "resumed-tp4", where)
    a, b = saved["losses"], cont["losses"]
    stop = int(first.value("train.exit_after_steps"))
    total = int(first.value("train.steps"))
    figure = (
        f"loss {a[0]:.3f} -> {a[-1]:.3f} over {len(a)} steps at TP=2 SP PP=2 VP=2; resumed at "
        f"TP=4 PP=1 from step {cont['start_step']}: {b[0]:.3f} -> {b[-1]:.3f}"
        if a and b
        else "no losses"
    )
    return judge(
        [
            (f"{stop} finite, falling losses", len(a) == stop and v.falling(a)),
            (
                f"resumed from the step-{stop} checkpoint",
                cont["start_step"] == stop and cont["resumed_from"] is not None,
            ),
            (f"{total - stop} finite steps after it", len(b) == total - stop and v.finite(b)),
            (
                f"the first resumed loss within {v.RESUME_TOLERANCE:.0%} of the last saved",
                v.resume_continues(a, b),
            ),
        ],
        figure,
        f"runs: {where}",
    )


def _checkpoint_to_evaluate(work: Path) -> Path | None:
    """Line 3's run (or, without 4 GPUs, line 2's init run) when it holds a checkpoint."""
    from specialize.checkpoint import checkpoint_root

    for run in (work / "3-parallel" / "run", work / "2-packed-sft" / "init"):
        if (checkpoint_root(run) / "latest").is_file() and (run / "config.yaml").is_file():
            return run
    return None


def check_eval(ctx: Context) -> Outcome:
    """4. ``specialize eval --tp 2``: HumanEval greedy and sampled, perplexity at two lengths with
    every long-context variant."""
    run = _checkpoint_to_evaluate(ctx.work)
    if run is None:
        raise CheckFailed("no checkpoint to evaluate: lines 2 and 3 wrote none")
    train_length = yaml.safe_load((run / "config.yaml").read_text())["data"]["seq_length"]
    where = ctx.fresh("4-eval")
    runs = eval_runs(run, where, ctx.data(), train_length)
    for name, command, result in (
        ("greedy", runs.greedy, runs.greedy_results),
        ("sampled", runs.sampled, runs.sampled_results),
    ):
        log = where / f"{name}.log"
        ctx.require(ctx.torchrun(command, runs.nproc, log), f"eval ({name})", log, result)
    greedy = json.loads(runs.greedy_results.read_text())["tasks"]
    sampled = json.loads(runs.sampled_results.read_text())["tasks"]["humaneval"]
    he = greedy["humaneval"]
    ppl = {
        variant: [
            greedy[f"perplexity[{variant}]"]["metrics"][f"perplexity@{n}"] for n in runs.lengths
        ]
        for variant in runs.variants
    }
    completions: dict[str, list[str]] = {}
    for sample in sampled["samples"]:
        completions.setdefault(sample["id"], []).append(sample["completion"])
    short, long = runs.lengths
    best = min(ppl, key=lambda name: ppl[name][1])
    score = next(iter(he["metrics"].items()))
    figure = (
        f"humaneval {score[0]} {score[1]:.2f} on {he['data']['records']}; perplexity@{short} "
        f"{ppl['none'][0]:.1f}, @{long} {ppl['none'][1]:.1f} (best {best}: {ppl[best][1]:.1f}) "
        f"over {len(ppl)} variants; {len(sampled['samples'])} sampled completions"
    )
    return judge(
        [
            (
                "humaneval: 2 problems generated and graded",
                he["data"]["records"] == 2 and he["counts"]["missing"] == 0,
            ),
            (
                f"perplexity finite at {short} and {long} for {', '.join(ppl)}",
                all(v.finite(values) for values in ppl.values()),
            ),
            (
                f"every variant within {v.VARIANT_TOLERANCE:.0%} of none at the training length "
                f"{short}",
                v.variants_agree({k: vals[0] for k, vals in ppl.items()}),
            ),
            (
                "sampled: 2 completions per problem, not all alike",
                len(sampled["samples"]) == 4 and v.samples_vary(completions),
            ),
        ],
        figure,
        f"checkpoint {run}; results: {where}",
    )


def check_fp8(ctx: Context) -> Outcome:
    """5. BF16 vs FP8 (delayed and tensorwise scaling) on the same batches."""
    if not ctx.devices.fp8:
        return Outcome(SKIP, None, f"needs FP8 tensor cores: {ctx.devices.fp8_reason}")
    where = ctx.fresh("5-fp8")
    runs = fp8_runs(where, ctx.data())
    losses = {name: ctx.train(spec, name, where)["losses"] for name, spec in runs.items()}
    steps = int(runs["bf16"].value("train.steps"))
    ref = losses["bf16"][-1]
    parts = [f"bf16 {ref:.4f}"]
    conditions = [
        (f"bf16: {steps} finite steps", len(losses["bf16"]) == steps and v.finite(losses["bf16"]))
    ]
    for name in runs:
        if name == "bf16":
            continue
        last = losses[name][-1]
        parts.append(f"{name} {last:.4f} ({(last - ref) / ref:+.2%})")
        conditions.append(
            (
                f"{name} within {v.FP8_TOLERANCE:.0%} of bf16 after {steps} steps",
                len(losses[name]) == steps and v.finite(losses[name]) and v.fp8_close(last, ref),
            )
        )
    return judge(conditions, f"loss after {steps} steps: " + ", ".join(parts), f"runs: {where}")


def check_throughput(ctx: Context) -> Outcome:
    """6. Tokens/s/GPU, MFU and peak memory of the largest preset that fits, at seq 8192, next to
    ``specialize plan``'s prediction for the same layout."""
    from specialize.plan import PlanError

    devices = ctx.devices
    gpu, peak_known = gpu_spec(devices.name, devices.memory_bytes)
    where = ctx.fresh("6-throughput")
    try:
        chosen = throughput_plan(where, ctx.data(), devices.count, gpu, peak_known)
    except PlanError as e:
        raise CheckFailed(f"specialize plan fits no preset on these GPUs: {e}") from None
    result = ctx.train(chosen.run, chosen.preset, where)
    req = chosen.plan.requested
    metrics = result["metrics"]
    tokens = metrics.get("tokens_per_s", math.nan) / result["world_size"]
    memory = metrics.get("max_memory_allocated") or 0
    # max_memory_allocated sees PyTorch's allocator, not the CUDA context and NCCL the plan adds.
    planned_memory = req.memory.total - req.memory.runtime
    planned_mfu = req.time.mfu * req.time.model_flops_per_token / req.time.flops_per_token
    figure = (
        f"{chosen.preset} seq {chosen.plan.work.seq_len}, {req.layout.label()}: "
        f"{tokens:,.0f} tokens/s/GPU (plan {req.time.tokens_per_second_per_gpu:,.0f})"
    )
    if "mfu" in metrics:
        figure += f", MFU {metrics['mfu']:.1%} (plan {planned_mfu:.1%})"
    figure += f"; peak {memory / GiB:.1f} GiB (plan {planned_memory / GiB:.1f} GiB)"
    conditions = [
        ("finite losses", v.finite(result["losses"])),
        (
            f"peak memory within {v.MEMORY_TOLERANCE:.0%} of the plan's",
            v.memory_ok(memory, planned_memory),
        ),
    ]
    if peak_known:
        conditions.append(
            (
                f"tokens/s/GPU at least {v.THROUGHPUT_FLOOR:.0%} of the plan's",
                v.throughput_ok(tokens, req.time.tokens_per_second_per_gpu),
            )
        )
    note = "" if peak_known else f"; {gpu.name}: peak TFLOP/s unknown, throughput not judged"
    return judge(conditions, figure, f"run: {where}{note}")


# ----------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Check:
    name: str
    gpus: int
    """GPUs the check needs; fewer found is a SKIP saying so."""
    run: Callable[[Context], Outcome]
    needs_te: bool = True


CHECKS: tuple[Check, ...] = (
    Check("te-and-gpu-tests", 1, check_te, needs_te=False),
    Check("packed-sft", 1, check_packed_sft),
    Check("parallel-resume", 4, check_parallel),
    Check("eval", 2, check_eval),
    Check("fp8", 1, check_fp8),
    Check("throughput", 1, check_throughput),
)


def gate(check: Check, devices: Devices) -> Outcome | None:
    """The outcome of a check that cannot run on these devices (None: it can)."""
    if devices.count == 0:
        return Outcome(SKIP, None, NO_CUDA)
    if devices.count < check.gpus:
        plural = "s" if check.gpus > 1 else ""
        return Outcome(SKIP, None, f"needs {check.gpus} GPU{plural}, found {devices.count}")
    if check.needs_te and devices.te_error:
        return Outcome(
            FAIL, None, f"needs Transformer Engine, which does not import: {devices.te_error}"
        )
    return None


def run_checks(
    ctx: Context,
    checks: Sequence[Check] = CHECKS,
    selected: Sequence[int] | None = None,
    echo: Callable[[str], None] = print,
) -> list[Record]:
    """Run (or skip) each check in order, printing its line as soon as it is known."""
    records = []
    for index, check in enumerate(checks, 1):
        if selected is not None and index not in selected:
            continue
        started = time.monotonic()
        outcome = gate(check, ctx.devices)
        if outcome is None:
            try:
                outcome = check.run(ctx)
            except CheckFailed as e:
                outcome = Outcome(FAIL, None, str(e))
            except Exception as e:  # one check's surprise must not hide the others' results
                outcome = Outcome(FAIL, None, f"{type(e).__name__}: {e}")
        record = Record(
            check.name,
            outcome.status,
            outcome.figure,
            outcome.detail,
            round(time.monotonic() - started, 1),
        )
        echo(format_record(index, len(checks), record))
        records.append(record)
    return records


def devices_record(devices: Devices) -> dict[str, Any]:
    return {**asdict(devices), "capability": list(devices.capability)}
