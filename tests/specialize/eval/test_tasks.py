"""The task registry, plugin discovery and the shared record loader (no domain package named)."""

import ast
import gzip
import importlib.metadata
import json
import re
from pathlib import Path

import datasets
import pytest

import specialize
from specialize import plugins
from specialize.eval.tasks import (
    MODES,
    HubSource,
    Protocol,
    Task,
    TaskError,
    TaskRegistry,
    check_mode,
    get_task,
    load_records,
    register,
    task_names,
    truncate,
)

DOMAIN_TASKS = {"humaneval", "mbpp", "gsm8k", "math", "math401", "math23k"}
RECORDS = [{"q": "What is 2 + 2?", "a": "4", "id": 1}, {"q": "Name a prime.", "a": "7", "id": 2}]


def toy_task(**overrides) -> Task:
    fields = dict(
        name="toy",
        domain="test",
        description="two questions",
        required_fields=("q", "a"),
        reference_fields=("q", "a"),
    )
    return Task(**{**fields, **overrides})


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- local files ----


def test_all_file_formats_give_the_same_records(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [lines[0], "", "   ", lines[1]])  # blanks skipped
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(RECORDS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": RECORDS, "version": "1"}))

    for path in (jsonl, gz, as_list, wrapped):
        assert load_records(toy_task(), path) == RECORDS, path
    assert toy_task().load(str(jsonl)) == RECORDS


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), "", '{"q": "x", "a": '])
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:3: invalid JSON"):
        load_records(toy_task(), path)


def test_invalid_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"q": "x", "a": "y"},\n{"q": }\n]')
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:3: invalid JSON"):
        load_records(toy_task(), path)


def test_missing_field_names_field_and_location(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), json.dumps({"q": "only q"})])
    with pytest.raises(
        TaskError, match=rf"{re.escape(str(path))}:2: toy record is missing field 'a'"
    ):
        load_records(toy_task(), path)
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps([RECORDS[0], {"a": "1"}]))
    with pytest.raises(
        TaskError, match=rf"{re.escape(str(as_list))}\[1\]: toy record is missing field 'q'"
    ):
        load_records(toy_task(), as_list)


@pytest.mark.parametrize(
    "line, message",
    [("[1, 2]", "expected a JSON object"), ('{"q": 3, "a": "4"}', "field 'q' must be a string")],
)
def test_records_of_the_wrong_shape_are_rejected(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [line])
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}:1: .*{message}"):
        load_records(toy_task(), path)


def test_unusable_files_are_reported(tmp_path):
    with pytest.raises(TaskError, match="unsupported data file type.*jsonl.gz"):
        load_records(toy_task(), tmp_path / "d.csv")
    with pytest.raises(TaskError, match=r"task 'toy': cannot read .*missing.jsonl"):
        load_records(toy_task(), tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match=r"no records in .*empty.jsonl"):
        load_records(toy_task(), write_jsonl(tmp_path / "empty.jsonl", [""]))
    not_gzip = write_jsonl(tmp_path / "plain.jsonl.gz", [json.dumps(RECORDS[0])])
    with pytest.raises(TaskError, match=r"cannot read .*plain.jsonl.gz"):
        load_records(toy_task(), not_gzip)
    wrong_top = tmp_path / "d.json"
    wrong_top.write_text('{"rows": []}')
    with pytest.raises(TaskError, match="expected a JSON list of records"):
        load_records(toy_task(), wrong_top)


# ---- the hub ----

HUB = HubSource("org/toy", config="main", split="test")


