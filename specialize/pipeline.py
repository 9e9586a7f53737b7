"""``specialize pipeline PIPELINE.yaml``: named steps run in order — data commands, training
recipes under torchrun, evaluations and the comparison report — each in ``<dir>/<step>``.

A ``train`` step is a recipe plus overrides; the pipeline sets its ``checkpoint.dir`` and, when the
step declares ``init: <earlier step>``, its ``init.checkpoint`` to that step's final checkpoint.
On a re-run, a finished step is skipped and an interrupted training step resumes from its own
newest checkpoint (the trainer does that); a ``run`` command runs again, so it must be resumable
or cheap (``specialize data prepare`` is both). A step whose declaration changed since it finished
is an error, not silently reused: remove its directory to run it again. So is a step whose inputs
changed since it started or finished: the checkpoint it starts from or evaluates (a parent step
trained again), the manifests of its training data, the results a report compares. Inputs are
identified by content, so a copied or touched file is the same input and a retrained one is not.

``<dir>/lineage.json`` links each step's final checkpoint to its parent step, recipe, overrides,
data manifests and git commit (copied from the checkpoint's own ``lineage.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specialize.checkpoint import (
    CheckpointError,
    iteration_dir,
    read_lineage,
    resolve_checkpoint,
)
from specialize.config import ConfigError, derive, load_config, resolve_stages
from specialize.eval.config import EvalConfig, to_yaml
from specialize.lock import LockHeld, exclusive

log = logging.getLogger("specialize")

KINDS = ("train", "run", "eval", "compare")
STATE_DIR = ".pipeline"
MISSING_INPUT = "missing"
# Files up to this size are hashed whole; larger ones (checkpoint shards) by their size and their
# first and last MiB, which any retraining changes, so checking a 7B checkpoint stays cheap.
WHOLE_FILE_BYTES = 4 << 20
EDGE_BYTES = 1 << 20


@dataclass
class StepConfig:
    name: str = MISSING
    """Step name: its directory under ``dir`` and how later steps refer to it."""
    kind: str = "train"
    """``train`` (a recipe under torchrun), ``run`` (a command), ``eval`` (``specialize eval`` of
    checkpoints) or ``compare`` (``specialize compare`` of the eval steps' results)."""
    recipe: Optional[str] = None
    """train: the recipe YAML, relative to the pipeline file."""
    overrides: list[str] = field(default_factory=list)
    """train: ``key=value`` overrides of the recipe (``checkpoint.dir`` and ``init`` are the
    pipeline's)."""
    init: Optional[str] = None
    """train: an earlier train step (its final checkpoint) or a checkpoint path to start from;
    None keeps the recipe's own ``init``."""
    nproc: Optional[int] = None
    """train: processes per node under torchrun (default: the pipeline's ``nproc``)."""
    launch: Optional[list[str]] = None
    """train: the launcher words (default: the pipeline's ``launch``)."""
    command: list[str] = field(default_factory=list)
    """run: the command's words; a first word ``python`` is this interpreter."""
    models: dict[str, str] = field(default_factory=dict)
    """eval: model label -> train step (its final checkpoint) or checkpoint path."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """eval: what ``specialize eval`` runs for each model (tasks, data, mode, limit, lengths,
    max_new_tokens, tp, pp, dtype, ...); its checkpoint, label and output are the pipeline's."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for this step's command, over the pipeline's ``env`` (e.g. the
    thread count of a one-process eval step). Recorded in ``lineage.json``; not part of the
    step's declaration."""
    results: list[str] = field(default_factory=list)
    """compare: eval steps whose results to compare (default: every eval step before it)."""
    base: Optional[str] = None
    """compare: label of the model the deltas are taken against (default: the first model)."""
    paper: bool = True
    """compare: the paper's numbers as reference rows (false when tasks ran on other data)."""


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    """Pipeline name, shown in logs and lineage."""
    dir: str = MISSING
    """Directory holding every step's outputs (``<dir>/<step>``) and ``lineage.json``."""
    nproc: int = 1
    """Processes per node for a training step under torchrun."""
    launch: list[str] = field(
        default_factory=lambda: [
            "python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node={nproc}"
        ]
    )  # fmt: skip
    """How a training step is launched, before ``-m specialize train ...``; ``{nproc}`` is the
    step's process count. Several nodes under Slurm, e.g.: ``[srun, --nodes=8,
    --ntasks-per-node=1, python, -m, torch.distributed.run, --nnodes=8, --nproc-per-node=8,
    --rdzv-backend=c10d, --rdzv-endpoint=HEAD:29500]``."""
    world_size: Optional[int] = None
    """Total training processes when ``launch`` spans several nodes (default: ``nproc``); used
    to know a step's step count before it runs."""
    steps: list[StepConfig] = field(default_factory=list)
    """The steps, run in order."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for every step's command, e.g. the CPU demo's kernel pins
    (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ...) that make its numbers the same on any x86-64
    machine with AVX2. Recorded in ``lineage.json``; not part of a step's declaration."""


