"""The training loop: resume or init, then step, validate and call back until the step budget.

How a run starts: from its own newest checkpoint (resume: everything, bitwise), else from
``init.checkpoint``: its weights, and for a stage that keeps them (``StageResetConfig``) also the
optimizer state, or the optimizer, schedule position and step count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from specialize import checkpoint
from specialize.callbacks import Callback, Checkpointer, ConsoleLogger, TensorBoardLogger
from specialize.config import Derived, RecipeConfig, Stage
from specialize.distributed import Topology
from specialize.engine import Engine

log = logging.getLogger("specialize")


class Trainer:
    def __init__(
        self,
        cfg: RecipeConfig,
        topo: Topology,
        derived: Derived,
        engine: Engine,
        data,
        callbacks: list[Callback] | None = None,
        stage: Stage | None = None,
    ) -> None:
        self.cfg, self.topo, self.derived, self.engine, self.data = cfg, topo, derived, engine, data
        self.callbacks = callbacks if callbacks is not None else default_callbacks(cfg)
        self.stage = stage  # the recipe stage this run is; None for a single-stage recipe
        self.start_step = 0
        self.step = 0  # the last step taken (or resumed at)
        self.consumed_samples = 0
        self.resumed_from: Path | None = None
        self.parent: str | None = cfg.init.checkpoint
        self.last_checkpoint: Path | None = None
        self.metrics: dict[str, float] = {}
        self.history: list[float] = []
        self.lrs: list[float] = []  # StepResult.lr of each step of this launch
        self.validation: list[tuple[int, float]] = []

    @property
    def is_rank0(self) -> bool:
        return self.topo.rank == 0

    def restore(self) -> None:
        """Resume from the run's newest checkpoint, else start from ``init``, else start fresh."""
        latest = (
            checkpoint.find_latest(self.cfg.checkpoint.dir) if self.cfg.checkpoint.resume else None
        )
        if latest is not None:
            self.start_step, self.consumed_samples = checkpoint.load_for_resume(self.engine, latest)
            self.resumed_from = latest
            self.parent = str(latest)
            if self.is_rank0:
                log.info("resumed from %s at step %d", latest, self.start_step)
        elif self.cfg.init.checkpoint is not None:
            path = checkpoint.resolve_checkpoint(self.cfg.init.checkpoint)
            what = self._start_from(path)
            self.parent = str(path)
            if self.is_rank0:
                log.info("initialized %s from %s", what, path)
            if self.cfg.init.verify_against is not None:
                self._verify(self.cfg.init.verify_against)
        elif self.is_rank0:
            log.info(
                "no init checkpoint: training %s from random initialization", self.cfg.model.preset
            )

    def _start_from(self, path: Path) -> str:
        """Load what this run keeps of its init checkpoint; returns what that was."""
        reset = self.stage.reset if self.stage is not None else None
        if reset is None or reset.optimizer:
            checkpoint.load_weights(self.engine, path)
            return "weights"
        if reset.iteration:
            checkpoint.load_weights_and_optimizer(self.engine, path)
            return "weights and optimizer state"
        # Continuing the predecessor is resuming it under this stage's recipe.
        self.start_step, self.consumed_samples = checkpoint.load_for_resume(self.engine, path)
        if self.start_step != self.stage.start_step:
            raise checkpoint.CheckpointError(
                f"{path} is at iteration {self.start_step}, but {self.stage.label} continues "
                f"from iteration {self.stage.start_step}"
            )
        return f"weights, optimizer, schedule and step count ({self.start_step})"

    def _verify(self, hf_dir: str) -> None:
        from specialize.verify import DEFAULT_TOLERANCE, compare

        tolerance = self.cfg.init.verify_tolerance or DEFAULT_TOLERANCE[self.cfg.precision.dtype]
        lines = compare(self.engine.model[0], hf_dir, tolerance)
        if self.is_rank0:
            log.info("parity with %s holds:\n%s", hf_dir, "\n".join(lines))

    def fit(self) -> list[float]:
        self.restore()
        train_iterators = self.data.train_iterators(self.consumed_samples)
        step = self.step = self.start_step
        for cb in self.callbacks:
            cb.on_train_start(self)
        if step == 0 and self.cfg.train.eval_interval:
            self.validate(0)  # the starting point (random or init weights) later ones compare to
        stop_at = self.derived.steps
        if self.cfg.train.exit_after_steps is not None:
            stop_at = min(stop_at, self.cfg.train.exit_after_steps)
        while step < stop_at:
            result = self.engine.train_step(train_iterators, step + 1)
            step += 1
            self.step = step
            self.consumed_samples += self.cfg.train.global_batch_size
            self.history.append(result.loss)
            self.lrs.append(result.lr)
            for cb in self.callbacks:
                cb.on_step_end(self, step, result)
            interval = self.cfg.train.eval_interval
            if interval and (step % interval == 0 or step == stop_at):
                self.validate(step)
        for cb in self.callbacks:
            cb.on_train_end(self, step)
        dist.barrier()
        return self.history

    @property
    def finished(self) -> bool:
        """Whether the run reached its last step (not stopped early by exit_after_steps)."""
        return self.step >= self.derived.steps

    def release(self) -> None:
        """Drop the model, optimizer and data (the next stage needs the memory); the numbers
        recorded by this run stay."""
        self.engine = self.data = None

    def validate(self, step: int) -> float | None:
        iterators = self.data.validation_iterators()
        if iterators is None:
            return None
        loss = self.engine.evaluate(iterators, self.cfg.train.eval_steps)
        self.validation.append((step, loss))
        for cb in self.callbacks:
            cb.on_validation(self, step, loss)
        return loss


def default_callbacks(cfg: RecipeConfig) -> list[Callback]:
    callbacks: list[Callback] = [ConsoleLogger()]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoardLogger(Path(cfg.checkpoint.dir) / "tensorboard"))
    callbacks.append(Checkpointer())
    return callbacks
