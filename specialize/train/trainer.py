"""The training loop: resume or init, then step, validate and call back until the step budget.

How a run starts: from its own newest checkpoint (resume: everything, bitwise), else from
``init.checkpoint``: its weights, and for a stage that keeps them (``StageResetConfig``) also the
optimizer state, or the optimizer, schedule position and step count.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path

import torch.distributed as dist

from base import spec as layer_specs
from specialize import checkpoint
from specialize.checkpoint.state import load_for_resume, load_weights, load_weights_and_optimizer
from specialize.config import ConfigError, Derived, RecipeConfig, Stage
from specialize.convert.parity import DEFAULT_TOLERANCE, compare
from specialize.data.pretrain import data_manifest_records
from specialize.mcore.distributed import Topology
from specialize.train.callbacks import Callback
from specialize.train.engine import Engine, StepResult
from specialize.train.metrics import Throughput

log = logging.getLogger("specialize")


class SpikeError(FloatingPointError):
    """A step whose loss, gradient norm or weights left the range of the steps before it."""


class SpikeGuard:
    """Stops a diverging run at the step where it shows (``train.spike_factor``, ``spike_window``).

    Loss and gradient norm are compared with their mean over the previous steps of this launch,
    once there are a few of them: the first steps of a run (and of a resume) are volatile, and a
    mean of one step says little. The norm of the weights is compared with its value before the
    step, which exists from the first step on: an exploding update (a far too high LR) shows
    there one step before the loss sees it, so the weights it made are never saved.
    """

    MIN_STEPS = 5

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.checked = 0  # steps whose loss and gradient norm were compared with a mean

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def check(
        self, step: int, result: StepResult, weights_before: float, weights_after: float
    ) -> None:
        if not self.enabled:
            return
        hint = f"train.spike_factor={self.factor:g}; 0 disables the check"
        if not math.isfinite(weights_after):
            raise SpikeError(
                f"step {step}: the update made the norm of the weights {weights_after}; stopping"
            )
        low, high = sorted((weights_before, weights_after))
        if high > self.factor * low:
            raise SpikeError(
                f"step {step}: the update changed the norm of the weights {high / max(low, 1e-30):.3g}"
                f"-fold ({weights_before:.4g} -> {weights_after:.4g}); stopping without saving "
                f"({hint}; see optimizer.lr)"
            )
        if len(self.losses) >= min(self.MIN_STEPS, self.losses.maxlen):
            self.checked += 1
            for name, value, history in (
                ("loss", result.loss, self.losses),
                ("gradient norm", result.grad_norm, self.grad_norms),
            ):
                mean = sum(history) / len(history)
                if mean > 0 and value > self.factor * mean:
                    raise SpikeError(
                        f"step {step}: {name} {value:.4g} is {value / mean:.3g} times its mean "
                        f"{mean:.4g} over the previous {len(history)} steps; stopping without "
                        f"saving ({hint})"
                    )
        self.losses.append(result.loss)
        self.grad_norms.append(result.grad_norm)


def data_changes(recorded: dict, current: dict) -> list[str]:
    """How the data of ``data.paths`` differs from what a checkpoint's lineage recorded
    (``data_manifest_records``), entry by entry in order; empty when it is the same."""
    before, after = list(recorded.items()), list(current.items())
    changes = []
    for i in range(max(len(before), len(after))):
        if i >= len(after):
            changes.append(f"{before[i][0]} is no longer listed")
        elif i >= len(before):
            changes.append(f"{after[i][0]} was added")
        else:
            (old_path, old), (path, new) = before[i], after[i]
            if _manifest_hash(old) != _manifest_hash(new):
                was = f" (was {old_path})" if old_path != path else ""
                changes.append(f"{path}{was} changed: {_describe_change(old, new)}")
    return changes


def _manifest_hash(record: dict | None) -> str | None:
    return None if record is None else record.get("manifest_sha256")


def _describe_change(old: dict | None, new: dict | None) -> str:
    if old is None or new is None:
        return "it had no manifest.json then" if old is None else "it has no manifest.json now"
    parts = [f"manifest sha256 {old['manifest_sha256'][:12]} -> {new['manifest_sha256'][:12]}"]
    for key in ("documents", "sequences", "tokens"):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {old.get(key)} -> {new.get(key)}")
    return ", ".join(parts)


def check_same_data(cfg: RecipeConfig, path: Path, warn: bool, what: str = "") -> None:
    """Refuse to continue checkpoint ``path`` on other data than its lineage records, unless
    ``data.allow_changed`` (then warn, if ``warn``). ``what`` prefixes the message (a stage)."""
    recorded = checkpoint.read_lineage(path).get("data_manifests")
    if recorded is None:
        if warn:
            log.warning("%s records no data manifests; cannot check its data is unchanged", path)
        return
    changes = data_changes(recorded, data_manifest_records(cfg.data.paths))
    if not changes:
        return
    prefix = f"{what}: " if what else ""
    if cfg.data.allow_changed:
        if warn:
            log.warning(
                "%sdata.paths changed since %s was written (data.allow_changed=true: continuing "
                "on the new data): %s",
                prefix,
                path,
                "; ".join(changes),
            )
        return
    more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
    raise ConfigError(
        f"{prefix}data.paths: {changes[0]}{more}, since {path} was trained on it; set "
        "data.allow_changed=true to continue on the new data, or use another checkpoint.dir"
    )


def check_same_spec(cfg: RecipeConfig, path: Path, warn: bool) -> None:
    """Refuse to continue checkpoint ``path`` with other layers than its lineage records when
    ``model.spec=auto`` chose them (a resume on another kind of machine); an explicit spec is
    followed, with a warning (if ``warn``)."""
    recorded = (checkpoint.read_lineage(path).get("model_spec") or {}).get("resolved")
    now = cfg.model.resolved_spec()
    if recorded is None or recorded == now:
        return
    if cfg.model.spec == "auto":
        why = layer_specs.why_not_te()
        raise ConfigError(
            f"model.spec=auto resolves to {now} on this machine"
            + (f" ({why})" if why else "")
            + f", but {path} was trained with the {recorded} layer spec; resume it where auto "
            f"resolves to {recorded}, or set model.spec={now} to continue with the {now} layers"
        )
    if warn:
        log.warning(
            "%s was trained with the %s layer spec; continuing with model.spec=%s",
            path,
            recorded,
            now,
        )


class Trainer:
    def __init__(
        self,
        cfg: RecipeConfig,
        topo: Topology,
        derived: Derived,
        engine: Engine,
        data,
        callbacks: list[Callback],
        stage: Stage | None = None,
    ) -> None:
        self.cfg, self.topo, self.derived, self.engine, self.data = cfg, topo, derived, engine, data
        self.callbacks = callbacks  # the run's (``default_callbacks``); the trainer names none
        self.stage = stage  # the recipe stage this run is; None for a single-stage recipe
        self.start_step = 0
        self.step = 0  # the last step taken (or resumed at)
        self.consumed_samples = 0
        self.resumed_from: Path | None = None
        self.parent: str | None = cfg.init.checkpoint
        self.last_checkpoint: Path | None = None
        self.generation: dict = {}
        """The generation defaults of the checkpoint this run continues or starts from (an HF
        import's ``generation_config.json``; empty for one trained from scratch here); every
        checkpoint it saves carries them on."""
        self.metrics: dict[str, float] = {}
        """The latest logged step's throughput (``train.metrics``), for every logger."""
        self.throughput: Throughput | None = None
        self.history: list[float] = []
        self.lrs: list[float] = []  # StepResult.lr of each step of this launch
        self.validation: list[tuple[int, float]] = []
        self.restored = False
        self.guard = SpikeGuard(cfg.train.spike_factor, cfg.train.spike_window)
        self.diverged: str | None = None
        """Why the run stopped at a non-finite or spiking step; nothing may be saved after it."""
        self._weight_norm: float | None = None

    @property
    def is_rank0(self) -> bool:
        return self.topo.rank == 0

    def restore(self) -> None:
        """Resume from the run's newest checkpoint, else start from ``init``, else start fresh.

        Raises (on every rank) when the checkpoint belongs to another model or was trained on
        other data; the caller writes the run's records only after this succeeded."""
        if not self.cfg.checkpoint.resume:
            existing = checkpoint.complete_checkpoints(self.cfg.checkpoint.dir)
            if existing:  # refused now rather than at the first save, which would collide
                raise checkpoint.CheckpointError(
                    f"checkpoint.resume=false, but {self.cfg.checkpoint.dir} holds checkpoints "
                    f"(newest {existing[0].name}) and a run never overwrites them; choose another "
                    "checkpoint.dir or move them away"
                )
        latest = (
            checkpoint.find_latest(self.cfg.checkpoint.dir) if self.cfg.checkpoint.resume else None
        )
        if latest is not None:
            # Continuing is only a resume on the data the checkpoint was trained on; an init
            # checkpoint (below) legitimately comes from other data.
            check_same_data(self.cfg, latest, warn=self.is_rank0)
            check_same_spec(self.cfg, latest, warn=self.is_rank0)
            self.start_step, self.consumed_samples = load_for_resume(self.engine, latest)
            self.resumed_from = latest
            self.parent = str(latest)
            self.generation = checkpoint.read_generation_config(latest)
            if self.is_rank0:
                log.info("resumed from %s at step %d", latest, self.start_step)
        elif self.cfg.init.checkpoint is not None:
            path = checkpoint.resolve_checkpoint(self.cfg.init.checkpoint)
            what = self._start_from(path)
            self.parent = str(path)
            self.generation = checkpoint.read_generation_config(path)
            if self.is_rank0:
                log.info("initialized %s from %s", what, path)
            if self.cfg.init.verify_against is not None:
                self._verify(self.cfg.init.verify_against)
        elif self.is_rank0:
            log.info(
                "no init checkpoint: training %s from random initialization",
                self.engine.preset.name,
            )
        self.restored = True

    def _start_from(self, path: Path) -> str:
        """Load what this run keeps of its init checkpoint; returns what that was."""
        reset = self.stage.reset if self.stage is not None else None
        if reset is None or reset.optimizer:
            load_weights(self.engine, path)
            return "weights"
        if reset.iteration:
            load_weights_and_optimizer(self.engine, path)
            return "weights and optimizer state"
        # Continuing the predecessor is resuming it under this stage's recipe.
        self.start_step, self.consumed_samples = load_for_resume(self.engine, path)
        if self.start_step != self.stage.start_step:
            raise checkpoint.CheckpointError(
                f"{path} is at iteration {self.start_step}, but {self.stage.label} continues "
                f"from iteration {self.stage.start_step}"
            )
        return f"weights, optimizer, schedule and step count ({self.start_step})"

    def _verify(self, hf_dir: str) -> None:
        tolerance = self.cfg.init.verify_tolerance or DEFAULT_TOLERANCE[self.cfg.precision.dtype]
        lines = compare(self.engine.model[0], hf_dir, tolerance)
        if self.is_rank0:
            log.info("parity with %s holds:\n%s", hf_dir, "\n".join(lines))

    def fit(self) -> list[float]:
        """Train to the end (or ``exit_after_steps``); restores first unless ``restore`` ran."""
        if not self.restored:
            self.restore()
        train_iterators = self.data.train_iterators(self.consumed_samples)
        step = self.step = self.start_step
        self.throughput = Throughput.for_run(
            self.cfg, self.engine.preset, self.topo.world_size, self.derived.steps
        )
        for cb in self.callbacks:
            cb.on_train_start(self)
        if step == 0 and self.cfg.train.eval_interval:
            self.validate(0)  # the starting point (random or init weights) later ones compare to
        stop_at = self.derived.steps
        if self.cfg.train.exit_after_steps is not None:
            stop_at = min(stop_at, self.cfg.train.exit_after_steps)
        while step < stop_at:
            result = self._train_step(train_iterators, step + 1)
            step += 1
            self.step = step
            self.consumed_samples += self.cfg.train.global_batch_size
            self.history.append(result.loss)
            self.lrs.append(result.lr)
            self.metrics.update(self.throughput.update(step, result.num_tokens))
            for cb in self.callbacks:
                cb.on_step_end(self, step, result)
            interval = self.cfg.train.eval_interval
            if interval and (step % interval == 0 or step == stop_at):
                self.validate(step)
        for cb in self.callbacks:
            cb.on_train_end(self, step)
        dist.barrier()
        return self.history

    def _train_step(self, train_iterators: list, step: int) -> StepResult:
        """One step, stopped (on every rank alike) when it is non-finite or spikes."""
        try:
            if self.guard.enabled and self._weight_norm is None:
                self._weight_norm = self.engine.weight_norm()
            result = self.engine.train_step(train_iterators, step)
            if self.guard.enabled:
                before, self._weight_norm = self._weight_norm, self.engine.weight_norm()
                self.guard.check(step, result, before, self._weight_norm)
        except FloatingPointError as e:
            self.diverged = str(e)
            newest = self.last_checkpoint or self.resumed_from
            if newest is not None:
                raise type(e)(f"{e}. Newest checkpoint: {newest}") from None
            raise
        return result

    @property
    def finished(self) -> bool:
        """Whether the run reached its last step (not stopped early by exit_after_steps)."""
        return self.step >= self.derived.steps

    def release(self) -> None:
        """Free the model, optimizer and data now (the next stage needs the memory); the numbers
        recorded by this run stay."""
        engine, self.engine, self.data = self.engine, None, None
        if engine is not None:
            engine.close()

    def validate(self, step: int) -> float | None:
        iterators = self.data.validation_iterators()
        if iterators is None:
            return None
        loss = self.engine.evaluate(iterators, self.cfg.train.eval_steps)
        self.validation.append((step, loss))
        for cb in self.callbacks:
            cb.on_validation(self, step, loss)
        return loss
