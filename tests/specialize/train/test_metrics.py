from __future__ import annotations

import itertools
import time

import pytest
import torch

from base.presets import get_preset
from specialize.config import load_config
from specialize.flops import flops_per_token
from specialize.train.metrics import Throughput, device_peak_tflops


@pytest.fixture
def clock(monkeypatch) -> None:
    """``time.perf_counter`` advancing 0.5 s a call."""
    ticks = itertools.count(start=100.0, step=0.5)
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))


def test_throughput_over_the_steps_since_the_last_logged_one(clock) -> None:
    meter = Throughput(interval=2, last_step=5, flops_per_token=1e9, peak_tflops=1.0, world_size=2)
    measured = {step: meter.update(step, 100 * step) for step in range(1, 6)}
    assert measured[1] == measured[3] == {}  # not logged: counted into the next window
    assert measured[2] == {"tokens_per_s": 300 / 0.5, "mfu": 300 / 0.5 / 2 * 1e9 / 1e12}
    assert measured[4]["tokens_per_s"] == 700 / 0.5
    assert measured[5]["tokens_per_s"] == 500 / 0.5  # the last step is always logged
    assert [meter.logs(step) for step in range(1, 6)] == [False, True, False, True, True]


def test_no_mfu_without_a_peak(clock) -> None:
    meter = Throughput(interval=1, last_step=3, flops_per_token=1e9, peak_tflops=None, world_size=1)
    assert meter.update(1, 10).keys() == {"tokens_per_s"}


def test_a_run_measures_model_flops_against_the_configured_peak() -> None:
    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        ["logging.device_peak_tflops=2.5", "model.recompute=full", "data.seq_length=64"],
    )
    meter = Throughput.for_run(cfg, get_preset("qwen-nano"), world_size=2, last_step=7)
    # Recompute repeats work without advancing the model: MFU counts model FLOPs only.
    assert meter.flops_per_token == flops_per_token(get_preset("qwen-nano"), 64).model
    assert (meter.peak_tflops, meter.world_size, meter.last_step) == (2.5, 2, 7)
    assert device_peak_tflops(3.0) == 3.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device may have a known peak")
def test_no_peak_without_a_gpu() -> None:
    assert device_peak_tflops(None) is None
