"""The parity gate: a megatron-core model against transformers' Qwen2 on the same tokens.

Runs both models on fixed token sequences, compares every layer's output and the logits, and fails
with a per-layer report when they differ beyond the tolerance. The reference is always a
``transformers.Qwen2ForCausalLM`` built from the checkpoint's architecture and loaded with its
tensors under Qwen2 names (a Qwen v1 checkpoint is mapped to it), in fp32.

Memory. The fp32 reference is 4 bytes a parameter on the host (about 31 GB for 7B), so only
global rank 0 builds it: its node holds one copy and every other node none, whatever the number of
ranks. Its tensors are streamed one at a time into a model allocated without initialization, so
loading never holds a second copy as a state dict. Rank 0 runs it on the verification tokens, frees
it, and broadcasts its layer outputs (layers x tokens x hidden, about 50 MB for 7B) on the model's
device. Each rank compares the layers of its own pipeline stage; the logits are compared on rank 0
only (every rank has the model's full logits from ``full_logits``, only rank 0 the reference's), and
one MAX all-reduce gives every rank the whole report. Streaming the reference layer by layer would
hold less still, but only by re-running transformers' decoder outside its own forward, which is the
very code the gate checks against.

Sequence parallelism. A megatron layer's output is then this rank's ``[s/TP, b, h]`` slice of the
sequence; the slices are all-gathered over the tensor-parallel group (megatron-core's
``gather_from_sequence_parallel_region``) into ``[s, b, h]`` before they are compared.

Every tensor the gate makes, and every tensor given to a collective, is on the model's device (the
reference alone runs on the host, where its memory is).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from base.hf_checkpoint import HFCheckpointError, qwen2_tensors, read_config
from base.hf_mapping import qwen2_config
from base.tokenizer import NUM_RANKS
from specialize.infer.logits import full_logits
from specialize.infer.model import WorldSizeError, load_model

DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.5, "fp8": 1.0}
"""Max |Δ| allowed per layer and on the logits, by the megatron model's precision (the reference is fp32)."""

REFERENCE_RANK = 0
"""The one global rank that builds the fp32 reference."""


class ParityError(RuntimeError):
    """The model disagrees with the Hugging Face reference; the message holds the per-layer report."""


def verification_tokens(device: torch.device, seq: int = 64, batch: int = 2) -> torch.Tensor:
    """Fixed token ids ``[batch, seq]`` on ``device`` (the same on every rank of a job)."""
    generator = torch.Generator(device=device).manual_seed(20230916)
    return torch.randint(0, NUM_RANKS, (batch, seq), generator=generator, device=device)


def _reference(hf_dir: str) -> torch.nn.Module:
    """transformers' Qwen2 holding the checkpoint's tensors in fp32, on the host."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    info = read_config(hf_dir)
    config = Qwen2Config(**qwen2_config(info.arch), attn_implementation="eager")
    with no_init_weights():  # every tensor is overwritten below; random init costs minutes at 7B
        model = Qwen2ForCausalLM(config).float()
    state = model.state_dict()
    missing = set(state)
    for name, tensor in qwen2_tensors(info):
        target = state.get(name)
        if target is None:
            raise HFCheckpointError(f"{hf_dir}: {name}: unexpected tensor")
        if target.shape != tensor.shape:
            raise HFCheckpointError(
                f"{hf_dir}: {name}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}"
            )
        target.copy_(tensor)
        missing.discard(name)
    if missing:
        raise HFCheckpointError(f"{hf_dir}: missing tensors: {', '.join(sorted(missing))}")
    return model.eval()


def _capture(layers) -> tuple[dict[int, torch.Tensor], list]:
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in layers:

        def hook(_module, _args, output, index=index):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach().float()

        handles.append(layer.register_forward_hook(hook))
    return outputs, handles


def _reference_outputs(hf_dir: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's layer outputs ``[layers, s, b, h]`` and logits ``[b, s, vocab]`` (host, fp32)."""
    reference = _reference(hf_dir)
    outputs, handles = _capture(enumerate(reference.model.layers))
    logits = reference(tokens, use_cache=False).logits
    for h in handles:
        h.remove()
    hidden = torch.stack([outputs[i] for i in range(len(outputs))]).transpose(
        1, 2
    )  # megatron's s, b
    return hidden, logits


