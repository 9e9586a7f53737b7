"""The runs ``specialize gpu-check`` launches, as data: recipes with overrides, eval command lines
and the throughput layout from ``specialize plan``. Nothing here needs a GPU, so the tests check
every configuration the GPU path will run.
"""

from __future__ import annotations

import dataclasses
import itertools
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import specialize
from specialize.flops import peak_tflops

ROOT = Path(specialize.__file__).resolve().parent.parent
FACTORY = ROOT / "configs" / "demo" / "factory.yaml"
ENGINE = ROOT / "configs" / "demo" / "engine.yaml"
MATH_SFT = ROOT / "configs" / "demo" / "math-sft.yaml"
BASE_RECIPES = ROOT / "configs" / "base"
DATA_STEPS = ("code-data", "math-data")
"""The demo factory's data steps the checks train on (outputs under ``<work>/data``)."""
QUIET = ("logging.progress=false", "logging.tensorboard=false")
THROUGHPUT_PRESETS = ("qwen-1.8b", "qwen-tiny")
"""The largest first: the throughput line measures the first whose plan fits the GPUs found."""
THROUGHPUT_SEQ = 8192
THROUGHPUT_STEPS = 12
THROUGHPUT_LOG_INTERVAL = 6
"""Tokens/s and MFU are logged over the last 6 steps: past compilation and autotuning."""


@dataclass(frozen=True)
class DemoData:
    """What the demo factory's data steps write under ``<work>/data`` (configs/demo/factory.yaml),
    and the held-out packages of its perplexity evaluation."""

    root: Path

    @property
    def code(self) -> Path:
        return self.root / "data" / "code"

    @property
    def math_sft(self) -> Path:
        return self.root / "data" / "math-sft"

    @property
    def math_words(self) -> Path:
        return self.root / "data" / "math-words.jsonl"

    @property
    def perplexity(self) -> str:
        heldout = str(yaml.safe_load(FACTORY.read_text())["heldout"]).split(",")
        stdlib = sysconfig.get_paths()["stdlib"]
        return ",".join(f"{stdlib}/{name.strip()}" for name in heldout)

    def prepare_command(self) -> list[str]:
        """``specialize pipeline`` of the factory's data steps into this directory: finished
        steps are skipped, so the data is prepared once."""
        return [
            "-m", "specialize", "pipeline", str(FACTORY), f"dir={self.root}",
            "--only", ",".join(DATA_STEPS),
        ]  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """One ``specialize train`` of ``recipe`` with ``overrides`` on ``nproc`` processes."""

    recipe: Path
    overrides: tuple[str, ...]
    nproc: int = 1
    save: bool = True
    """False: no checkpoint (a throughput run of a 1.8B model would write ~25 GB)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.value("checkpoint.dir"))

    def value(self, key: str) -> str:
        """The last override of ``key``."""
        found = [o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0] == key]
        if not found:
            raise KeyError(key)
        return found[-1]


def packed_sft_runs(work: Path, data: DemoData) -> dict[str, RunSpec]:
    """Line 2: ``init`` trains qwen-tiny a little on packed math SFT (so the losses compared are
    not a random model's ln(V)); ``te``, ``local`` and ``auto`` then take one step from it on the
    same batch, one packed sequence per micro-batch (THD for te)."""
    common = (
        f"data.paths=[{data.math_sft}]",
        "precision.dtype=bf16",
        "parallel.tensor=1",
        "train.micro_batch_size=1",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        *QUIET,
    )
    init_dir = work / "init"
    runs = {
        "init": RunSpec(
            MATH_SFT,
            (
                *common,
                "init.checkpoint=null",
                "model.spec=te",
                "train.steps=30",
                f"checkpoint.dir={init_dir}",
            ),
        )
    }
    for spec in ("te", "local", "auto"):
        runs[spec] = RunSpec(
            MATH_SFT,
            (
                *common,
                f"init.checkpoint={init_dir}",
                f"model.spec={spec}",
                "train.steps=1",
                f"checkpoint.dir={work / spec}",
            ),
        )
    return runs


def parallel_runs(work: Path, data: DemoData) -> tuple[RunSpec, RunSpec]:
    """Line 3: 30 of 40 steps at TP=2 + SP, PP=2 with 2 virtual stages (8 micro-batches per step,
    a multiple of PP as the interleaved schedule needs), saved; then the same run resumed at
    TP=4 PP=1. ``exit_after_steps`` keeps the schedule of the 40-step run in both."""
    common = (
        f"data.paths=[{data.code}]",
        "model.spec=te",
        "precision.dtype=bf16",
        "parallel.sequence_parallel=true",
        "train.steps=40",
        "train.micro_batch_size=2",
        "train.global_batch_size=16",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        f"checkpoint.dir={work / 'run'}",
        *QUIET,
    )
    first = RunSpec(
        ENGINE,
        (
            *common,
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "train.exit_after_steps=30",
        ),
        nproc=4,
    )
    resumed = RunSpec(
        ENGINE,
        (*common, "parallel.tensor=4", "parallel.pipeline=1", "parallel.virtual_pipeline=null"),
        nproc=4,
    )
    return first, resumed


def fp8_runs(work: Path, data: DemoData) -> dict[str, RunSpec]:
    """Line 5: 20 steps from the same initialization on the same batches in BF16 and in FP8 with
    each scaling recipe."""
    common = (
        f"data.paths=[{data.code}]",
        "model.spec=te",
        "parallel.tensor=1",
        "train.steps=20",
        "train.eval_interval=0",
        *QUIET,
    )
    precisions = {
        "bf16": ("precision.dtype=bf16",),
        "fp8-delayed": ("precision.dtype=fp8", "precision.fp8_recipe=delayed"),
        "fp8-tensorwise": ("precision.dtype=fp8", "precision.fp8_recipe=tensorwise"),
    }
    return {
        name: RunSpec(ENGINE, (*common, *extra, f"checkpoint.dir={work / name}"))
        for name, extra in precisions.items()
    }


def long_context_variants() -> list[str]:
    """``none`` and every combination of eval's long-context options (``ntk``, ``logn``,
    ``window``, ...), for ``--long-context``."""
    from specialize.eval.perplexity import VARIANT_OPTIONS

    names = list(VARIANT_OPTIONS)
    combos = [
        "+".join(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)
    ]
    return ["none", *combos]


@dataclass(frozen=True)
class EvalRuns:
    """Line 4: ``specialize eval`` commands (module arguments, for torchrun on ``nproc``)."""

    greedy: list[str]
    sampled: list[str]
    greedy_results: Path
    sampled_results: Path
    lengths: tuple[int, int]
    variants: list[str] = field(default_factory=list)
    nproc: int = 2


def eval_runs(checkpoint: Path, work: Path, data: DemoData, train_length: int) -> EvalRuns:
    """HumanEval on 2 problems, greedy and sampled, and perplexity at the training length and 4x
    it (where the long-context options act) with every variant, all at TP=2 in bf16."""
    lengths = (train_length, 4 * train_length)
    variants = long_context_variants()
    common = [
        "-m", "specialize", "eval", str(checkpoint), "--tp", "2", "--dtype", "bf16",
        "--limit", "2", "--max-new-tokens", "64",
    ]  # fmt: skip
    greedy_results, sampled_results = work / "greedy.json", work / "sampled.json"
    greedy = [
        *common, "--tasks", "humaneval,perplexity", "--data", f"perplexity={data.perplexity}",
        "--lengths", ",".join(map(str, lengths)), "--long-context", ",".join(variants),
        "-o", str(greedy_results),
    ]  # fmt: skip
    sampled = [
        *common, "--tasks", "humaneval", "--samples", "2", "--temperature", "0.8",
        "--top-p", "0.95", "--seed", "1", "-o", str(sampled_results),
    ]  # fmt: skip
    return EvalRuns(greedy, sampled, greedy_results, sampled_results, lengths, variants)


@dataclass(frozen=True)
class ThroughputPlan:
    """Line 6: the run and what ``specialize plan`` predicts for exactly its layout."""

    preset: str
    run: RunSpec
    plan: object
    """``specialize.plan.PlanResult`` of the run's recipe and layout (``.requested``)."""