def _register_resolvers() -> None:
    """``${stdlib:}``: this Python's standard library, the offline code corpus of the demos."""
    import sysconfig

    def stdlib() -> str:
        return sysconfig.get_paths()["stdlib"]

    if not OmegaConf.has_resolver("stdlib"):
        OmegaConf.register_resolver("stdlib", stdlib)


def load_pipeline(path: str | os.PathLike[str], overrides: list[str] = ()) -> PipelineConfig:
    """Read and check a pipeline file (``key=value`` overrides, e.g. ``dir=...``). Top-level keys
    besides the schema's are allowed as ``${...}`` variables (e.g. ``heldout``)."""
    _register_resolvers()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline not found: {path}")
    try:
        raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(raw)
        _check_moved_eval_keys(raw.get("steps") or [], path)
        schema_keys = {f.name for f in dataclasses.fields(PipelineConfig)}
        known = {k: v for k, v in raw.items() if k in schema_keys}
        node = OmegaConf.merge(OmegaConf.structured(PipelineConfig), known)
        missing = sorted(OmegaConf.missing_keys(node))
        if missing:
            raise ConfigError(f"{path}: {', '.join(missing)} must be set")
        cfg: PipelineConfig = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        if "Missing mandatory value" in reason:
            reason += " (give it on the command line as NAME=VALUE)"
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{reason}") from None
    _check(cfg, path)
    for step in cfg.steps:
        if step.recipe is not None:
            step.recipe = str((path.parent / step.recipe).resolve())
    return cfg


# What an eval step declared itself before ``eval:`` held it.
MOVED_EVAL_KEYS = (
    "tasks",
    "data",
    "mode",
    "limit",
    "lengths",
    "max_new_tokens",
    "tp",
    "pp",
    "dtype",
)


def _check_moved_eval_keys(steps: Any, path: Path) -> None:
    for i, step in enumerate(steps):
        moved = [key for key in MOVED_EVAL_KEYS if isinstance(step, DictConfig) and key in step]
        if moved:
            raise ConfigError(
                f"{path}: steps[{i}] ({step.get('name')}): {', '.join(moved)} go under eval: now "
                f"(eval: {{{', '.join(f'{key}: ...' for key in moved)}}})"
            )


def _check(cfg: PipelineConfig, path: Path) -> None:
    """Every step checked before any runs: a bad reference found at step 5 must not cost the
    hours of steps 1 to 4."""
    names = [step.name for step in cfg.steps]
    seen: dict[str, StepConfig] = {}
    for i, step in enumerate(cfg.steps):
        where = f"{path}: steps[{i}] ({step.name})"
        if step.kind not in KINDS:
            raise ConfigError(f"{where}: kind {step.kind!r} must be one of {', '.join(KINDS)}")
        if step.name in seen or not step.name or "/" in step.name:
            raise ConfigError(f"{where}: step names must be unique, non-empty, without '/'")
        if step.kind == "train":
            if not step.recipe:
                raise ConfigError(f"{where}: a train step needs a recipe")
            if not (path.parent / step.recipe).is_file():
                raise ConfigError(f"{where}: recipe {step.recipe} not found next to {path}")
            if step.init is not None:
                _check_source(where, "init", step.init, step.name, seen, names)
            if step.init in seen and seen[step.init].kind != "train":
                raise ConfigError(f"{where}: init {step.init!r} is not a train step")
        if step.kind == "run" and not step.command:
            raise ConfigError(f"{where}: a run step needs a command")
        if step.kind == "eval":
            if not step.models or not step.eval.tasks:
                raise ConfigError(f"{where}: an eval step needs models and eval.tasks")
            _check_eval(where, step.eval)
            for label, source in step.models.items():
                _check_source(where, f"model {label}", source, step.name, seen, names)
                if source in seen and seen[source].kind != "train":
                    raise ConfigError(f"{where}: model {label}={source} is not a train step")
        if step.kind == "compare":
            for name in step.results:
                if name not in seen or seen[name].kind != "eval":
                    raise ConfigError(f"{where}: results {name!r} is not an earlier eval step")
        seen[step.name] = step
    if not cfg.steps:
        raise ConfigError(f"{path}: no steps")


