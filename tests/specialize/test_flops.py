from __future__ import annotations

import pytest

from base.presets import get_preset
from specialize.flops import FP8_PEAK_TFLOPS, PEAK_TFLOPS, flops_per_token, peak_tflops
from specialize.plan import GPUS


def test_flops_per_token_by_recompute() -> None:
    p = get_preset("qwen-nano")  # h=32, L=2, V=151936
    n, lhs = p.num_params(), 2 * 32 * 1024
    layers = n - 2 * 151936 * 32 - 32  # the layers' parameters: no embedding, output, final norm
    none = flops_per_token(p, 1024)
    assert none.model == 6 * n + 6 * lhs and none.executed == none.model
    assert none.gemm == none.executed - 6 * lhs
    selective = flops_per_token(p, 1024, "selective")
    assert selective.model == none.model and selective.executed == none.model + 2 * lhs
    assert selective.gemm == none.gemm  # the repeated attention forward is no GEMM
    full = flops_per_token(p, 1024, "full")
    assert full.executed == none.model + 2 * layers + 2 * lhs
    assert full.gemm == none.gemm + 2 * layers


def test_peaks_by_device_name() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_plan_gpus_take_their_peaks_from_the_table() -> None:
    for spec in GPUS.values():
        assert spec.bf16_tflops == PEAK_TFLOPS[spec.name]
        assert spec.fp8_tflops == FP8_PEAK_TFLOPS.get(spec.name)
    assert GPUS["a100"].fp8_tflops is None and GPUS["h100"].tf32_tflops == pytest.approx(494.5)
