"""Model FLOPs per token and GPU peaks: the two sides of MFU, for the training console (measured
MFU), ``specialize plan`` (step time at an assumed MFU) and ``specialize gpu-check``.

FLOPs per token (``N`` parameters, ``L`` layers, ``h`` hidden size, ``s`` sequence length): the
model FLOPs are ``6·N + 6·L·h·s``, forward and backward over every parameter plus the attention
scores and values (``12·L·h·s`` halved for the causal mask). Recompute executes more without
changing the model FLOPs: selective recompute repeats the attention forward, ``2·L·h·s``; full
recompute a whole forward of the layers, ``2·N_layers + 2·L·h·s``.
"""

from __future__ import annotations

from typing import NamedTuple

from base.presets import QwenPreset

# Dense peak TFLOP/s (vendor datasheets, SXM parts), by a substring of the device name.
PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
"""BF16: the MFU denominator."""
FP8_PEAK_TFLOPS: dict[str, float] = {"H100": 1979.0, "H200": 1979.0}
"""FP8; A100 has no FP8 tensor cores (B200's is not listed: no plan is made for it)."""
TF32_PEAK_TFLOPS: dict[str, float] = {"H100": 494.5, "H200": 494.5, "A100": 156.0}
"""TF32, the peak of fp32 recipes."""


def peak_tflops(device_name: str) -> float | None:
    """The dense BF16 peak of a device named like ``NVIDIA H100 80GB HBM3``; None when unknown."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name.upper()), None)


class FlopsPerToken(NamedTuple):
    executed: float
    """What the GPU computes: the model FLOPs plus what recompute repeats."""
    model: float
    """``6·N + 6·L·h·s``, the MFU numerator."""
    gemm: float
    """The part of ``executed`` in GEMMs (all but the attention scores and values)."""


def flops_per_token(preset: QwenPreset, seq_len: int, recompute: str = "none") -> FlopsPerToken:
    """Training FLOPs per token of ``preset`` at ``seq_len`` with ``recompute`` (module docstring)."""
    n = preset.num_params()
    lhs = preset.num_layers * preset.hidden_size * seq_len
    model = 6 * n + 6 * lhs
    extra = 0.0
    if recompute == "selective":
        extra = 2 * lhs
    elif recompute == "full":
        layer_params = n - 2 * preset.padded_vocab_size * preset.hidden_size - preset.hidden_size
        extra = 2 * layer_params + 2 * lhs
    executed = model + extra
    attention = 6 * lhs + (2 * lhs if recompute != "none" else 0)  # scores and values, not GEMMs
    return FlopsPerToken(executed, model, executed - attention)