def _check_eval(where: str, cfg: EvalConfig) -> None:
    """An eval step's ``eval:`` is a valid config once the pipeline gives it a model."""
    given = [f"eval.{key}" for key in PER_MODEL if getattr(cfg, key) is not None]
    if given:
        raise ConfigError(f"{where}: {', '.join(given)}: set by the pipeline, one per model")
    try:
        _model_eval(cfg, "MODEL", "CHECKPOINT", "RESULTS.json").validate()
    except ValueError as e:
        raise ConfigError(f"{where}: eval: {e}") from None


# The fields of an eval step's config the pipeline sets per model (``score``: none, it generates).
PER_MODEL = ("checkpoint", "score", "label", "output")


def _model_eval(cfg: EvalConfig, label: str, checkpoint: str, output: str) -> EvalConfig:
    """An eval step's config for one of its models."""
    return dataclasses.replace(cfg, checkpoint=checkpoint, label=label, output=output)


def _check_source(
    where: str, what: str, source: str, own: str, seen: dict[str, StepConfig], names: list[str]
) -> None:
    """A step a train or eval step reads from must run before it (which also rules out cycles);
    a word that names no step is a checkpoint path, so it must exist or contain a ``/``."""
    if source == own:
        raise ConfigError(f"{where}: {what} {source!r} is the step itself")
    if source in names and source not in seen:
        raise ConfigError(
            f"{where}: {what} {source!r} is a later step; steps run in order, so a step can only "
            "start from or evaluate one before it"
        )
    if source not in names and "/" not in source and not Path(source).exists():
        raise ConfigError(
            f"{where}: {what} {source!r} is no earlier step ({', '.join(seen) or 'none'}) and "
            f"no existing checkpoint (write a path made later as ./{source})"
        )


class StepFailed(RuntimeError):
    """A step's command exited with an error."""


