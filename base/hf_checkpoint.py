"""Reading Hugging Face Qwen checkpoints: config.json → architecture, shards → tensors one at a time.

Two layouts are read. ``qwen`` is Qwen v1 (``QWenLMHeadModel``, remote code): fused ``c_attn`` with
Q, K and V as three contiguous blocks of rows, ``w2`` the SwiGLU gate and ``w1`` the up projection,
``intermediate_size`` twice the real FFN width. ``qwen2`` is transformers' ``Qwen2ForCausalLM``
(Qwen1.5/2/2.5; possibly GQA). Tensors of either are presented under Qwen2 names, so one mapping
(``base.hf_mapping``) turns them into megatron-core's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from base.long_context import LongContext
from base.presets import PRESETS, QwenPreset


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names the file or tensor."""


@dataclass(frozen=True)
class HFModel:
    path: Path
    layout: str
    """``qwen`` (v1) or ``qwen2``."""
    arch: QwenPreset
    dtype: torch.dtype
    """The dtype the checkpoint declares (``torch_dtype`` / ``bf16``/``fp16`` flags)."""
    long_context: LongContext | None = None
    """Qwen v1's inference options (``use_dynamic_ntk``, ``use_logn_attn``, ``seq_length``);
    the importer stores them as the checkpoint's ``long_context.json``."""


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _matching_preset(arch: QwenPreset) -> QwenPreset:
    """The paper preset with this shape, renamed to it, or the architecture as read."""
    for preset in PRESETS.values():
        same = all(
            getattr(preset, f) == getattr(arch, f)
            for f in (
                "hidden_size",
                "num_attention_heads",
                "num_layers",
                "ffn_hidden_size",
                "padded_vocab_size",
            )
        )
        if same and preset.query_groups == arch.query_groups:
            return QwenPreset(**{**arch.__dict__, "name": preset.name})
    return arch


