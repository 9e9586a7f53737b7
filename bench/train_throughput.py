"""Training-step throughput on CPU: this project's engine vs. transformers' Qwen2 of the same shape.

One step = forward + backward + AdamW step with grad-norm clipping at 1.0, fp32, on the same random
token batches (same micro-batch size, sequence length and micro-batches per step) and the same
``torch.set_num_threads``. Ours runs through ``Engine.build`` / ``Engine.train_step`` (megatron-core
DDP, ``get_megatron_optimizer``, ``OptimizerParamScheduler``, the schedule's forward/backward, the
local layer spec, a world of one); no trainer, so no checkpoint is written. Theirs is
``transformers.Qwen2ForCausalLM`` with ``torch.optim.AdamW`` and ``clip_grad_norm_``, with attention
``sdpa`` and ``eager``.

``init_distributed`` installs the CPU bridge, a TorchFunctionMode that stays active for the rest of
the process and would tax every op of a later transformers step. So transformers is measured first,
in this process, before the bridge exists (or in a child process with ``--hf-subprocess``). The
bridge cannot be popped for one of our steps (megatron's schedule allocates on ``device="cuda"``),
so its cost is measured two ways: intercepted calls per step x the mode's per-call overhead, and
our step with ``--bridge-stack`` extra copies of the mode pushed (interleaved with plain steps).

    .venv/bin/python bench/train_throughput.py [--preset qwen-nano] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(ROOT))

# megatron-core announces each optional kernel it falls back from; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed")

from base.presets import QwenPreset, get_preset  # noqa: E402
from base.tokenizer import NUM_RANKS  # noqa: E402  (ids below it are ordinary tokens)


def batches(seq: int, mb: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random micro-batches; the same seed gives both implementations the same tokens."""
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, NUM_RANKS, (mb, seq + 1), generator=g)
        yield {
            "tokens": rows[:, :-1],
            "labels": rows[:, 1:],
            "loss_mask": torch.ones(mb, seq),
            "position_ids": torch.arange(seq).expand(mb, seq),
        }


class Phases:
    """Wall time per named phase of the current step (forward, optimizer, ...)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[name] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out, self.now = dict(self.now), defaultdict(float)
        return out


def timed_step(step: Callable[[], object], phases: Phases) -> dict:
    """One step's wall time, its phases, and what the kernel did for it (page faults, sys time)."""
    phases.take()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "phases": phases.take(),
        "sys_seconds": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }


def summarize(records: list[dict]) -> dict:
    names = sorted({k for r in records for k in r["phases"]})
    return {
        "times": [r["seconds"] for r in records],
        "median": statistics.median(r["seconds"] for r in records),
        "phases": {n: statistics.median(r["phases"].get(n, 0.0) for r in records) for n in names},
        "sys_seconds": statistics.median(r["sys_seconds"] for r in records),
        "minor_faults": statistics.median(r["minor_faults"] for r in records),
    }


