"""What happens around a training step: console progress, TensorBoard, checkpoints.

A callback sees the trainer and the step's numbers; it never changes how a step is computed. The
loggers show the step's result and ``Trainer.metrics`` (throughput and MFU, ``train.metrics``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from specialize.checkpoint.state import save
from specialize.config import RecipeConfig
from specialize.train.engine import StepResult

if TYPE_CHECKING:
    from specialize.train.trainer import Trainer

log = logging.getLogger("specialize")


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None: ...

    def on_validation(self, trainer: Trainer, step: int, loss: float) -> None: ...

    def on_train_end(self, trainer: Trainer, step: int) -> None: ...


class ConsoleLogger(Callback):
    """Rank 0: a progress bar with ETA and a line of numbers every ``logging.interval`` steps."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0 and trainer.cfg.logging.progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                trainer.cfg.name,
                total=trainer.derived.steps,
                completed=trainer.start_step,
                status="",
            )

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        if not trainer.throughput.logs(step):
            if self._progress:
                self._progress.update(self._task, completed=step)
            return
        metrics = trainer.metrics
        line = (
            f"step {step}/{trainer.derived.steps} | loss {result.loss:.4f} | lr {result.lr:.3e} | "
            f"grad norm {result.grad_norm:.3f} | {metrics['tokens_per_s']:,.0f} tok/s"
        )
        if "mfu" in metrics:
            line += f" | MFU {100 * metrics['mfu']:.1f}%"
        if trainer.is_rank0:
            if self._progress:
                self._progress.update(self._task, completed=step, status=f"loss {result.loss:.4f}")
                self._progress.console.print(line)
            else:
                log.info(line)

    def on_validation(self, trainer: Trainer, step: int, loss: float) -> None:
        if trainer.is_rank0:
            text = f"step {step} | validation loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}"
            (self._progress.console.print if self._progress else log.info)(text)

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        if self._progress:
            self._progress.stop()


class TensorBoardLogger(Callback):
    """Rank 0 writes loss, LR, grad norm, throughput and validation loss."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", result.loss, step)
        self.writer.add_scalar("train/lr", result.lr, step)
        self.writer.add_scalar("train/grad_norm", result.grad_norm, step)
        for key in ("tokens_per_s", "mfu"):
            if key in trainer.metrics:
                self.writer.add_scalar(f"throughput/{key}", trainer.metrics[key], step)

    def on_validation(self, trainer: Trainer, step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("validation/loss", loss, step)

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        if self.writer is not None:
            self.writer.close()


class Checkpointer(Callback):
    """Saves every ``checkpoint.interval`` steps and at the end of the run."""

    def __init__(self) -> None:
        self.last_saved: int | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_saved = trainer.start_step if trainer.resumed_from else None

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        interval = trainer.cfg.checkpoint.interval
        if interval and step % interval == 0:
            self._save(trainer, step)

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        if self.last_saved != step:
            self._save(trainer, step)

    def _save(self, trainer: Trainer, step: int) -> None:
        if trainer.diverged is not None:
            # The weights after a non-finite or spiking step are not a state to continue from.
            raise RuntimeError(f"refusing to save step {step}: {trainer.diverged}")
        path = save(
            trainer.engine,
            step,
            trainer.consumed_samples,
            parent=trainer.parent,
            generation=trainer.generation,
        )
        self.last_saved = step
        trainer.last_checkpoint = path
        if trainer.is_rank0:
            log.info("saved checkpoint %s", path)


def default_callbacks(cfg: RecipeConfig) -> list[Callback]:
    """What a training run calls back: progress, TensorBoard when on, checkpoints."""
    callbacks: list[Callback] = [ConsoleLogger()]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoardLogger(Path(cfg.checkpoint.dir) / "tensorboard"))
    callbacks.append(Checkpointer())
    return callbacks