def test_without_a_path_records_come_from_the_hub(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return RECORDS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records(toy_task(hub=HUB)) == RECORDS
    assert calls == [("org/toy", "main", "test")]


def test_hub_records_are_validated(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [RECORDS[0], {"q": "?"}])
    with pytest.raises(TaskError, match=r"hub dataset 'org/toy' .* record 1: .*missing field 'a'"):
        load_records(toy_task(hub=HUB))


def test_unreachable_hub_says_which_task_and_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/toy' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError) as raised:
        toy_task(hub=HUB).load()
    message = str(raised.value)
    assert "task 'toy'" in message
    assert "'org/toy'" in message and "'main'" in message and "'test'" in message
    assert "--data toy=PATH" in message
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_no_path_and_no_hub_asks_for_a_local_file(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)  # must not be consulted
    with pytest.raises(TaskError, match=r"task 'toy' has no default data source.*--data toy=PATH"):
        toy_task().load()


# ---- Task ----


def test_reference_texts_are_the_reference_fields_of_every_record():
    records = [*RECORDS, {"q": "Blank answer?", "a": "  "}]
    assert toy_task().reference_texts(records) == [
        "What is 2 + 2?",
        "4",
        "Name a prime.",
        "7",
        "Blank answer?",
    ]
    assert toy_task(reference_fields=("q",)).reference_texts(RECORDS) == [r["q"] for r in RECORDS]


def test_task_definitions_are_checked():
    with pytest.raises(TaskError, match="task name"):
        toy_task(name="a,b")
    with pytest.raises(TaskError, match="task name"):
        toy_task(name="Toy")
    with pytest.raises(TaskError, match=r"reference_fields \['c'\] must also be required_fields"):
        toy_task(reference_fields=("q", "c"))
    with pytest.raises(TaskError, match="domain"):
        toy_task(domain="")


# ---- registry ----


def test_registry_rejects_duplicates_and_lists_known_names_for_unknown_ones():
    registry = TaskRegistry()
    task = toy_task()
    assert registry.register(task) is task
    registry.register(toy_task(name="abc"))
    assert registry.names() == ["abc", "toy"]
    assert registry.get("toy") is task
    with pytest.raises(TaskError, match="task 'toy' is already registered"):
        registry.register(toy_task(description="another"))
    assert registry.get("toy") is task
    with pytest.raises(TaskError, match=r"unknown task 'nope'; known tasks: abc, toy"):
        registry.get("nope")
    with pytest.raises(TaskError, match="known tasks: none"):
        TaskRegistry().get("toy")
    with pytest.raises(TypeError):
        registry.register("toy")


def test_plugins_register_all_domain_tasks():
    names = {ep.name for ep in plugins.plugin_entry_points()}
    assert {"code_qwen", "math_qwen"} <= names
    loaded = plugins.load_plugins()
    assert {"code_qwen", "math_qwen"} <= set(loaded)
    assert plugins.load_plugins() == loaded  # idempotent: no re-registration error
    assert DOMAIN_TASKS <= set(task_names())
    assert task_names() == sorted(task_names())
    for name in DOMAIN_TASKS:
        assert get_task(name).name == name
        assert get_task(name).domain in ("code", "math")


def test_global_registry_errors():
    with pytest.raises(
        TaskError, match=r"unknown task 'humaneval-x'; known tasks: .*gsm8k, humaneval, .*math"
    ):
        get_task("humaneval-x")
    with pytest.raises(TaskError, match="task 'gsm8k' is already registered"):
        register(toy_task(name="gsm8k"))


def test_a_broken_plugin_is_an_error_naming_it(monkeypatch):
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", plugins.GROUP)
    monkeypatch.setattr(plugins, "plugin_entry_points", lambda: [broken])
    with pytest.raises(plugins.PluginError, match=r"plugin 'broken' \(no_such_module_xyz"):
        plugins.load_plugins()


def test_the_engine_never_imports_a_domain_package():
    domain = {"code_qwen", "math_qwen"}
    root = Path(specialize.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            offenders += [f"{path}:{node.lineno}" for m in modules if m.split(".")[0] in domain]
    assert offenders == []


# ---- evaluation protocol hooks ----


def test_a_task_without_a_protocol_says_so():
    task = toy_task()
    for call in (
        lambda: task.protocol("base"),
        lambda: task.prompt(RECORDS[0], "base"),
        lambda: task.grade(RECORDS, ["4", "7"], "base"),
    ):
        with pytest.raises(TaskError, match="task 'toy' has no"):
            call()
    assert [task.record_id(r, i) for i, r in enumerate(RECORDS)] == ["0", "1"]
    assert toy_task(id_field="id").record_id(RECORDS[1], 1) == "2"


def test_default_metric_is_accuracy_with_missing_records_wrong():
    metrics = toy_task().metrics([[True], [False, True], []])
    assert metrics == {"accuracy": pytest.approx((1 + 0.5 + 0) / 3)}
    with pytest.raises(TaskError, match="nothing to score"):
        toy_task().metrics([])


def test_truncate_cuts_at_the_earliest_stop_and_modes_are_checked():
    assert truncate("a\n\nb Question: c", ("Question:", "\n\n")) == "a"
    assert truncate("no stop here", ("\n\n",)) == "no stop here"
    assert [check_mode(m) for m in MODES] == ["base", "chat"]
    with pytest.raises(TaskError, match="evaluation mode 'few-shot': expected one of base, chat"):
        check_mode("few-shot")
    protocol = Protocol("base", 3, ("[DONE]",), 512, "sandbox", 3.0)
    assert protocol.to_dict() == {
        "mode": "base",
        "shots": 3,
        "stop": ["[DONE]"],
        "max_new_tokens": 512,
        "grader": "sandbox",
        "timeout": 3.0,
        "name": "robust",
        "reference": None,
        "max_length": None,
        "repetition_penalty": 1.0,
    }


def test_a_task_is_evaluated_under_the_protocols_it_implements_only():
    task = get_task("gsm8k")
    assert task.protocol_name == "robust" and task.under("robust") == task
    with pytest.raises(TaskError, match=r"^protocol 'lenient': must be one of robust, paper$"):
        task.under("lenient")
    if "paper" not in task.protocols:
        with pytest.raises(TaskError, match=r"^task 'gsm8k' has no 'paper' protocol \(it has: "):
            task.under("paper")
    else:
        assert task.under("paper").protocol_name == "paper"


def test_every_domain_task_has_a_protocol_in_both_modes():
    for name in DOMAIN_TASKS:
        for mode in MODES:
            protocol = get_task(name).protocol(mode)
            assert protocol.mode == mode and protocol.stop and protocol.max_new_tokens > 0
            assert protocol.shots == 0 or mode == "base"