def run_steps(step: Callable[[], object], phases: Phases, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    return summarize([timed_step(step, phases) for _ in range(steps)])


def profile_step(step: Callable[[], object], n: int, vocab: int, faults: float) -> dict:
    """``_profile_once``, retried while the profiled step page-faults far more than the timed
    steps did (``faults``): the profiler's small allocations can split the heap's free blocks so
    that the next logits buffer needs fresh pages, which no timed step paid for."""
    for _ in range(3):
        prof = _profile_once(step, n, vocab)
        if prof["minor_faults"] <= 2 * faults + 1000:
            break
    return prof


def _profile_once(step: Callable[[], object], n: int, vocab: int) -> dict:
    """One profiled step (after warmup): the top ``n`` ops by self CPU time, and the step's wall
    time split into ops on vocabulary-sized tensors (output layer, loss, embedding tables and
    their optimizer updates), all other ops, and time outside any op (Python, framework)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # The first step under the profiler is not recorded: it pays for the profiler's set-up.
    plan = schedule(wait=0, warmup=1, active=1, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, schedule=plan) as prof:
        step()
        prof.step()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        prof.step()
    # The schedule's "ProfilerStep#N" range holds, as its self time, what no op accounts for.
    by_shape = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if not e.key.startswith("ProfilerStep")
    ]
    vocab_us = sum(
        e.self_cpu_time_total
        for e in by_shape
        if any(isinstance(s, list) and vocab in s for s in e.input_shapes or ())
    )
    ops_us = sum(e.self_cpu_time_total for e in by_shape)
    events = sorted(
        (e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    return {
        "wall_ms": wall * 1e3,
        "vocab_ops_ms": vocab_us / 1e3,
        "other_ops_ms": (ops_us - vocab_us) / 1e3,
        "outside_ops_ms": max(wall * 1e3 - ops_us / 1e3, 0.0),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "top": [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": e.self_cpu_time_total / 1e3,
                "share_of_wall": e.self_cpu_time_total / 1e3 / (wall * 1e3),
            }
            for e in events[:n]
        ],
    }


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and keep freed memory for reuse.

    By default glibc maps every block over 32 MB (logits, their gradients: 600 MB each here)
    freshly from the kernel and unmaps it on free, so each step page-faults and zeroes them anew.
    Applied to the whole process, i.e. to both implementations. Returns whether it took effect."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # A trim threshold of -1 never hands the heap's top back (mallopt(3)).
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


# ----------------------------------------------------------------------------- transformers


def hf_step_fn(
    preset: QwenPreset, attn: str, args: argparse.Namespace, phases: Phases
) -> tuple[Callable[[], float], int]:
    """A transformers training step and the model's parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from base.hf_mapping import qwen2_config

    config = Qwen2Config(
        **qwen2_config(preset),
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).float().train()
    # megatron-core's AdamW groups: biases and norms are not decayed.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = batches(args.seq, args.micro_batch)
    tokens_per_step = args.seq * args.micro_batch * args.micro_batches
    forward = phases.wrap("forward+loss", model.__call__)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    backward = phases.wrap("backward", backward)
    clip = phases.wrap("optimizer", torch.nn.utils.clip_grad_norm_)
    opt_step = phases.wrap("optimizer", optimizer.step)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.micro_batches):
            b = next(data)
            labels = b["labels"].contiguous()  # as transformers' own label shift leaves them
            # shift_labels: the labels are already shifted, exactly as ours receive them.
            # num_items_in_batch: sum over the step's tokens, megatron's per-token loss.
            out = forward(
                input_ids=b["tokens"],
                position_ids=b["position_ids"],
                labels=labels,
                shift_labels=labels,
                num_items_in_batch=tokens_per_step,
            )
            backward(out.loss)
            total += out.loss.item()
        clip(model.parameters(), 1.0)
        opt_step()
        return total

    return step, sum(p.numel() for p in model.parameters())


def measure_hf(preset: QwenPreset, args: argparse.Namespace) -> dict:
    attns = ("sdpa", "eager")
    phases = {a: Phases() for a in attns}
    built = {a: hf_step_fn(preset, a, args, phases[a]) for a in attns}
    steps = {a: step for a, (step, _) in built.items()}
    for a in attns:
        for _ in range(args.warmup):
            steps[a]()
    # Alternating steps: drift in machine load hits both attention implementations alike.
    records: dict[str, list[dict]] = {a: [] for a in attns}
    for _ in range(args.steps):
        for a in attns:
            records[a].append(timed_step(steps[a], phases[a]))
    out = {a: {**summarize(records[a]), "num_params": built[a][1]} for a in attns}
    if args.profile:
        for a in attns:
            out[a]["profile"] = profile_step(
                steps[a], args.profile, preset.padded_vocab_size, out[a]["minor_faults"]
            )
    return out


def measure_hf_subprocess(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "hf.json")
        cmd = [sys.executable, __file__, *argv, "--only-hf", str(path)]
        subprocess.run(cmd, check=True)
        return json.loads(path.read_text())


# ----------------------------------------------------------------------------- ours


class _CountCalls(TorchFunctionMode):
    """Counts the torch-function calls that reach the mode below it (the bridge)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def build_engine(preset_name: str, args: argparse.Namespace):
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        None,
        [
            f"model.preset={preset_name}",
            "model.spec=local",
            "precision.dtype=fp32",
            f"data.seq_length={args.seq}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch * args.micro_batches}",
            f"train.steps={args.warmup + 3 * args.steps + 10}",
            f"train.seed={args.seed}",
            "schedule.warmup_steps=0",  # lr is not zero from the first step, as for transformers
            "optimizer.lr=3e-4",
            "optimizer.weight_decay=0.1",
            "optimizer.adam_beta1=0.9",
            "optimizer.adam_beta2=0.95",
            "optimizer.adam_eps=1e-8",
            "optimizer.clip_grad=1.0",
            "checkpoint.interval=0",
            "logging.tensorboard=false",
            "logging.progress=false",
            f"train.chunked_cross_entropy={args.chunked_cross_entropy}",
            *(
                [f"train.cross_entropy_chunk_tokens={args.chunk_tokens}"]
                if args.chunk_tokens
                else []
            ),
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    return Engine.build(cfg, topo, derive(cfg, topo.world_size))


def bridge_overhead_per_call_us(n: int = 5000) -> float:
    """Extra µs per torch call for one more copy of the bridge's mode, over a mix of call kinds."""
    from specialize.mcore import cpu_bridge

    x = torch.ones(4, 4)
    calls = (
        lambda: torch.add(x, x),
        lambda: x.view(-1),
        lambda: x.size(),
        lambda: torch.zeros(4, device="cpu"),
        lambda: x.float(),
    )

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(n):
            for call in calls:
                call()
        return time.perf_counter() - start

    # Alternating repeats, best of each: a busy moment in either loop cannot decide the result.
    once, twice = [], []
    for _ in range(7):
        once.append(loop())
        with cpu_bridge._CudaToCpuMode():
            twice.append(loop())
    return max(min(twice) - min(once), 0.0) / (n * len(calls)) * 1e6


