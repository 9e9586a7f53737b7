"""Throughput and MFU of a training run, measured once by the trainer for every logger.

A logged step is every ``logging.interval``-th and the run's last. On it the trainer puts the
tokens/s of the steps since the previous logged one (and the MFU, when the device's peak is known)
into ``Trainer.metrics``; the console line and TensorBoard read them there.
"""

from __future__ import annotations

import time

import torch

from base.presets import QwenPreset
from specialize.config import RecipeConfig
from specialize.flops import flops_per_token, peak_tflops


def device_peak_tflops(configured: float | None) -> float | None:
    """``logging.device_peak_tflops``, else the known peak of this process's GPU."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name())


class Throughput:
    """Tokens/s over the steps since the last logged one, and MFU against ``peak_tflops``."""

    def __init__(
        self,
        interval: int,
        last_step: int,
        flops_per_token: float,
        peak_tflops: float | None,
        world_size: int,
    ) -> None:
        self.interval, self.last_step = interval, last_step
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self._tokens = 0
        self._since = time.perf_counter()

    @classmethod
    def for_run(
        cls, cfg: RecipeConfig, preset: QwenPreset, world_size: int, last_step: int
    ) -> Throughput:
        # Model FLOPs: recompute is work the GPU repeats, not progress of the model.
        flops = flops_per_token(preset, cfg.data.seq_length).model
        peak = device_peak_tflops(cfg.logging.device_peak_tflops)
        return cls(cfg.logging.interval, last_step, flops, peak, world_size)

    def logs(self, step: int) -> bool:
        """Whether ``step`` is a logged step."""
        return step % self.interval == 0 or step == self.last_step

    def update(self, step: int, num_tokens: int) -> dict[str, float]:
        """Count a step's tokens; on a logged step, its window's ``tokens_per_s`` (and ``mfu``)."""
        self._tokens += num_tokens
        if not self.logs(step):
            return {}
        now = time.perf_counter()
        tokens_per_s = self._tokens / max(now - self._since, 1e-9)
        self._since, self._tokens = now, 0
        metrics = {"tokens_per_s": tokens_per_s}
        if self.peak_tflops:
            per_device = tokens_per_s / self.world_size
            metrics["mfu"] = per_device * self.flops_per_token / (self.peak_tflops * 1e12)
        return metrics
