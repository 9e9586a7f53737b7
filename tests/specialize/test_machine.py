"""The machine record: what decides CPU numbers, and a speed a run's duration scales with."""

import json

import torch

from specialize import machine


def test_describe_names_the_kernel_set_and_the_variables_that_pin_it(monkeypatch):
    for name in machine.KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    record = machine.describe()
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["kernel_variables"] == {"MKL_CBWR": "AVX2"}
    assert "MKL_CBWR=AVX2" in machine.summary(record)


def test_measure_speed_is_positive_and_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    speed = machine.measure_speed(seconds=0.05)
    assert speed["matmul_gflops_1thread"] > 0
    assert speed["tokenizer_tokens_per_s"] > 0
    assert torch.get_num_threads() == threads
    line = machine.summary({**machine.describe(), **speed})
    assert "GFLOP/s" in line and "tokens/s" in line


def test_command_line_writes_the_record(tmp_path, capsys):
    machine.main(["--seconds", "0.05", "-o", str(tmp_path / "m" / "machine.json")])
    record = json.loads((tmp_path / "m" / "machine.json").read_text())
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine.summary(record) in capsys.readouterr().out