def full_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """A sequence-parallel ``[s/TP, b, h]`` slice → the whole ``[s, b, h]`` (on every TP rank)."""
    return tensor_parallel.gather_from_sequence_parallel_region(
        hidden,
        tensor_parallel_output_grad=False,
        group=parallel_state.get_tensor_model_parallel_group(),
    )


def _raise_everywhere(error: BaseException | None) -> None:
    """Raise the reference rank's error (or nothing) on every rank, so none is left waiting."""
    shared: list[BaseException | None] = [error]
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # the other ranks get its message
            shared = [RuntimeError(f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(shared, src=REFERENCE_RANK)
    if shared[0] is not None:
        if error is not None:
            raise error
        raise shared[0]


@torch.no_grad()
def compare(
    model: torch.nn.Module, hf_dir: str, tolerance: float, tokens: torch.Tensor | None = None
) -> list[str]:
    """Per-layer and logits max |Δ| of ``model`` (this rank's stage) against the HF reference.

    Call on every rank. Returns the report lines on every rank; raises ParityError (on every rank)
    past ``tolerance``, or the reference's loading error (on every rank)."""
    module = getattr(model, "module", model)
    config = module.config
    device = next(module.parameters()).device
    tokens = verification_tokens(device) if tokens is None else tokens.to(device)
    batch, seq = tokens.shape

    layers = [(layer.layer_number - 1, layer) for layer in module.decoder.layers]
    ours, handles = _capture(layers)
    try:
        logits = full_logits(model, tokens)
    finally:
        for h in handles:
            h.remove()
    if config.sequence_parallel:
        ours = {i: full_sequence(ours[i]) for i in sorted(ours)}  # same order on every TP rank

    num_layers = config.num_layers
    expected = torch.empty(
        num_layers, seq, batch, config.hidden_size, dtype=torch.float32, device=device
    )
    diffs = torch.zeros(num_layers + 1, dtype=torch.float32, device=device)  # layers, then logits
    is_reference_rank = dist.get_rank() == REFERENCE_RANK
    error = None
    if is_reference_rank:
        try:
            hidden, expected_logits = _reference_outputs(hf_dir, tokens.cpu())
            if hidden.shape != expected.shape:
                raise HFCheckpointError(
                    f"{hf_dir}: {hidden.shape[0]} layers of hidden size {hidden.shape[-1]}, but "
                    f"the model has {num_layers} of {config.hidden_size}"
                )
            expected.copy_(hidden)
            vocab = expected_logits.shape[-1]
            diffs[-1] = (logits[..., :vocab] - expected_logits.to(device)).abs().max()
            del hidden, expected_logits
        except Exception as e:  # the other ranks are waiting for the reference
            error = e
    _raise_everywhere(error)
    dist.broadcast(expected, src=REFERENCE_RANK)
    for index, hidden in ours.items():
        diffs[index] = (hidden - expected[index]).abs().max()
    # NaN would compare as within tolerance (and is not ordered by MAX): make it fail.
    diffs = torch.nan_to_num(diffs, nan=float("inf"))
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    *per_layer, logit_diff = diffs.tolist()

    lines = [
        f"layer {i:3d}: max |Δhidden| {d:.3e}" + ("  <-- over tolerance" if d > tolerance else "")
        for i, d in enumerate(per_layer)
    ]
    lines.append(f"logits   : max |Δ| {logit_diff:.3e} (tolerance {tolerance:g})")
    if logit_diff > tolerance or any(d > tolerance for d in per_layer):
        first = next((i for i, d in enumerate(per_layer) if d > tolerance), None)
        where = (
            f"first diverging layer {first}" if first is not None else "layers agree, logits do not"
        )
        raise ParityError(f"model differs from {hf_dir} ({where}):\n" + "\n".join(lines))
    return lines


# ----------------------------------------------------------------------------- convert verify


def verify(
    hf_dir: str | Path, ckpt: str | Path, tp: int = 1, pp: int = 1, tolerance: float = 1e-4
) -> list[str]:
    """Load ``ckpt`` at TP/PP (this process is one rank of a TP x PP world) and compare with ``hf_dir``."""
    read_config(hf_dir)  # a bad reference directory is an error before any model is built
    try:  # in fp32, the reference's precision (and the tolerance's)
        model, _ = load_model(ckpt, tp, pp, dtype="fp32")
    except WorldSizeError as e:
        raise HFCheckpointError(f"verify: {e}") from None
    return compare(model, str(hf_dir), tolerance)
