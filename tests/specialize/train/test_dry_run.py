"""What ``--dry-run`` prints: the LR curve comes from the run's own scheduler."""

from __future__ import annotations

import math

import pytest

from specialize.config import derive, load_config
from specialize.train.dry_run import lr_curve


def test_cosine_warmup_follows_a_half_cosine_then_the_decay():
    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "train.steps=20",
            "schedule.warmup_steps=8",
            "schedule.warmup_shape=cosine",
            "schedule.decay=constant",
            "optimizer.lr=1e-3",
            "optimizer.min_lr=1e-3",
        ],
    )
    curve = dict(lr_curve(cfg, derive(cfg, 1), list(range(1, 21))))
    for step in range(1, 9):  # the LR logged at step s is the one step s + 1 uses
        expected = 1e-3 * 0.5 * (1 - math.cos(math.pi * step / 8))
        assert curve[step] == pytest.approx(expected, rel=1e-9), step
    assert curve[3] < 1e-3 * 3 / 8  # below the linear ramp early on
    assert all(curve[step] == pytest.approx(1e-3) for step in range(8, 21))