def measure_ours(preset_name: str, args: argparse.Namespace) -> dict:
    from specialize.mcore import cpu_bridge

    engine = build_engine(preset_name, args)
    torch.set_num_threads(args.threads)  # in case anything on the way changed it
    phases = Phases()
    ddp = engine.model[0]
    # Instance attributes shadow the methods train_step calls; the engine itself is unchanged.
    ddp.forward = phases.wrap("forward+loss", ddp.forward)
    engine._forward_backward = phases.wrap("forward+backward", engine._forward_backward)
    engine.optimizer.step = phases.wrap("optimizer", engine.optimizer.step)
    iterators = [batches(args.seq, args.micro_batch)]
    counter = [0]

    def step() -> float:
        counter[0] += 1
        return engine.train_step(iterators, counter[0]).loss

    out = run_steps(step, phases, args.warmup, args.steps)
    fb = out["phases"].pop("forward+backward")
    out["phases"]["backward"] = fb - out["phases"]["forward+loss"]
    out["num_params"] = sum(p.numel() for p in ddp.parameters())
    if args.profile:
        out["profile"] = profile_step(
            step, args.profile, engine.preset.padded_vocab_size, out["minor_faults"]
        )

    with _CountCalls() as counting:
        step()
    out["bridge_calls_per_step"] = counting.calls
    out["bridge_us_per_call"] = bridge_overhead_per_call_us()
    out["bridge_seconds_by_count"] = counting.calls * out["bridge_us_per_call"] / 1e6

    # Plain and stacked steps alternate so that drift in machine load hits both alike.
    k = args.bridge_stack
    plain, stacked = [], []
    for _ in range(args.steps if k else 0):
        plain.append(timed_step(step, phases)["seconds"])
        with ExitStack() as stack:
            for _ in range(k):
                stack.enter_context(cpu_bridge._CudaToCpuMode())
            stacked.append(timed_step(step, phases)["seconds"])
    if k:
        diff = statistics.median(s - p for p, s in zip(plain, stacked))
        out["bridge_seconds_by_stacking"] = diff / k
    return out


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    from importlib.metadata import version

    return {
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def print_profile(title: str, prof: dict) -> None:
    print(
        f"\n{title}: profiled step {prof['wall_ms']:.0f} ms = ops on vocab-sized tensors "
        f"{prof['vocab_ops_ms']:.0f} ms"
        f" + other ops {prof['other_ops_ms']:.0f} ms + outside ops {prof['outside_ops_ms']:.0f} ms"
        f" ({prof['minor_faults']} page faults)"
    )
    for r in prof["top"]:
        print(f"  {r['self_ms']:9.1f} ms {r['share_of_wall']:6.1%} {r['calls']:6d}x  {r['op']}")


def report(
    args: argparse.Namespace,
    preset: QwenPreset,
    ours: dict,
    hf: dict,
    hf_where: str,
    load_before: float,
) -> dict:
    tokens = args.seq * args.micro_batch * args.micro_batches
    runs = {"ours": ours, "transformers_sdpa": hf["sdpa"], "transformers_eager": hf["eager"]}
    tps = {name: tokens / r["median"] for name, r in runs.items()}
    same = hf["sdpa"]["num_params"] == ours["num_params"]
    print(
        f"\n{preset.name}: {ours['num_params'] / 1e6:.2f}M params"
        + ("" if same else f" (transformers: {hf['sdpa']['num_params'] / 1e6:.2f}M)")
        + f", seq {args.seq}, micro-batch "
        f"{args.micro_batch} x {args.micro_batches} = {tokens} tokens/step, fp32, "
        f"{args.threads} threads; median of {args.steps} steps after {args.warmup} warmup"
    )
    allocator = (
        "glibc, freed memory kept (--malloc-reuse)" if args.malloc_reuse else "glibc default"
    )
    print(f"transformers measured {hf_where}; allocator: {allocator}\n")
    labels = {
        "ours": "ours (megatron-core engine)",
        "transformers_sdpa": "transformers Qwen2, sdpa",
        "transformers_eager": "transformers Qwen2, eager",
    }
    print(
        f"{'implementation':<29}{'step ms':>9}{'tokens/s':>10}{'ours/it':>9}"
        f"{'fwd+loss':>10}{'bwd':>8}{'optim':>8}{'sys ms':>8}{'faults':>9}"
    )
    for name, r in runs.items():
        ph = r["phases"]
        print(
            f"{labels[name]:<29}{r['median'] * 1e3:>9.0f}{tps[name]:>10.0f}"
            f"{tps['ours'] / tps[name]:>8.2f}x"
            f"{ph['forward+loss'] * 1e3:>10.0f}{ph['backward'] * 1e3:>8.0f}"
            f"{ph['optimizer'] * 1e3:>8.0f}{r['sys_seconds'] * 1e3:>8.0f}{r['minor_faults']:>9.0f}"
        )
    print(
        "(phase columns: median ms; sys ms and faults: kernel time and minor page faults per step)"
    )
    stacking = ours.get("bridge_seconds_by_stacking")
    print(
        f"\nCPU bridge (TorchFunctionMode): {ours['bridge_calls_per_step']} intercepted calls/step"
        f" x {ours['bridge_us_per_call']:.1f} us = {ours['bridge_seconds_by_count'] * 1e3:.1f} ms"
        f" ({ours['bridge_seconds_by_count'] / ours['median']:.2%} of our step)"
        + (
            f"; with {args.bridge_stack} extra copies stacked: {stacking * 1e3:+.1f} ms per copy"
            if stacking is not None
            else ""
        )
    )
    load_after = os.getloadavg()[0]
    # This run itself adds at most `threads` to the load; more than that means other work competed.
    print(f"1-minute load average: {load_before:.1f} before, {load_after:.1f} after")
    if load_after > args.threads + 1.0:
        print("warning: other processes were competing for the cores; numbers are noisy")
    if args.profile:
        print_profile("ours", ours["profile"])
        print_profile("transformers sdpa", hf["sdpa"]["profile"])
        print_profile("transformers eager", hf["eager"]["profile"])
    return {
        "preset": preset.name,
        "num_params": ours["num_params"],
        "transformers_num_params": hf["sdpa"]["num_params"],
        "seq_length": args.seq,
        "micro_batch_size": args.micro_batch,
        "micro_batches": args.micro_batches,
        "tokens_per_step": tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "transformers_measured": hf_where,
        "malloc_reuse": args.malloc_reuse,
        "tokens_per_second": tps,
        "ratio_ours_over": {
            "transformers_sdpa": tps["ours"] / tps["transformers_sdpa"],
            "transformers_eager": tps["ours"] / tps["transformers_eager"],
        },
        "runs": {
            name: {k: v for k, v in r.items() if not k.startswith("bridge")}
            for name, r in runs.items()
        },
        "bridge": {
            "calls_per_step": ours["bridge_calls_per_step"],
            "us_per_call": ours["bridge_us_per_call"],
            "seconds_by_count": ours["bridge_seconds_by_count"],
            "seconds_per_copy_by_stacking": stacking,
            "stacked_copies": args.bridge_stack,
        },
        "machine": {**machine(), "load_average_1min": [load_before, load_after]},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen-nano")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top N ops")
    p.add_argument(
        "--bridge-stack",
        type=int,
        default=50,
        metavar="K",
        help="extra bridge modes stacked to time the bridge on our step (0: skip)",
    )
    p.add_argument(
        "--malloc-reuse",
        action="store_true",
        help="glibc keeps freed memory instead of unmapping it (both implementations; see README)",
    )
    p.add_argument(
        "--hf-subprocess",
        action="store_true",
        help="measure transformers in a child process instead of before the bridge is installed",
    )
    p.add_argument(
        "--chunked-cross-entropy",
        choices=("null", "true", "false"),
        default="null",
        help="ours: train.chunked_cross_entropy (null: the default, on for this CPU path)",
    )
    p.add_argument(
        "--chunk-tokens", type=int, default=0, help="ours: train.cross_entropy_chunk_tokens"
    )
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--only-hf", type=Path, help=argparse.SUPPRESS)  # the child's entry point
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]

    torch.set_num_threads(args.threads)
    if args.malloc_reuse and not keep_freed_memory():
        raise SystemExit("--malloc-reuse: needs glibc on Linux")
    preset = get_preset(args.preset)
    if args.only_hf:
        args.only_hf.write_text(json.dumps(measure_hf(preset, args)))
        return
    if args.hf_subprocess:
        hf, where = measure_hf_subprocess(argv), "in a child process (no CPU bridge)"
    else:
        hf, where = measure_hf(preset, args), "first, in this process, before the CPU bridge"
    ours = measure_ours(preset.name, args)
    result = report(args, preset, ours, hf, where, load_before)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
