"""What ``specialize train --dry-run`` prints: the resolved recipe, its derived numbers and, per
stage, the learning-rate curve as the run's own scheduler computes it."""

from __future__ import annotations

import typing
from typing import Optional

import torch

from specialize.config import (
    Derived,
    RecipeConfig,
    Stage,
    missing_lines,
    missing_paths,
    resolve_stages,
    spec_note,
    to_yaml,
)
from specialize.train.engine import build_scheduler


def summary(cfg: RecipeConfig, derived: Derived, world_size: int) -> str:
    """The resolved config and its derived numbers, as ``--dry-run`` prints them."""
    total_tokens = derived.steps * derived.tokens_per_step
    missing = "".join(line + "\n" for line in missing_lines(cfg))
    return (
        f"{to_yaml(cfg)}\n"
        f"{missing}"
        f"# derived for {world_size} process(es)\n"
        f"layer_spec: {spec_note(cfg)}\n"
        f"data_parallel: {derived.data_parallel}\n"
        f"micro_batches_per_step: {derived.micro_batches}\n"
        f"tokens_per_step: {derived.tokens_per_step}\n"
        f"steps: {derived.steps}\n"
        f"warmup_steps: {derived.warmup_steps}\n"
        f"total_tokens: {total_tokens:.4g}\n"
    )


def lr_curve(
    cfg: RecipeConfig, derived: Derived, points: typing.Iterable[int]
) -> list[tuple[int, float]]:
    """The learning rate at each of ``points`` (steps on the schedule, ascending in the result).

    Built by ``engine.build_scheduler`` — megatron-core's ``OptimizerParamScheduler`` with the
    run's settings — on a stand-in optimizer, and stepped like training steps it, so the curve
    cannot disagree with a run. The value at step s is the scheduler's after s steps: what the
    trainer logs for step s (``StepResult.lr``) and the rate step s + 1 applies.
    """
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    scheduler = build_scheduler(cfg, stand_in, derived)
    curve, at = [], 0
    for step in sorted(set(points)):
        if step < 0:
            raise ValueError(f"lr_curve: step {step} is before the schedule starts")
        scheduler.step(increment=step - at)
        at = step
        curve.append((step, stand_in.param_groups[0]["lr"]))
    return curve


def _curve_points(start: int, end: int, warmup: int) -> dict[int, str]:
    """Steps worth showing on a stage's LR curve, with what each one is."""
    labels: dict[int, list[str]] = {start + 1: ["first"]}
    if start < warmup <= end:
        labels.setdefault(warmup, []).append("end of warmup")
    for percent in (25, 50, 75):
        step = start + round(percent / 100 * (end - start))
        if step > start:
            labels.setdefault(step, []).append(f"{percent}%")
    labels.setdefault(end, []).append("last")
    return {step: ", ".join(names) for step, names in sorted(labels.items())}


def _reset_text(stage: Stage) -> str:
    reset = stage.reset
    if reset.optimizer:
        return "optimizer, scheduler, iteration (loads the weights only)"
    if reset.scheduler:
        return "scheduler, iteration (keeps the optimizer state)"
    return f"nothing (continues optimizer, schedule and step count from step {stage.start_step})"


def stages_summary(cfg: RecipeConfig, world_size: int) -> str:
    """A staged recipe and, per stage, its derived numbers and LR curve, as ``--dry-run``
    prints them."""
    stages = resolve_stages(cfg)
    lines = [
        to_yaml(cfg),
        *missing_lines(cfg),
        f"# {len(stages)} stages, derived for {world_size} process(es)",
        f"layer_spec: {spec_note(cfg)}",
    ]
    previous_lr: Optional[float] = None  # the LR the stage before ended at
    for stage in stages:
        derived = stage.derive(world_size)
        c = stage.cfg
        own = derived.steps - stage.start_step
        if stage.index == 1:
            init = c.init.checkpoint or "none (random initialization)"
            if "init.checkpoint" in missing_paths(c):
                init += " (MISSING: does not exist yet; the run refuses to start until it does)"
        else:
            init = f"{c.init.checkpoint} (final checkpoint of stage {stage.index - 1})"
        lines += [
            f"stage {stage.index}/{stage.count}: {stage.name}",
            f"  checkpoint.dir: {c.checkpoint.dir}",
            f"  init: {init}",
            f"  resets: {_reset_text(stage)}",
            f"  steps: {own} ({stage.length})",
        ]
        if stage.start_step:
            lines.append(f"  iterations: {stage.start_step + 1} to {derived.steps}")
        lines += [
            f"  warmup_steps: {derived.warmup_steps}",
            f"  tokens_per_step: {derived.tokens_per_step}",
            f"  total_tokens: {own * derived.tokens_per_step:.4g}",
            f"  data: {c.data.format} {', '.join(c.data.paths) or '(no paths)'}",
            f"  lr: {c.optimizer.lr:g} peak, {c.optimizer.min_lr:g} min, {c.schedule.decay} "
            "(value after each step, as logged):",
        ]
        if stage.start_step and previous_lr is not None:
            # A continuing stage keeps the schedule position, not the previous stage's settings.
            lines.append(
                f"    step {stage.start_step}: {previous_lr:.6e} (stage {stage.index - 1} ended here)"
            )
        points = _curve_points(stage.start_step, derived.steps, derived.warmup_steps)
        curve = lr_curve(c, derived, points)
        for step, lr in curve:
            lines.append(f"    step {step}: {lr:.6e} ({points[step]})")
        previous_lr = curve[-1][1]
    return "\n".join(lines) + "\n"
