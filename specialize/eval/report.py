"""Compare evaluation results: a markdown report with the paper's numbers as reference rows, and
PNG charts.

Input files are written by ``specialize eval`` (format ``specialize-eval-1``), one model each. The
report never hides why two scores may not be comparable: tasks run with different protocols or on
different data are flagged, and missing/timeout/error counts are listed next to the scores. The
paper's number for a task stands in the table only when a result measured that task under the
``paper`` protocol (results.json's protocol ``name``: the script behind the number) in the same
mode; otherwise the report says which protocol each result used instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialize.eval.paper_numbers import PAPER_MODELS, SOURCE, paper_protocol
from specialize.eval.tasks import PAPER, ROBUST

FORMAT = "specialize-eval-1"
COUNT_FIELDS = ("total", "correct", "missing", "failed", "timeout", "error")
PROTOCOL_FIELDS = (
    "name",
    "mode",
    "shots",
    "stop",
    "max_new_tokens",
    "max_length",
    "repetition_penalty",
    "grader",
    "timeout",
    "reference",
)
DATA_FIELDS = ("source", "sha256", "records")
LOSSES = {"missing": "missing", "timeout": "timed out", "error": "errors"}
FAMILY_TITLES = {
    "code": "Code (pass@1, %)",
    "math": "Math (accuracy, %)",
    "perplexity": "Perplexity (lower is better)",
    "other": "Other",
}


class ReportError(ValueError):
    """A results file that cannot be compared (missing, unknown format, no tasks, ...)."""


@dataclass(frozen=True)
class Results:
    """One results file: a model's scores on a set of tasks."""

    path: Path
    label: str
    """Display name; the file name is appended when two files share a label."""
    checkpoint: str | None
    source: str
    tasks: dict[str, dict[str, Any]]
    """Task name -> the file's task entry (protocol, data, metrics, counts)."""
    machine: dict[str, Any] | None = None
    """Where the completions were generated (None: scored from completions made elsewhere)."""


def load_results(path: str | os.PathLike[str]) -> Results:
    """Read and check one results file; raises ReportError with the path on any problem."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ReportError(f"{path}: unknown format {found!r} (expected {FORMAT!r})")
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("label"), str):
        raise ReportError(f"{path}: model.label missing")
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ReportError(f"{path}: no tasks")
    for name, task in tasks.items():
        if not isinstance(task, dict) or not isinstance(task.get("metrics"), dict):
            raise ReportError(f"{path}: task {name!r} has no metrics")
        if not task["metrics"]:
            raise ReportError(f"{path}: task {name!r} has no metrics")
    return Results(
        path=path,
        label=model["label"],
        checkpoint=model.get("checkpoint"),
        source=str(model.get("source", "")),
        tasks=tasks,
        machine=doc.get("machine"),
    )


def main_metric(metrics: dict[str, Any]) -> str:
    """The metric a task is ranked by: pass@1 (code), else accuracy (math), else perplexity,
    else the first."""
    for name in ("pass@1", "accuracy", "perplexity"):
        if name in metrics:
            return name
    return next(iter(metrics))


def is_fraction(metric: str) -> bool:
    """pass@k and accuracy are fractions, shown in percent; anything else is shown as it is."""
    return metric.startswith("pass@") or metric == "accuracy"


def family(metric: str) -> str:
    """Chart family of a metric: pass@k scores code, accuracy scores math."""
    if metric.startswith("pass@"):
        return "code"
    if metric.startswith("perplexity"):
        return "perplexity"
    return "math" if metric == "accuracy" else "other"


@dataclass(frozen=True)
class Column:
    """One score column: a task and the metric shown for it."""

    task: str
    metric: str

    @property
    def header(self) -> str:
        return self.task if self.metric == self.task else f"{self.task} {self.metric}"


def columns(results: list[Results]) -> list[Column]:
    """Task columns in first-seen order, each with the main metric of its first result."""
    seen: dict[str, Column] = {}
    for result in results:
        for task, entry in result.tasks.items():
            if task not in seen:
                seen[task] = Column(task, main_metric(entry["metrics"]))
    return list(seen.values())


def score(result: Results, column: Column) -> float | None:
    """The result's score for a column (fractions in percent), None if the task or metric is
    absent."""
    entry = result.tasks.get(column.task)
    value = None if entry is None else entry["metrics"].get(column.metric)
    if value is None:
        return None
    return 100.0 * float(value) if is_fraction(column.metric) else float(value)


def protocol_name(entry: dict[str, Any]) -> str | None:
    """The protocol a task entry was measured under; files from before protocols had names
    were ``robust``. None for a task that has one computation only (perplexity)."""
    protocol = entry.get("protocol") or {}
    if protocol.get("name"):
        return str(protocol["name"])
    return None if protocol.get("grader") == "perplexity" else ROBUST


def _value(entry: dict[str, Any], section: str, field: str) -> Any:
    if (section, field) == ("protocol", "name"):
        return protocol_name(entry)
    return (entry.get(section) or {}).get(field)


def paper_runs(results: list[Results], task: str, mode: str) -> list[Results]:
    """The results that measured ``task`` under the ``paper`` protocol in ``mode``: the ones the
    paper's numbers for it can stand beside."""
    return [
        r
        for r in results
        if task in r.tasks
        and protocol_name(r.tasks[task]) == PAPER
        and _value(r.tasks[task], "protocol", "mode") == mode
    ]


