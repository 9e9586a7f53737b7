from __future__ import annotations

import itertools
import logging
import time
from types import SimpleNamespace

import pytest

from base.presets import get_preset
from specialize.config import load_config
from specialize.train.callbacks import ConsoleLogger, TensorBoardLogger
from specialize.train.engine import StepResult
from specialize.train.metrics import Throughput

RESULTS = {
    s: StepResult(loss=10 / s, grad_norm=1.5 * s, lr=1e-4 * s, num_tokens=128 * s)
    for s in range(1, 6)
}


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None: ...


@pytest.fixture
def trainer(monkeypatch) -> SimpleNamespace:
    """Five steps at 0.5 s each, logged every 2 steps, as ``Trainer.fit`` drives the callbacks."""
    ticks = itertools.count(start=100.0, step=0.5)
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    overrides = ["logging.progress=false", "logging.interval=2", "logging.device_peak_tflops=0.001"]
    cfg = load_config("configs/base/qwen-nano.yaml", [*overrides, "data.seq_length=64"])
    return SimpleNamespace(
        cfg=cfg,
        derived=SimpleNamespace(steps=5),
        start_step=0,
        is_rank0=True,
        metrics={},
        throughput=Throughput.for_run(cfg, get_preset("qwen-nano"), world_size=2, last_step=5),
    )


def _run(trainer: SimpleNamespace, callbacks: list) -> None:
    for step, result in RESULTS.items():
        trainer.metrics.update(trainer.throughput.update(step, result.num_tokens))
        for cb in callbacks:
            cb.on_step_end(trainer, step, result)
    for cb in callbacks:
        cb.on_validation(trainer, 5, 2.0)


def test_console_lines_on_logged_steps(trainer, caplog) -> None:
    logger = ConsoleLogger()
    logger.on_train_start(trainer)
    with caplog.at_level(logging.INFO, logger="specialize"):
        _run(trainer, [logger])  # alone: it needs no other callback
    assert caplog.messages == [
        "step 2/5 | loss 5.0000 | lr 2.000e-04 | grad norm 3.000 | 768 tok/s | MFU 2247.5%",
        "step 4/5 | loss 2.5000 | lr 4.000e-04 | grad norm 6.000 | 1,792 tok/s | MFU 5244.3%",
        "step 5/5 | loss 2.0000 | lr 5.000e-04 | grad norm 7.500 | 1,280 tok/s | MFU 3745.9%",
        "step 5 | validation loss 2.0000 | perplexity 7.39",
    ]


def test_tensorboard_scalars_without_the_console(trainer, tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.writer = writer = Writer()  # rank 0's SummaryWriter, recorded
    _run(trainer, [logger])  # alone: the throughput comes from the trainer's metrics
    scalars = {(tag, step): value for tag, value, step in writer.scalars}
    assert len(scalars) == len(writer.scalars) == 5 * 3 + 4 * 2 + 1
    assert [scalars[("train/loss", s)] for s in RESULTS] == [10 / s for s in RESULTS]
    assert scalars[("train/lr", 3)] == 1e-4 * 3 and scalars[("train/grad_norm", 5)] == 7.5
    # From the first logged step on, every step writes the latest logged step's throughput.
    throughput = {k: v for k, v in scalars.items() if k[0].startswith("throughput/")}
    assert throughput == {
        **{("throughput/tokens_per_s", s): v for s, v in ((2, 768.0), (3, 768.0), (4, 1792.0))},
        ("throughput/tokens_per_s", 5): 1280.0,
        ("throughput/mfu", 2): pytest.approx(22.475464704),
        ("throughput/mfu", 3): pytest.approx(22.475464704),
        ("throughput/mfu", 4): pytest.approx(52.442750976),
        ("throughput/mfu", 5): pytest.approx(37.45910784),
    }
    assert scalars[("validation/loss", 5)] == 2.0