@dataclass
class Pipeline:
    """Runs a ``PipelineConfig``; ``python`` is the interpreter the commands run with."""

    cfg: PipelineConfig
    python: str = sys.executable
    rerun: str = "specialize pipeline PIPELINE.yaml"
    """The command that runs this pipeline again, for the messages that say how."""

    @property
    def root(self) -> Path:
        return Path(self.cfg.dir)

    def step_dir(self, step: StepConfig) -> Path:
        return self.root / step.name

    def _marker(self, step: StepConfig) -> Path:
        return self.root / STATE_DIR / f"{step.name}.json"

    def _started(self, step: StepConfig) -> Path:
        """The inputs of a step that started and has not finished (an interrupted one resumes)."""
        return self.root / STATE_DIR / f"{step.name}.started.json"

    def run(self, only: list[str] | None = None) -> None:

        self.root.mkdir(parents=True, exist_ok=True)
        # SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so the running step is stopped too.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            with exclusive(self.root):  # two pipelines on one directory would race every step
                self._run_steps(only)
        except LockHeld as e:
            raise ConfigError(
                f"{self.root} is in use by another pipeline ({e.holder}); wait for it to end or "
                "set dir= to another directory"
            ) from None

    def _run_steps(self, only: list[str] | None) -> None:
        for step in self.cfg.steps:
            if only and step.name not in only:
                continue
            fingerprint = self._fingerprint(step)
            marker = self._marker(step)
            if marker.is_file():
                recorded = json.loads(marker.read_text())
                if recorded["fingerprint"] != fingerprint:
                    raise ConfigError(
                        f"step {step.name}: its declaration changed since it finished "
                        f"({marker}); {self._how_to_rerun(step, marker)}"
                    )
                inputs = self._inputs(step)
                self._check_inputs(step, recorded.get("inputs"), inputs, "finished", marker)
                log.info("step %s: finished earlier; skipping", step.name)
                continue
            inputs = self._inputs(step)
            started_record = self._started(step)
            if started_record.is_file():
                recorded = json.loads(started_record.read_text())
                self._check_inputs(step, recorded.get("inputs"), inputs, "started", started_record)
            _write_json(started_record, {"inputs": inputs})
            log.info("step %s (%s): starting", step.name, step.kind)
            started = time.monotonic()
            getattr(self, f"_{step.kind}")(step)
            seconds = time.monotonic() - started
            done = {"fingerprint": fingerprint, "seconds": round(seconds, 1), "inputs": inputs}
            _write_json(marker, done)
            started_record.unlink()
            log.info("step %s: done in %.0f s", step.name, seconds)
            self.write_lineage()

    # ---- inputs

    def _inputs(self, step: StepConfig) -> dict[str, str]:
        """What a step reads that an earlier step (or the user) can change, each identified by
        content: checkpoints it starts from or evaluates, manifests of its training data, data
        files of its tasks, the results it compares. ``run`` commands read what they like, so
        their inputs are unknown."""
        inputs: dict[str, str] = {}
        if step.kind == "train":
            if step.init is not None:
                inputs[f"init {step.init}"] = self._checkpoint_identity(step.init)
            for path in self._data_paths(step):
                inputs[f"data {path}"] = _manifest_identity(Path(path))
        elif step.kind == "eval":
            # The task registry with the plugins' tasks and perplexity (torch and megatron-core):
            # eval steps only, so other steps and `specialize --help` stay light.
            import specialize.eval.perplexity  # noqa: F401  (registers the perplexity task)
            from specialize.eval.tasks import get_task

            for label, source in step.models.items():
                inputs[f"model {label}={source}"] = self._checkpoint_identity(source)
            for task, value in step.eval.data.items():
                for path, suffixes in get_task(task).data_inputs(value):
                    inputs[f"data {task}={path}"] = _path_identity(Path(path), suffixes)
        elif step.kind == "compare":
            for path in self._compared(step):
                inputs[f"results {path}"] = _path_identity(path)
        return inputs

    def _check_inputs(
        self,
        step: StepConfig,
        recorded: dict[str, str] | None,
        current: dict[str, str],
        when: str,
        record: Path,
    ) -> None:
        """Stop when an input of ``step`` differs from what it used when it ``when`` (started or
        finished). Only content counts, not where it lives (a moved pipeline directory is the
        same). A side that is missing cannot be compared: a step cannot have used a missing
        input, and one deleted since (to free disk) did not change what the step made."""
        if recorded is None:
            log.warning("step %s: %s before inputs were recorded; not checked", step.name, when)
            return
        changed = []
        for name in sorted(set(recorded) | set(current)):
            then, now = recorded.get(name, MISSING_INPUT), current.get(name, MISSING_INPUT)
            if now == MISSING_INPUT and then != MISSING_INPUT and when == "finished":
                log.warning("step %s: its input %s no longer exists; not checked", step.name, name)
            if MISSING_INPUT not in (then, now) and _digest(then) != _digest(now):
                changed.append(f"{name} is now {_short(now)}, was {_short(then)}")
        if changed:
            raise ConfigError(
                f"step {step.name}: its inputs changed since it {when} ({'; '.join(changed)}); "
                f"{self._how_to_rerun(step, record)}"
            )

    def _how_to_rerun(self, step: StepConfig, record: Path) -> str:
        state = [self.step_dir(step), record]
        return f"to run it again: rm -r {shlex.join(map(str, state))} && {self.rerun}"

    def _checkpoint_identity(self, source: str) -> str:
        """``PATH sha256:DIGEST`` of the checkpoint a train step's final one or a path names."""
        try:
            if source in {s.name for s in self.cfg.steps}:
                path = self.checkpoint_of(source)
            else:
                path = resolve_checkpoint(source)
        except (StepFailed, CheckpointError):
            return MISSING_INPUT
        return _path_identity(path)

    def _data_paths(self, step: StepConfig) -> list[str]:
        """The training data directories of a train step (of every stage, for staged recipes)."""

        cfg = self._recipe(step)
        configs = [stage.cfg for stage in resolve_stages(cfg)] if cfg.stages else [cfg]
        return list(dict.fromkeys(path for c in configs for path in c.data.paths))

    # ---- steps

    def _train(self, step: StepConfig) -> None:
        nproc = step.nproc or self.cfg.nproc
        launch = [w.replace("{nproc}", str(nproc)) for w in (step.launch or self.cfg.launch)]
        train = ["-m", "specialize", "train", step.recipe, *self._overrides(step)]
        self._exec(step, [*self._interpreter(launch), *train])
        final = self.final_checkpoint(step)
        if final is None:
            raise StepFailed(
                f"step {step.name}: training exited without its final checkpoint "
                f"(stopped early?); run the pipeline again to continue"
            )

    def _run(self, step: StepConfig) -> None:
        self._exec(step, self._interpreter(step.command))

    def _eval(self, step: StepConfig) -> None:
        out = self.step_dir(step)
        for label, source in step.models.items():
            results = out / f"{label}.json"
            if results.is_file():  # this model's results were written before an interruption
                continue
            checkpoint = str(self.checkpoint_of(source))
            cfg = _model_eval(step.eval, label, checkpoint, str(results))
            config = out / f"{label}.eval.yaml"  # also the record of what was run
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(to_yaml(cfg))
            world = cfg.tp * cfg.pp
            if world > 1:
                launch = [self.python, "-m", "torch.distributed.run", "--standalone"]
                launch += [f"--nproc-per-node={world}"]
            else:
                launch = [self.python]
            self._exec(step, [*launch, "-m", "specialize", "eval", "--config", str(config)])

    def _compare(self, step: StepConfig) -> None:
        from specialize.eval.report import compare  # compare steps only

        merged = merge_results(self._compared(step))
        out = self.step_dir(step)
        paths = []
        for label, doc in merged.items():
            path = out / "results" / f"{label}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            paths.append(path)
        report = compare(paths, out, base=step.base, paper=step.paper)
        log.info("step %s: report %s", step.name, report)

    # ---- helpers

    def _compared(self, step: StepConfig) -> list[Path]:
        """The results files a compare step reads: its eval steps' (default: every one before)."""
        names = step.results or [
            s.name for s in self.cfg.steps[: self.cfg.steps.index(step)] if s.kind == "eval"
        ]
        return [
            self.step_dir(s) / f"{label}.json" for s in self._steps(names) for label in s.models
        ]

    def _steps(self, names: list[str]) -> list[StepConfig]:
        by_name = {s.name: s for s in self.cfg.steps}
        return [by_name[n] for n in names]

    def _exec(self, step: StepConfig, words: list[str]) -> None:
        """Run a command in the pipeline's process group (a signal to the group reaches it too); if
        the pipeline itself is interrupted, the command is stopped before the pipeline exits."""
        log.info("step %s: %s", step.name, shlex.join(words))
        # ``python`` inside a shell command is this interpreter too (its bin directory first).
        env = {**os.environ, **self.cfg.env, **step.env}
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        process = subprocess.Popen(words, env=env)
        try:
            code = process.wait()
        except BaseException:  # KeyboardInterrupt, or SystemExit from SIGTERM (see run)
            process.terminate()  # torchrun passes it on to its workers
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        if code != 0:
            raise StepFailed(f"step {step.name}: `{shlex.join(words)}` exited with {code}")

    def _interpreter(self, words: list[str]) -> list[str]:
        """A first word ``python`` is this interpreter."""
        return [self.python, *words[1:]] if words and words[0] == "python" else list(words)

    def _overrides(self, step: StepConfig, planned: bool = False) -> list[str]:
        """The recipe overrides of a train step: its own, then its directory and init."""
        overrides = [*step.overrides, f"checkpoint.dir={self.step_dir(step)}"]
        if step.init is not None:
            overrides.append(f"init.checkpoint={self.checkpoint_of(step.init, planned)}")
        return overrides

    def _recipe(self, step: StepConfig):

        return load_config(step.recipe, self._overrides(step, planned=True))

    def final_checkpoint(self, step: StepConfig) -> Path | None:
        """The train step's last checkpoint if it exists (its last stage's, for staged recipes)."""
        cfg = self._recipe(step)
        world = self.cfg.world_size or step.nproc or self.cfg.nproc
        if cfg.stages:
            expected = resolve_stages(cfg)[-1].final_checkpoint
        else:
            expected = iteration_dir(cfg.checkpoint.dir, derive(cfg, world).steps)
        return expected if (expected / "metadata.json").is_file() else None

    def checkpoint_of(self, source: str, planned: bool = False) -> Path:
        """A train step's final checkpoint (``planned``: where it will be), or a path as given."""
        by_name = {s.name: s for s in self.cfg.steps}
        if source not in by_name:
            return Path(source)
        step = by_name[source]
        if planned:
            return self.step_dir(step)
        final = self.final_checkpoint(step)
        if final is None:
            raise StepFailed(f"step {source} has no final checkpoint yet")
        return final

    def _fingerprint(self, step: StepConfig) -> str:
        # Fields left at their defaults are not part of it, so a new field does not invalidate
        # steps that finished before it existed.
        # The environment is how a step runs, not what it is (see ``env``).
        record = {
            f.name: getattr(step, f.name)
            for f in dataclasses.fields(step)
            if getattr(step, f.name) != _default(f) and f.name != "env"
        }
        if "eval" in record:
            record.update(_eval_declaration(record.pop("eval")))
        if step.recipe is not None:  # the recipe's content counts, not just its name
            record["recipe_sha256"] = _recipe_hash(Path(step.recipe))
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def write_lineage(self) -> Path:
        # megatron-core on first use; a pipeline of data steps never needs it
        from specialize.checkpoint.lineage import git_commit

        steps = []
        for step in self.cfg.steps:
            entry: dict[str, Any] = {"name": step.name, "kind": step.kind}
            done = self._marker(step).is_file()
            entry["finished"] = done
            if done:
                entry["inputs"] = json.loads(self._marker(step).read_text()).get("inputs")
            if step.kind == "train":
                entry.update(recipe=step.recipe, overrides=step.overrides, parent=step.init)
                final = self.final_checkpoint(step) if done else None
                entry["checkpoint"] = None if final is None else str(final)
                record = {} if final is None else read_lineage(final)
                if record:
                    entry["parent_checkpoint"] = record.get("init")
                    entry["data_manifests"] = record.get("data_manifests")
                    entry["git_commit"] = record.get("git_commit")
            elif step.kind == "run":
                entry["command"] = step.command
            elif step.kind == "eval":
                entry["models"] = step.models
                entry["results"] = [str(self.step_dir(step) / f"{m}.json") for m in step.models]
            if step.env:
                entry["env"] = step.env
            steps.append(entry)
        doc = {
            "pipeline": self.cfg.name,
            "git_commit": git_commit(),
            "env": self.cfg.env,
            "steps": steps,
        }
        path = self.root / "lineage.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path