def differences(results: list[Results], task: str) -> list[str]:
    """Human-readable protocol/data differences between the results that ran ``task``."""
    runs = [r for r in results if task in r.tasks]
    found = []
    for section, fields in (("protocol", PROTOCOL_FIELDS), ("data", DATA_FIELDS)):
        for field in fields:
            values = [_value(r.tasks[task], section, field) for r in runs]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"{r.label}={_plain(v)}" for r, v in zip(runs, values))
                found.append(f"{section} {field}: {shown}")
    return found


def machine_differences(results: list[Results]) -> list[str]:
    """``label=machine`` for each result when the results' generating machines differ in what
    decides CPU numerics (processor, torch's kernel set, pinned kernel variables)."""
    keyed = {}
    for r in results:
        if r.machine:
            m = r.machine
            pins = ",".join(
                f"{k}={v}" for k, v in sorted((m.get("kernel_variables") or {}).items())
            )
            keyed[r.label] = f"{m.get('cpu')} {m.get('torch_cpu_capability')}" + (
                f" {pins}" if pins else ""
            )
    if len(set(keyed.values())) < 2:
        return []
    return [f"{label}={key}" for label, key in keyed.items()]


def _unique_labels(results: list[Results]) -> list[Results]:
    labels = [r.label for r in results]
    return [
        r if labels.count(r.label) == 1 else _relabel(r, f"{r.label} ({r.path.name})")
        for r in results
    ]


def _relabel(result: Results, label: str) -> Results:
    return dataclasses.replace(result, label=label)


def _plain(value: Any) -> str:
    """A protocol value as text; lists (stop sequences) as JSON so '\\n' shows as an escape."""
    if isinstance(value, list):
        return "`" + json.dumps(value, ensure_ascii=False) + "`"
    return "—" if value is None else str(value)


