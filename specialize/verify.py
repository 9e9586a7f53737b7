"""The parity gate: a megatron-core model against transformers' Qwen2 on the same tokens.

Runs both models on fixed token sequences, compares every layer's output and the logits, and fails
with a per-layer report when they differ beyond the tolerance. The reference is always a
``transformers.Qwen2ForCausalLM`` built from the checkpoint's architecture and loaded with its
tensors under Qwen2 names (a Qwen v1 checkpoint is mapped to it), in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from base.hf_checkpoint import qwen2_tensors, read_config
from base.hf_mapping import qwen2_config
from specialize.logits import full_logits

DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.5, "fp8": 1.0}
"""Max |Δ| allowed per layer and on the logits, by the megatron model's precision (the reference is fp32)."""


class ParityError(RuntimeError):
    """The model disagrees with the Hugging Face reference; the message holds the per-layer report."""


def verification_tokens(seq: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 151643, (batch, seq), generator=torch.Generator().manual_seed(20230916))


def _reference(hf_dir: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    info = read_config(hf_dir)
    model = Qwen2ForCausalLM(Qwen2Config(**qwen2_config(info.arch), attn_implementation="eager"))
    weights = {name: t.float() for name, t in qwen2_tensors(info)}
    model.load_state_dict(weights, strict=True)
    return model.float().eval(), info


def _capture(layers) -> tuple[dict[int, torch.Tensor], list]:
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in layers:

        def hook(_module, _args, output, index=index):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach().float()

        handles.append(layer.register_forward_hook(hook))
    return outputs, handles


@torch.no_grad()
def compare(
    model: torch.nn.Module, hf_dir: str, tolerance: float, tokens: torch.Tensor | None = None
) -> list[str]:
    """Per-layer and logits max |Δ| of ``model`` (this rank's stage) against the HF reference.

    Returns the report lines on every rank; raises ParityError (on every rank) past ``tolerance``."""
    tokens = verification_tokens() if tokens is None else tokens
    reference, _ = _reference(hf_dir)
    hf_outputs, hf_handles = _capture(enumerate(reference.model.layers))
    expected = reference(tokens).logits
    for h in hf_handles:
        h.remove()

    module = getattr(model, "module", model)
    layers = [(layer.layer_number - 1, layer) for layer in module.decoder.layers]
    ours, handles = _capture(layers)
    logits = full_logits(model, tokens)
    for h in handles:
        h.remove()
    rows = {}
    # megatron [s, b, h] on the model's device; transformers [b, s, h] on the CPU
    for index, hidden in ours.items():
        rows[index] = (hidden.transpose(0, 1).cpu() - hf_outputs[index]).abs().max().item()
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows)
    per_layer = {k: v for part in gathered for k, v in part.items()}
    vocab = expected.shape[-1]
    logit_diff = (logits[..., :vocab].cpu() - expected).abs().max().item()
    lines = [
        f"layer {i:3d}: max |Δhidden| {per_layer[i]:.3e}"
        + ("  <-- over tolerance" if per_layer[i] > tolerance else "")
        for i in sorted(per_layer)
    ]
    lines.append(f"logits   : max |Δ| {logit_diff:.3e} (tolerance {tolerance:g})")
    if logit_diff > tolerance or any(v > tolerance for v in per_layer.values()):
        first = next((i for i in sorted(per_layer) if per_layer[i] > tolerance), None)
        where = (
            f"first diverging layer {first}" if first is not None else "layers agree, logits do not"
        )
        raise ParityError(f"model differs from {hf_dir} ({where}):\n" + "\n".join(lines))
    return lines
