"""``specialize pipeline PIPELINE.yaml``: named steps run in order — data commands, training
recipes under torchrun, evaluations and the comparison report — each in ``<dir>/<step>``.

A ``train`` step is a recipe plus overrides; the pipeline sets its ``checkpoint.dir`` and, when the
step declares ``init: <earlier step>``, its ``init.checkpoint`` to that step's final checkpoint.
On a re-run, a finished step is skipped and an interrupted training step resumes from its own
newest checkpoint (the trainer does that); a ``run`` command runs again, so it must be resumable
or cheap (``specialize data prepare`` is both). A step whose declaration changed since it finished
is an error, not silently reused: remove its directory to run it again.

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

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specialize.config import ConfigError

log = logging.getLogger("specialize")

KINDS = ("train", "run", "eval", "compare")
STATE_DIR = ".pipeline"


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
    tasks: list[str] = field(default_factory=list)
    """eval: task names (``perplexity`` included)."""
    data: dict[str, str] = field(default_factory=dict)
    """eval: task -> data path (``--data``)."""
    mode: str = "base"
    """eval: prompt mode, ``base`` or ``chat``."""
    limit: Optional[int] = None
    """eval: first N problems per task (perplexity: windows per length)."""
    lengths: Optional[str] = None
    """eval: perplexity context lengths, comma-separated."""
    max_new_tokens: Optional[int] = None
    """eval: generation budget instead of the protocols' (a quick run; recorded in the results)."""
    tp: int = 1
    """eval: tensor-parallel size."""
    pp: int = 1
    """eval: pipeline-parallel size."""
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


def _check(cfg: PipelineConfig, path: Path) -> None:
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
            if step.init in seen and seen[step.init].kind != "train":
                raise ConfigError(f"{where}: init {step.init!r} is not a train step")
        if step.kind == "run" and not step.command:
            raise ConfigError(f"{where}: a run step needs a command")
        if step.kind == "eval":
            if not step.models or not step.tasks:
                raise ConfigError(f"{where}: an eval step needs models and tasks")
            for label, source in step.models.items():
                if source in seen and seen[source].kind != "train":
                    raise ConfigError(f"{where}: model {label}={source} is not a train step")
        if step.kind == "compare":
            for name in step.results:
                if name not in seen or seen[name].kind != "eval":
                    raise ConfigError(f"{where}: results {name!r} is not an earlier eval step")
        seen[step.name] = step
    if not cfg.steps:
        raise ConfigError(f"{path}: no steps")


class StepFailed(RuntimeError):
    """A step's command exited with an error."""


@dataclass
class Pipeline:
    """Runs a ``PipelineConfig``; ``python`` is the interpreter the commands run with."""

    cfg: PipelineConfig
    python: str = sys.executable

    @property
    def root(self) -> Path:
        return Path(self.cfg.dir)

    def step_dir(self, step: StepConfig) -> Path:
        return self.root / step.name

    def _marker(self, step: StepConfig) -> Path:
        return self.root / STATE_DIR / f"{step.name}.json"

    def run(self, only: list[str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so the running step is stopped too.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
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
                        f"({marker}); remove {self.step_dir(step)} and {marker} to run it again"
                    )
                log.info("step %s: finished earlier; skipping", step.name)
                continue
            log.info("step %s (%s): starting", step.name, step.kind)
            started = time.monotonic()
            getattr(self, f"_{step.kind}")(step)
            seconds = time.monotonic() - started
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(
                json.dumps({"fingerprint": fingerprint, "seconds": round(seconds, 1)}, indent=2)
            )
            log.info("step %s: done in %.0f s", step.name, seconds)
            self.write_lineage()

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
            args = ["eval", str(self.checkpoint_of(source)), "--tasks", ",".join(step.tasks)]
            args += ["--mode", step.mode, "--label", label, "-o", str(results)]
            args += [f"--data={task}={path}" for task, path in step.data.items()]
            if step.limit is not None:
                args += ["--limit", str(step.limit)]
            if step.lengths:
                args += ["--lengths", step.lengths]
            if step.max_new_tokens is not None:
                args += ["--max-new-tokens", str(step.max_new_tokens)]
            world = step.tp * step.pp
            if world > 1:
                args += ["--tp", str(step.tp), "--pp", str(step.pp)]
                launch = [self.python, "-m", "torch.distributed.run", "--standalone"]
                launch += [f"--nproc-per-node={world}"]
            else:
                launch = [self.python]
            self._exec(step, [*launch, "-m", "specialize", *args])

    def _compare(self, step: StepConfig) -> None:
        from specialize.report import compare

        names = step.results or [
            s.name for s in self.cfg.steps[: self.cfg.steps.index(step)] if s.kind == "eval"
        ]
        merged = merge_results(
            [self.step_dir(s) / f"{label}.json" for s in self._steps(names) for label in s.models]
        )
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

    def _steps(self, names: list[str]) -> list[StepConfig]:
        by_name = {s.name: s for s in self.cfg.steps}
        return [by_name[n] for n in names]

    def _exec(self, step: StepConfig, words: list[str]) -> None:
        """Run a command in the pipeline's process group (a signal to the group reaches it too); if
        the pipeline itself is interrupted, the command is stopped before the pipeline exits."""
        log.info("step %s: %s", step.name, shlex.join(words))
        # ``python`` inside a shell command is this interpreter too (its bin directory first).
        env = dict(os.environ)
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
        from specialize.config import load_config

        return load_config(step.recipe, self._overrides(step, planned=True))

    def final_checkpoint(self, step: StepConfig) -> Path | None:
        """The train step's last checkpoint if it exists (its last stage's, for staged recipes)."""
        from specialize import checkpoint
        from specialize.config import derive, resolve_stages

        cfg = self._recipe(step)
        world = self.cfg.world_size or step.nproc or self.cfg.nproc
        if cfg.stages:
            expected = resolve_stages(cfg)[-1].final_checkpoint
        else:
            expected = checkpoint.iteration_dir(cfg.checkpoint.dir, derive(cfg, world).steps)
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
        record = {
            f.name: getattr(step, f.name)
            for f in dataclasses.fields(step)
            if getattr(step, f.name) != _default(f)
        }
        if step.recipe is not None:  # the recipe's content counts, not just its name
            record["recipe_sha256"] = _recipe_hash(Path(step.recipe))
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def write_lineage(self) -> Path:
        from specialize.checkpoint import git_commit

        steps = []
        for step in self.cfg.steps:
            entry: dict[str, Any] = {"name": step.name, "kind": step.kind}
            done = self._marker(step).is_file()
            entry["finished"] = done
            if step.kind == "train":
                entry.update(recipe=step.recipe, overrides=step.overrides, parent=step.init)
                final = self.final_checkpoint(step) if done else None
                entry["checkpoint"] = None if final is None else str(final)
                lineage = None if final is None else final / "lineage.json"
                if lineage is not None and lineage.is_file():
                    record = json.loads(lineage.read_text())
                    entry["parent_checkpoint"] = record.get("init")
                    entry["data_manifests"] = record.get("data_manifests")
                    entry["git_commit"] = record.get("git_commit")
            elif step.kind == "run":
                entry["command"] = step.command
            elif step.kind == "eval":
                entry["models"] = step.models
                entry["results"] = [str(self.step_dir(step) / f"{m}.json") for m in step.models]
            steps.append(entry)
        doc = {"pipeline": self.cfg.name, "git_commit": git_commit(), "steps": steps}
        path = self.root / "lineage.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


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
    from specialize.report import load_results

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