def _cell(text: Any) -> str:
    """Table cell text: a bare '|' would end the cell."""
    return str(text).replace("|", "\\|")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(
    results: list[Results],
    base: Results,
    charts: list[tuple[str, str]] | None = None,
    paper: bool = True,
) -> str:
    """The report text. ``charts``: (title, relative file name) pairs to link. ``paper``: add the
    paper's numbers as reference rows (off when the tasks ran on other data, e.g. generated
    problems in a benchmark's schema)."""
    cols = columns(results)
    mismatched = {c.task: differences(results, c.task) for c in cols}
    out = ["# Evaluation report", ""]
    out += [f"Base for the deltas: **{base.label}**. Results files:", ""]
    for r in results:
        checkpoint = f", checkpoint `{r.checkpoint}`" if r.checkpoint else ""
        out.append(f"- **{r.label}**: `{r.path}` ({r.source}{checkpoint})")

    out += ["", "## Scores", ""]
    intro = (
        "The main metric per task: pass@1 for code and accuracy for math in percent, perplexity "
        "as it is (lower is better)."
    )
    if paper:
        intro += (
            " Rows marked *reported by the paper* are the Qwen technical report's numbers under "
            "its own protocols (see *Paper protocols*): references, not runs of this project. A "
            "number is shown only for a task some result here measured under the `paper` "
            "protocol (the script behind it) in the same mode."
        )
    out.append(intro)
    out.append("")
    rows = [[r.label, "this project", *(_pct(score(r, c)) for c in cols)] for r in results]
    shown: set[tuple[str, str]] = set()  # (task, mode) whose paper numbers are in the table
    withheld: dict[tuple[str, str], list[str]] = {}  # the same, left out: paper models
    for model in PAPER_MODELS if paper else ():
        cells = []
        for c in cols:
            number = model.scores.get(c.task)
            if number is not None and not paper_runs(results, c.task, model.mode):
                withheld.setdefault((c.task, model.mode), []).append(model.name)
                number = None
            elif number is not None:
                shown.add((c.task, model.mode))
            cells.append(_pct(number))
        if any(cell != "—" for cell in cells):
            rows.append([f"{model.name} *(reported by the paper)*", f"paper, {model.mode}", *cells])
    out += _table(["model", "source", *(c.header for c in cols)], rows)
    if withheld:
        out += [
            "",
            "Paper numbers left out, because no result here measured the task under the `paper` "
            "protocol in that mode (rerun with `specialize eval --protocol paper --mode MODE`):",
            "",
        ]
        for (task, mode), models in withheld.items():
            measured = "; ".join(
                f"{r.label} under `{protocol_name(r.tasks[task])}` "
                f"({_value(r.tasks[task], 'protocol', 'mode')})"
                for r in results
                if task in r.tasks
            )
            out.append(f"- **{task}**, {mode} ({', '.join(models)}): measured by {measured}.")

    out += ["", f"## Change vs {base.label}", ""]
    others = [r for r in results if r is not base]
    if others:
        out.append(
            "Percentage points (perplexity: its difference, negative is better). † protocol or "
            "data differ between the results of that task:"
        )
        out.append("the two scores are not comparable (see *Warnings*).")
        out.append("")
        rows = []
        for r in others:
            row = [r.label]
            for c in cols:
                mine, theirs = score(r, c), score(base, c)
                if mine is None or theirs is None:
                    row.append("—")
                else:
                    mark = " †" if differences([base, r], c.task) else ""
                    row.append(f"{mine - theirs:+.1f}{mark}")
            rows.append(row)
        out += _table(["model", *(c.header for c in cols)], rows)
    else:
        out.append("Only one results file: nothing to compare.")

    out += ["", "## Warnings", ""]
    warnings = []
    for c in cols:
        if mismatched[c.task]:
            warnings.append(
                f"- **{c.task}**: scores are NOT comparable — "
                + "; ".join(mismatched[c.task])
                + "."
            )
    for r in results:
        for task, entry in r.tasks.items():
            counts = entry.get("counts", {})
            lost = [f"{counts[k]} {word}" for k, word in LOSSES.items() if counts.get(k)]
            if lost:
                warnings.append(
                    f"- **{task}** / {r.label}: {', '.join(lost)} of {counts.get('total', '?')} "
                    "(scored as failures)."
                )
    machines = machine_differences(results)
    if machines:
        warnings.append(
            f"- Generated on different CPU kernels ({'; '.join(machines)}): scores may differ "
            "from a run on one machine in the last digits, not in kind."
        )
    out += warnings or ["None: every task ran with the same protocol and data in all results."]

    if charts:
        out += ["", "## Charts", ""]
        for title, name in charts:
            out += [f"![{title}]({name})", ""]
        out.pop()

    out += ["", "## Counts", ""]
    for c in cols:
        runs = [r for r in results if c.task in r.tasks]
        rows = [
            [r.label, *(str(r.tasks[c.task].get("counts", {}).get(k, "—")) for k in COUNT_FIELDS)]
            for r in runs
        ]
        out += [f"### {c.task}", "", *_table(["model", *COUNT_FIELDS], rows), ""]
    out.pop()

    out += ["", "## Protocols", ""]
    for c in cols:
        rows = []
        for r in (r for r in results if c.task in r.tasks):
            data = r.tasks[c.task].get("data", {})
            rows.append(
                [
                    r.label,
                    *(_plain(_value(r.tasks[c.task], "protocol", f)) for f in PROTOCOL_FIELDS),
                    _plain(data.get("source")),
                    f"`{data.get('sha256', '—')}`",
                    _plain(data.get("records")),
                ]
            )
        header = [
            "model",
            "protocol",
            "mode",
            "shots",
            "stop",
            "max new tokens",
            "max length",
            "repetition penalty",
            "grader",
            "timeout (s)",
            "reference",
        ]
        out += [f"### {c.task}", "", *_table([*header, "data", "sha256", "records"], rows), ""]
    out.pop()

    if not paper:
        return "\n".join(out) + "\n"
    out += ["", "## Paper protocols", "", f"Source: {SOURCE}.", ""]
    rows = []
    for c in cols:
        for mode in ("base", "chat"):
            text = paper_protocol(c.task, mode)
            if text and (c.task, mode) in shown:
                rows.append([c.task, mode, text])
    out += _table(["task", "mode", "protocol"], rows) if rows else ["No paper numbers apply."]
    return "\n".join(out) + "\n"