def gpu_spec(name: str, memory_bytes: int):
    """``specialize plan``'s spec of a device (its real memory), and whether its peak is known:
    an unknown GPU is planned with H100 peaks, which only rank layouts (no throughput claim)."""
    from specialize.plan import GPUS

    for key, spec in GPUS.items():
        if key.upper() in name.upper():
            return dataclasses.replace(spec, memory_bytes=memory_bytes), True
    peak = peak_tflops(name)
    h100 = GPUS["h100"]
    spec = dataclasses.replace(
        h100,
        name=name,
        memory_bytes=memory_bytes,
        bf16_tflops=peak or h100.bf16_tflops,
        fp8_tflops=None,
    )
    return spec, peak is not None


def throughput_plan(
    work: Path, data: DemoData, gpus: int, gpu, peak_known: bool = True
) -> ThroughputPlan:
    """The largest of ``THROUGHPUT_PRESETS`` that ``specialize plan`` fits on ``gpus`` GPUs of
    spec ``gpu`` at seq 8192: its recommended layout, and the plan of the recipe at that layout.
    Raises ``PlanError`` when none fits."""
    from specialize.config import load_config
    from specialize.plan import PlanError, plan, recommend, workload

    global_batch = 8 * gpus
    base = (
        f"data.seq_length={THROUGHPUT_SEQ}",
        "model.spec=te",
        "precision.dtype=bf16",
        "init.checkpoint=null",
        "train.tokens=null",
        f"train.steps={THROUGHPUT_STEPS}",
        f"train.global_batch_size={global_batch}",
        "schedule.warmup_steps=1",
        "train.eval_interval=0",
    )
    failures = []
    for preset in THROUGHPUT_PRESETS:
        recipe = BASE_RECIPES / f"{preset}.yaml"
        cfg = load_config(recipe, list(base), require_paths=False)
        try:
            chosen = recommend(workload(cfg), gpus, gpu).layout
        except PlanError as e:
            failures.append(str(e))
            continue
        layout = (
            f"parallel.tensor={chosen.tp}",
            f"parallel.pipeline={chosen.pp}",
            f"parallel.sequence_parallel={str(chosen.sequence_parallel).lower()}",
            f"parallel.distributed_optimizer={str(chosen.distributed_optimizer).lower()}",
            f"train.micro_batch_size={chosen.micro_batch}",
            f"model.recompute={chosen.recompute}",
        )
        if cfg.model.architecture().max_position_embeddings < THROUGHPUT_SEQ:
            layout += (f"model.max_position_embeddings={THROUGHPUT_SEQ}",)
        cfg = load_config(recipe, [*base, *layout], require_paths=False)
        result = plan(cfg, gpus, gpu)
        overrides = (
            *base,
            *layout,
            f"data.paths=[{data.code}]",
            f"checkpoint.dir={work / preset}",
            f"logging.interval={THROUGHPUT_LOG_INTERVAL}",
            *QUIET,
        )
        if peak_known:  # the run logs MFU against the same peak the plan assumes
            overrides += (f"logging.device_peak_tflops={gpu.bf16_tflops}",)
        return ThroughputPlan(preset, RunSpec(recipe, overrides, gpus, save=False), result)
    raise PlanError("; ".join(failures))
