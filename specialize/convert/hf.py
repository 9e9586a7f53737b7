"""``specialize convert import``: a Hugging Face Qwen checkpoint → a megatron-core dist checkpoint.

The model is built once in the target dtype without random initialization; HF tensors stream in one
at a time (q/k/v and gate/up wait for their partners), are checked against the expected shape and
copied into the parameters. The result is saved with ``dist_checkpointing``, whose sharded tensors
carry global shapes: any TP/PP loads it. Nothing is written unless every tensor arrived.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from base.hf_checkpoint import (
    HFCheckpointError,
    HFModel,
    iter_file_tensors,
    matching_preset,
    qwen2_tensors,
    qwen2_to_qwen_v1_names,
    qwen_v1_long_context_config,
    read_config,
)
from base.hf_mapping import megatron_sources, megatron_to_hf, qwen2_config
from base.hf_tokenizer import write_hf_tokenizer
from base.long_context_config import write_long_context
from base.model import ModelOptions, build_model
from base.presets import QwenPreset
from base.tokenizer import EOD_ID, IM_END_ID, QwenTokenizer
from specialize.checkpoint import (
    GENERATION_CONFIG_FILE,
    CheckpointError,
    read_architecture,
    read_generation_config,
    resolve_checkpoint,
)
from specialize.checkpoint.state import load_model_weights, save_weights
from specialize.config import (
    ConfigError,
    ParallelConfig,
    RecipeConfig,
    architecture_overrides,
    load_config,
)
from specialize.infer.model import DTYPE_NAMES, stored_dtype, stored_long_context
from specialize.mcore.distributed import init_distributed, seed_all

log = logging.getLogger("specialize")


DECODING_DEFAULTS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "max_new_tokens",
)
"""The ``generation_config.json`` fields an export carries over from the checkpoint."""


def qwen2_shapes(arch: QwenPreset) -> dict[str, tuple[int, ...]]:
    """The shape every Qwen2-named tensor of this architecture must have."""
    h, f, v, d = arch.hidden_size, arch.ffn_hidden_size, arch.padded_vocab_size, arch.kv_channels
    q, kv = arch.num_attention_heads * d, arch.query_groups * d
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                f"{p}input_layernorm.weight": (h,),
                f"{p}post_attention_layernorm.weight": (h,),
                f"{p}self_attn.q_proj.weight": (q, h),
                f"{p}self_attn.k_proj.weight": (kv, h),
                f"{p}self_attn.v_proj.weight": (kv, h),
                f"{p}self_attn.q_proj.bias": (q,),
                f"{p}self_attn.k_proj.bias": (kv,),
                f"{p}self_attn.v_proj.bias": (kv,),
                f"{p}self_attn.o_proj.weight": (h, q),
                f"{p}mlp.gate_proj.weight": (f, h),
                f"{p}mlp.up_proj.weight": (f, h),
                f"{p}mlp.down_proj.weight": (h, f),
            }
        )
    return shapes


def recipe_model_fields(arch: QwenPreset) -> dict[str, object]:
    """``model.*`` fields of a recipe that builds ``arch``: the preset of its shape and what differs
    from it (so a qwen-nano checkpoint is built, and named, as qwen-nano), else every field."""
    fields = architecture_overrides(arch)
    preset = matching_preset(arch)
    if preset is None:
        return fields
    preset_fields = architecture_overrides(preset)
    return {"preset": preset.name, **{k: v for k, v in fields.items() if preset_fields[k] != v}}


def recipe_for(arch: QwenPreset, tp: int, pp: int) -> RecipeConfig:
    """A validated recipe that trains ``arch`` at TP x PP (raises ConfigError when it does not
    fit): an import checks the layout it suggests with it and reports its ``model.*`` fields.
    Its ``train.steps=1`` only satisfies validation."""
    overrides = (f"model.{k}={v}" for k, v in recipe_model_fields(arch).items())
    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    return load_config(None, ["train.steps=1", *layout, *overrides])


def _target_dtype(source: torch.dtype, requested: str | None) -> tuple[str, str]:
    """(dtype name to build, what the report says about it)."""
    source_name = DTYPE_NAMES[source]
    if requested is None:
        if source_name == "fp16":
            raise HFCheckpointError(
                "the checkpoint is fp16; choose --dtype bf16 or --dtype fp32 (training uses those)"
            )
        return source_name, f"kept {source_name} as stored"
    if requested not in ("bf16", "fp32"):
        raise HFCheckpointError(f"--dtype {requested}: must be bf16 or fp32")
    note = (
        f"kept {requested} as stored"
        if requested == source_name
        else f"cast {source_name} -> {requested} (--dtype)"
    )
    return requested, note


def _check_output(out: Path) -> None:
    """The output must be a new or empty directory: never overwrite, never write into a file."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise HFCheckpointError(f"{existing}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise HFCheckpointError(f"{out}: exists and is not empty")


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> dict:
    """Convert; returns the report (also written to ``OUT/conversion.json``).

    A tensor holding NaN or Inf is refused unless ``allow_nonfinite`` (then counted and reported)."""
    hf_dir, out = Path(hf_dir), Path(out)
    model_info = read_config(hf_dir)
    arch = model_info.arch
    built_dtype, dtype_note = _target_dtype(model_info.dtype, dtype)
    try:  # the layout this checkpoint is meant for must divide the model
        recipe = recipe_for(arch, tp, pp)
    except ConfigError as e:
        raise HFCheckpointError(f"--tp {tp} --pp {pp} do not fit {hf_dir}: {e}") from None
    _check_output(out)

    init_distributed(ParallelConfig())  # one process: the checkpoint's tensors are global anyway
    seed_all(0)
    model = build_model(arch, ModelOptions(spec="local", dtype=built_dtype, initialize=False))
    params = dict(model.named_parameters())
    nonfinite: list[str] = []
    _fill(model_info, arch, params, nonfinite if allow_nonfinite else None)
    if nonfinite:
        log.warning(
            "%d tensors hold NaN/Inf values, imported as they are (--allow-nonfinite): %s",
            len(nonfinite),
            ", ".join(nonfinite[:5]) + (" ..." if len(nonfinite) > 5 else ""),
        )

    tokenizer_file = hf_dir / QwenTokenizer.VOCAB_FILE
    tokenizer = QwenTokenizer.load(tokenizer_file if tokenizer_file.is_file() else None)
    try:  # a damaged one is an error now, not at evaluation
        read_generation_config(hf_dir)
    except CheckpointError as e:
        raise HFCheckpointError(str(e)) from None
    generation_config = [f for f in [hf_dir / GENERATION_CONFIG_FILE] if f.is_file()]
    report = {
        "source": str(hf_dir.resolve()),
        "layout": model_info.naming,  # the naming scheme, under the printed report's key
        "architecture": arch.name,
        "parameters": sum(p.numel() for p in params.values()),
        "dtype": dtype_note,
        "suggested_layout": {"tensor": tp, "pipeline": pp},
        "tokenizer": {"file": str(tokenizer.vocab_file), "sha256": tokenizer.sha256},
        "recipe_model": {"preset": recipe.model.preset, **recipe_model_fields(arch)},
    }
    if nonfinite:
        report["nonfinite_tensors"] = nonfinite
    long_context = model_info.long_context  # Qwen v1's use_dynamic_ntk / use_logn_attn / seq_length
    save_weights(
        model,
        out,
        arch,
        report,
        # The source's generation defaults: what `transformers` generates with from it, and so
        # what the `paper` protocols' reference scripts did (eval.harness reads it back).
        extra_files=[tokenizer.vocab_file, *generation_config],
        # Written before the checksums are, so they cover it.
        write_extra=None if long_context is None else lambda d: write_long_context(d, long_context),
    )
    return report