def read_config(path: str | Path) -> HFModel:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(
            f"{config_file}: not found (expected a Hugging Face checkpoint directory)"
        )
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")

    def need(key: str):
        if key not in config:
            raise HFCheckpointError(f"{config_file}: missing '{key}'")
        return config[key]

    if model_type == "qwen" or "QWenLMHeadModel" in architectures:
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv_channels = config.get("kv_channels", hidden // heads)
        if kv_channels * heads != hidden:
            raise HFCheckpointError(
                f"{config_file}: kv_channels={kv_channels} x heads={heads} != hidden_size={hidden}"
            )
        if config.get("rotary_pct", 1.0) != 1.0:
            raise HFCheckpointError(
                f"{config_file}: rotary_pct={config['rotary_pct']} is not supported (Qwen uses 1.0)"
            )
        arch = QwenPreset(
            name="custom",
            hidden_size=hidden,
            num_attention_heads=heads,
            num_layers=need("num_hidden_layers"),
            ffn_hidden_size=need("intermediate_size") // 2,  # v1 stores twice the FFN width
            padded_vocab_size=need("vocab_size"),
            max_position_embeddings=config.get(
                "seq_length", config.get("max_position_embeddings", 8192)
            ),
            rotary_base=float(config.get("rotary_emb_base", 10000)),
            norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
        )
        dtype = (
            torch.bfloat16 if config.get("bf16") else torch.float16 if config.get("fp16") else None
        )
        layout = "qwen"
        long_context = qwen_v1_long_context(config)
    elif model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        if config.get("tie_word_embeddings", False):
            raise HFCheckpointError(
                f"{config_file}: tie_word_embeddings=true is not supported (Qwen 7B/14B untie input and output)"
            )
        rope_theta = config.get(
            "rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        )
        heads = need("num_attention_heads")
        arch = QwenPreset(
            name="custom",
            hidden_size=need("hidden_size"),
            num_attention_heads=heads,
            num_layers=need("num_hidden_layers"),
            ffn_hidden_size=need("intermediate_size"),
            padded_vocab_size=need("vocab_size"),
            num_query_groups=config.get("num_key_value_heads", heads),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            rotary_base=float(rope_theta),
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        )
        dtype = None
        layout = "qwen2"
        long_context = None
    else:
        raise HFCheckpointError(
            f"{config_file}: unsupported architecture {architectures or model_type!r}; "
            "expected QWenLMHeadModel (Qwen v1) or Qwen2ForCausalLM"
        )
    declared = config.get("torch_dtype") or config.get("dtype")
    dtype = dtype or _DTYPES.get(str(declared), torch.float32)
    return HFModel(
        path=path,
        layout=layout,
        arch=_matching_preset(arch),
        dtype=dtype,
        long_context=long_context,
    )


def qwen_v1_long_context(config: dict) -> LongContext:
    """Qwen v1 config keys → long-context options: ``use_dynamic_ntk`` → ``rope_scaling``
    dynamic-ntk, ``use_logn_attn`` → ``logn_attention``, ``seq_length`` (the training length their
    rules start from, default 2048 as in Qwen's ``QWenConfig``) → ``train_seq_length``."""
    return LongContext(
        rope_scaling="dynamic-ntk" if config.get("use_dynamic_ntk", False) else "none",
        logn_attention=bool(config.get("use_logn_attn", False)),
        train_seq_length=int(config.get("seq_length", 2048)),
    )


def qwen_v1_long_context_config(options: LongContext | None, arch: QwenPreset) -> dict:
    """The inverse, for an exported v1 ``config.json`` (``seq_length`` defaults to the
    architecture's context length, which is what the exporter writes without options).

    A fixed ``rope_alpha`` and per-layer windows have no Qwen v1 key and are not exported."""
    options = options or LongContext()
    return {
        "use_dynamic_ntk": options.rope_scaling == "dynamic-ntk",
        "use_logn_attn": options.logn_attention,
        "seq_length": options.train_seq_length or arch.max_position_embeddings,
    }


def _shard_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise HFCheckpointError(f"{index}: lists shard files that do not exist: {missing}")
            return [path / f for f in files]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise HFCheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    return files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, each read into its own buffer.

    The ``safetensors`` library memory-maps the whole file, so every tensor read stays resident
    until the file is closed: converting a shard costs its size twice. Reading each tensor with
    plain file I/O keeps one tensor at a time (the format is an 8-byte header length, a JSON header
    of dtype/shape/offsets, then the data)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise HFCheckpointError(f"{file}: not a safetensors file ({e})") from None
        start = 8 + header_len
        for name, info in sorted(
            header.items(),
            key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1,
        ):
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise HFCheckpointError(f"{file}: {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise HFCheckpointError(
                    f"{file}: {name} declares shape {info['shape']} but holds {end - begin} bytes"
                )
            f.seek(start + begin)
            f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            yield name, tensor


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every shard, one tensor in memory at a time for safetensors."""
    for file in _shard_files(Path(path)):
        if file.suffix == ".safetensors":
            yield from read_safetensors(file)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()
            del state


# Per-layer tensors renamed one to one (c_attn, split into q/k/v, is handled apart).
V1_TO_QWEN2_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",  # v1: c_proj(w1(x) * silu(w2(x)))
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
QWEN2_TO_V1_LAYER_NAMES = {v: k for k, v in V1_TO_QWEN2_LAYER_NAMES.items()}


def qwen_v1_to_qwen2_names(
    tensors: Iterator[tuple[str, torch.Tensor]], arch: QwenPreset
) -> Iterator[tuple[str, torch.Tensor]]:
    """Present Qwen v1 tensors under Qwen2 names (c_attn split into q/k/v; w2 → gate, w1 → up)."""
    hidden = arch.hidden_size
    for name, tensor in tensors:
        if name == "transformer.wte.weight":
            yield "model.embed_tokens.weight", tensor
        elif name == "transformer.ln_f.weight":
            yield "model.norm.weight", tensor
        elif name == "lm_head.weight":
            yield name, tensor
        elif name.startswith("transformer.h."):
            layer, rest = name[len("transformer.h.") :].split(".", 1)
            p = f"model.layers.{layer}."
            if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
                kind = rest.rsplit(".", 1)[1]
                if tensor.shape[0] != 3 * hidden:
                    raise HFCheckpointError(
                        f"{name}: expected {3 * hidden} rows (Q|K|V), got shape {tuple(tensor.shape)}"
                    )
                for x, block in zip("qkv", torch.split(tensor, hidden, dim=0)):
                    yield f"{p}self_attn.{x}_proj.{kind}", block
            else:
                renamed = V1_TO_QWEN2_LAYER_NAMES.get(rest)
                if renamed is None:
                    raise HFCheckpointError(f"{name}: unexpected tensor in a Qwen v1 checkpoint")
                yield p + renamed, tensor
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer recomputed from rotary_emb_base
        else:
            raise HFCheckpointError(f"{name}: unexpected tensor in a Qwen v1 checkpoint")


def qwen2_tensors(model: HFModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under Qwen2 names, whatever its layout."""
    tensors = iter_tensors(model.path)
    if model.layout == "qwen":
        return qwen_v1_to_qwen2_names(tensors, model.arch)
    return ((n, t) for n, t in tensors if not n.endswith("rotary_emb.inv_freq"))


def qwen2_to_qwen_v1_names(
    tensors: Iterator[tuple[str, torch.Tensor]], arch: QwenPreset
) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of ``qwen_v1_to_qwen2_names`` for a stream in ``megatron_to_hf`` order (q, k, v adjacent)."""
    held: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name == "model.embed_tokens.weight":
            yield "transformer.wte.weight", tensor
        elif name == "model.norm.weight":
            yield "transformer.ln_f.weight", tensor
        elif name == "lm_head.weight":
            yield name, tensor
        else:
            layer, rest = name[len("model.layers.") :].split(".", 1)
            p = f"transformer.h.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                held[name] = tensor
                kind = rest.rsplit(".", 1)[1]
                parts = [f"model.layers.{layer}.self_attn.{x}_proj.{kind}" for x in "qkv"]
                if all(n in held for n in parts):
                    yield f"{p}attn.c_attn.{kind}", torch.cat([held.pop(n) for n in parts])
                continue
            renamed = QWEN2_TO_V1_LAYER_NAMES[rest]
            yield p + renamed, tensor