def _eval_declaration(cfg: EvalConfig) -> dict[str, Any]:
    """The fields of an eval step's ``eval:`` that differ from the defaults, flat and in the form
    the step itself declared them before (``lengths`` comma-separated), so eval steps finished
    then keep their fingerprint."""
    record = {}
    default = dataclasses.asdict(EvalConfig())
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict) and key != "data":  # sampling: its own fields
            record.update({f"{key}.{k}": v for k, v in value.items() if v != default[key][k]})
        elif value != default[key]:
            record[key] = ",".join(map(str, value)) if key == "lengths" else value
    return record


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically: a kill mid-write leaves the old record or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _digest(identity: str) -> str:
    return identity.rpartition(" sha256:")[2]


def _short(identity: str) -> str:
    """An identity with its digest cut to 12 hex digits, for messages."""
    head, sep, digest = identity.rpartition(" sha256:")
    return f"{head} sha256:{digest[:12]}" if sep else identity


def _manifest_identity(path: Path) -> str:
    """A data directory by its ``manifest.json``, which holds the hashes of the data it was made
    from (as the checkpoint lineage records it); ``missing`` without one (training refuses it)."""
    return _path_identity(path / "manifest.json")


def _path_identity(path: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """``PATH sha256:DIGEST`` over the content of a file or a directory tree (relative names,
    sizes and bytes; no times, so a copy or a ``touch`` is the same input); ``missing`` if
    ``path`` does not exist. ``suffixes``: only the tree's files with these suffixes count."""
    if not path.exists():
        return MISSING_INPUT
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if suffixes is not None and not path.is_file():
        files = [file for file in files if file.suffix in suffixes]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(EDGE_BYTES))
                f.seek(size - EDGE_BYTES)
                digest.update(f.read(EDGE_BYTES))
    return f"{path} sha256:{digest.hexdigest()}"


def _recipe_hash(path: Path) -> str:
    """sha256 over a recipe and the ``base:`` files it derives from."""
    digest = hashlib.sha256()
    seen = set()
    while path not in seen and path.is_file():
        seen.add(path)
        text = path.read_bytes()
        digest.update(text)
        parent = (OmegaConf.load(path) or {}).get("base")
        if not parent:
            break
        path = (path.parent / parent).resolve()
    return digest.hexdigest()


def merge_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Results files merged per model label (tasks from several eval steps); a task scored
    twice for one model is an error."""
    from specialize.eval.report import load_results  # compare steps only

    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        load_results(path)  # checks the format, says which file is wrong
        doc = json.loads(path.read_text())
        label = doc["model"]["label"]
        if label not in merged:
            merged[label] = doc
            continue
        twice = sorted(set(merged[label]["tasks"]) & set(doc["tasks"]))
        if twice:
            raise ConfigError(f"{path}: {label} has results for {', '.join(twice)} already")
        merged[label]["tasks"].update(doc["tasks"])
    return merged