def write_charts(results: list[Results], out_dir: Path) -> list[tuple[str, str]]:
    """One grouped bar chart per metric family (tasks on x, one bar per model); returns
    (title, file name) pairs."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    by_family: dict[str, list[Column]] = {}
    for c in columns(results):
        by_family.setdefault(family(c.metric), []).append(c)
    charts = []
    for fam, cols in by_family.items():
        # Only models that ran a task of this family get a bar group slot.
        runs = [r for r in results if any(c.task in r.tasks for c in cols)]
        fig = Figure(figsize=(max(4.0, 1.6 * len(cols) + 2.0), 3.6), layout="constrained")
        ax = fig.add_subplot()
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(cols))]
            values = [score(r, c) for c in cols]
            bars = ax.bar(xs, [v or 0.0 for v in values], width, label=r.label)
            ax.bar_label(bars, labels=["" if v is None else _pct(v) for v in values], fontsize=7)
        ax.set_xticks(range(len(cols)), [c.task for c in cols])
        if fam in ("code", "math"):
            ax.set_ylabel("%")
            ax.set_ylim(0, 105)
        else:
            ax.set_ylabel(cols[0].metric if len(cols) == 1 else "value")
            if fam == "perplexity":
                ax.set_yscale("log")  # perplexities of different models span orders of magnitude
        ax.set_title(FAMILY_TITLES[fam])
        ax.legend(fontsize=8)
        name = f"chart-{fam}.png"
        fig.savefig(out_dir / name, dpi=100)
        charts.append((FAMILY_TITLES[fam], name))
    return charts


def compare(
    paths: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    base: str | None = None,
    paper: bool = True,
) -> Path:
    """Write ``out_dir/report.md`` and its charts for the results files; returns the report path.
    ``base``: label of the model the deltas are taken against (default: the first file).
    ``paper``: the paper's numbers as reference rows."""
    if not paths:
        raise ReportError("no results files given")
    results = _unique_labels([load_results(p) for p in paths])
    if base is None:
        base_result = results[0]
    else:
        matches = [r for r in results if r.label == base]
        if not matches:
            known = ", ".join(r.label for r in results)
            raise ReportError(f"--base {base!r}: no results file has that label ({known})")
        base_result = matches[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(results, out)
    report = out / "report.md"
    report.write_text(render_markdown(results, base_result, charts, paper), encoding="utf-8")
    return report