def _finite_tensors(
    model_info: HFModel, nonfinite: list[str] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as stored, each checked for NaN/Inf as it streams in: an error
    naming the first one, or (``nonfinite`` given) its name appended there."""
    for file, name, tensor in iter_file_tensors(model_info.path):
        if tensor.is_floating_point():
            bad = _count_nonfinite(tensor)
            if bad and nonfinite is None:
                raise HFCheckpointError(
                    f"{file}: tensor {name} holds {bad} NaN/Inf values of {tensor.numel()} "
                    "(--allow-nonfinite imports them anyway)"
                )
            if bad:
                nonfinite.append(name)
        yield name, tensor


def _count_nonfinite(tensor: torch.Tensor, chunk: int = 2**24) -> int:
    """NaN and Inf values, counted in chunks: a mask of the whole embedding would cost a quarter of
    its size on top of the one tensor import holds."""
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(part)).sum()) for part in flat.split(chunk))


def _fill(
    model_info: HFModel,
    arch: QwenPreset,
    params: dict[str, torch.nn.Parameter],
    nonfinite: list[str] | None = None,
) -> None:
    """Stream HF tensors into the parameters; every shape and every tensor accounted for."""
    sources = megatron_sources(arch)
    needed_by = {hf: mg for mg, (names, _) in sources.items() for hf in names}
    shapes = qwen2_shapes(arch)
    pending: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    for name, tensor in qwen2_tensors(model_info, _finite_tensors(model_info, nonfinite)):
        if name not in needed_by:
            raise HFCheckpointError(
                f"{name}: unexpected tensor (shape {tuple(tensor.shape)}) for a {arch.name} model"
            )
        if tuple(tensor.shape) != shapes[name]:
            raise HFCheckpointError(
                f"{name}: expected shape {shapes[name]}, got {tuple(tensor.shape)}"
            )
        pending[name] = tensor
        target = needed_by[name]
        names, combine = sources[target]
        if all(n in pending for n in names):
            value = combine(*(pending.pop(n) for n in names))
            params[target].data.copy_(value)
            filled.add(target)
    missing = sorted(
        n
        for mg, (names, _) in sources.items()
        if mg not in filled
        for n in names
        if n not in pending
    )
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise HFCheckpointError(f"{model_info.path}: missing tensors: {shown}")


# ----------------------------------------------------------------------------- export

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _hf_config(arch: QwenPreset, fmt: str, dtype: torch.dtype) -> dict:
    if fmt == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **qwen2_config(arch),
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "bos_token_id": EOD_ID,
            "eos_token_id": EOD_ID,
            "use_sliding_window": False,
            "use_cache": True,
            "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        }
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "intermediate_size": 2 * arch.ffn_hidden_size,  # v1 stores twice the FFN width
        "kv_channels": arch.kv_channels,
        "layer_norm_epsilon": arch.norm_epsilon,
        "rotary_emb_base": arch.rotary_base,
        "rotary_pct": 1.0,
        "seq_length": arch.max_position_embeddings,
        "vocab_size": arch.padded_vocab_size,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "fp32": dtype == torch.float32,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
    }


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def export_hf(
    ckpt: str | Path, out: str | Path, fmt: str = "qwen2", max_shard_bytes: int = 5 * 2**30
) -> dict:
    """Write a Hugging Face directory: safetensors shards (+ index), config, generation config, tokenizer."""
    if fmt not in ("qwen2", "qwen"):
        raise HFCheckpointError(f"--format {fmt}: must be qwen2 or qwen")
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    _check_output(out)
    arch = read_architecture(ckpt)
    model, dtype = _load_for_export(ckpt, arch)

    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise HFCheckpointError(f"{out}: cannot create ({e.strerror})") from None
    try:
        shards, tensors = _write_hf_directory(
            model, arch, ckpt, partial, fmt, dtype, max_shard_bytes
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written is left behind
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(partial, out)
    return {
        "checkpoint": str(ckpt),
        "format": fmt,
        "dtype": TORCH_DTYPE_NAMES[dtype],
        "shards": shards,
        "tensors": tensors,
    }


def _load_for_export(ckpt: Path, arch: QwenPreset) -> tuple[torch.nn.Module, torch.dtype]:
    init_distributed(ParallelConfig())
    seed_all(0)
    dtype = stored_dtype(ckpt)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    model = build_model(arch, ModelOptions(spec="local", dtype=name, initialize=False))
    load_model_weights(model, ckpt, arch)
    return model, dtype


def _write_hf_directory(
    model: torch.nn.Module,
    arch: QwenPreset,
    ckpt: Path,
    partial: Path,
    fmt: str,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> tuple[int, int]:
    """Fill ``partial``; returns (shards, tensors)."""
    weights = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    tensors = megatron_to_hf(weights, arch)
    if fmt == "qwen":
        tensors = qwen2_to_qwen_v1_names(tensors, arch)

    # Each shard is written as soon as it is full and then dropped: peak memory is the model plus
    # one shard. Files are renamed once the shard count (part of the name) is known.
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    mode = _default_file_mode()

    def flush() -> None:
        file = partial / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        file.chmod(mode)  # safetensors writes a 0600 temporary file and renames it
        written.append((file, list(shard)))
        shard.clear()

    for tensor_name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        if (
            tensor.dtype != dtype
        ):  # fp32 norm weights of a bf16 model are written in the model dtype
            tensor = tensor.to(dtype)
        # Views (q/k/v splits, gate/up halves) share storage, which safetensors refuses: copy them.
        shard[tensor_name] = tensor.clone() if tensor._base is not None else tensor
        size += nbytes
        total += nbytes
    flush()
    shards = len(written)
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        file = (
            "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        )
        tmp.rename(partial / file)
        weight_map.update(dict.fromkeys(names, file))
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = _hf_config(arch, fmt, dtype)
    if fmt == "qwen":  # Qwen v1 carries its long-context switches in config.json
        config.update(qwen_v1_long_context_config(stored_long_context(ckpt), arch))
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The decoding defaults the checkpoint carries (an HF import's, inherited by training), and
    # the stop ids: a chat turn ends with <|im_end|>, so generation stops on both (docs/paper.md
    # §3). Qwen v1's chat_format and stop_words_ids are not carried: a base model's "raw" would
    # be wrong for the chat model trained from it.
    carried = read_generation_config(ckpt)
    generation = {key: carried[key] for key in DECODING_DEFAULTS if key in carried}
    generation |= {
        "bos_token_id": EOD_ID,
        "eos_token_id": [EOD_ID, IM_END_ID],
        "pad_token_id": EOD_ID,
    }
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    vocab = ckpt / QwenTokenizer.VOCAB_FILE
    tokenizer = QwenTokenizer.load(vocab if vocab.is_file() else None)
    shutil.copyfile(tokenizer.vocab_file, partial / QwenTokenizer.VOCAB_FILE)
    write_hf_tokenizer(tokenizer, partial, arch.max_position_embeddings)  # vocab.json + merges.txt
    return shards, len(weight_map)
