"""Reading Hugging Face Qwen checkpoints: config.json → architecture, shards → tensors one at a time.

Two naming schemes are read. ``qwen`` is Qwen v1 (``QWenLMHeadModel``, remote code): fused ``c_attn`` with
Q, K and V as three contiguous blocks of rows, ``w2`` the SwiGLU gate and ``w1`` the up projection,
``intermediate_size`` twice the real FFN width. ``qwen2`` is transformers' ``Qwen2ForCausalLM``
(Qwen1.5/2/2.5; possibly GQA). Tensors of either are presented under Qwen2 names, so one mapping
(``base.hf_mapping``) turns them into megatron-core's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from base.long_context_config import QWEN_SEQ_LENGTH, LongContextConfig
from base.presets import PRESETS, QwenPreset


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names the file or tensor."""


@dataclass(frozen=True)
class HFModel:
    path: Path
    naming: str
    """Its tensor-naming scheme: ``qwen`` (v1) or ``qwen2``."""
    arch: QwenPreset
    dtype: torch.dtype
    """The dtype the checkpoint declares (``torch_dtype`` / ``bf16``/``fp16`` flags)."""
    long_context: LongContextConfig | None = None
    """Qwen v1's inference options (``use_dynamic_ntk``, ``use_logn_attn``, ``seq_length``);
    the importer stores them as the checkpoint's ``long_context.json``."""


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


_SHAPE_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_layers",
    "ffn_hidden_size",
    "padded_vocab_size",
    "query_groups",
)


def matching_preset(arch: QwenPreset) -> QwenPreset | None:
    """The preset of the same shape (sizes, heads, layers, vocabulary), if there is one."""
    for preset in PRESETS.values():
        if all(getattr(preset, f) == getattr(arch, f) for f in _SHAPE_FIELDS):
            return preset
    return None


def _named_after_preset(arch: QwenPreset) -> QwenPreset:
    """The architecture named like a recipe that builds it: the preset of its shape, with
    ``+custom`` when its RoPE base, norm epsilon or context length differ; else ``custom``."""
    preset = matching_preset(arch)
    if preset is None:
        return arch
    same = dataclasses.replace(arch, name=preset.name, num_query_groups=preset.num_query_groups)
    name = preset.name if same == preset else f"{preset.name}+custom"
    return dataclasses.replace(arch, name=name)


_REQUIRED = object()


class _ConfigFields:
    """Typed access to ``config.json`` fields; a wrong one is an error naming the file and field."""

    def __init__(self, file: Path, config: dict, prefix: str = "") -> None:
        self.file, self.config, self.prefix = file, config, prefix

    def _get(self, key: str, default):
        value = self.config.get(key)
        if value is None:  # absent, or null as transformers writes unset fields
            if default is _REQUIRED:
                raise HFCheckpointError(f"{self.file}: missing '{self.prefix}{key}'")
            return default, False
        return value, True

    def error(self, key: str, value, expected: str) -> HFCheckpointError:
        return HFCheckpointError(
            f"{self.file}: '{self.prefix}{key}' must be {expected}, got {value!r}"
        )

    def positive_int(self, key: str, default=_REQUIRED) -> int:
        value, present = self._get(key, default)
        if present and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise self.error(key, value, "a positive integer")
        return value

    def positive_number(self, key: str, default=_REQUIRED) -> float:
        value, present = self._get(key, default)
        if present and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            raise self.error(key, value, "a positive finite number")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value, present = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def section(self, key: str) -> _ConfigFields:
        value, present = self._get(key, {})
        if present and not isinstance(value, dict):
            raise self.error(key, value, "a JSON object")
        return _ConfigFields(self.file, value, prefix=f"{self.prefix}{key}.")


def _load_json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError (says line and column) or UnicodeDecodeError
        raise HFCheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(path: str | Path) -> HFModel:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(
            f"{config_file}: not found (expected a Hugging Face checkpoint directory)"
        )
    config = _load_json_object(config_file)
    fields = _ConfigFields(config_file, config)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not isinstance(architectures, list):
        raise fields.error("architectures", architectures, "a list of class names")

    if model_type == "qwen" or "QWenLMHeadModel" in architectures:
        heads = fields.positive_int("num_attention_heads")
        hidden = fields.positive_int("hidden_size")
        kv_channels = fields.positive_int("kv_channels", hidden // heads)
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
            num_layers=fields.positive_int("num_hidden_layers"),
            ffn_hidden_size=fields.positive_int("intermediate_size")
            // 2,  # v1 stores twice the FFN
            padded_vocab_size=fields.positive_int("vocab_size"),
            max_position_embeddings=fields.positive_int(
                "seq_length", fields.positive_int("max_position_embeddings", 8192)
            ),
            rotary_base=fields.positive_number("rotary_emb_base", 10000.0),
            norm_epsilon=fields.positive_number("layer_norm_epsilon", 1e-6),
        )
        dtype = (
            torch.bfloat16
            if fields.flag("bf16")
            else torch.float16
            if fields.flag("fp16")
            else None
        )
        naming = "qwen"
        long_context = qwen_v1_long_context(config, config_file)
    elif model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        if fields.flag("tie_word_embeddings"):
            raise HFCheckpointError(
                f"{config_file}: tie_word_embeddings=true is not supported (Qwen 7B/14B untie input and output)"
            )
        rope_theta = fields.positive_number(
            "rope_theta", fields.section("rope_parameters").positive_number("rope_theta", 10000.0)
        )
        heads = fields.positive_int("num_attention_heads")
        arch = QwenPreset(
            name="custom",
            hidden_size=fields.positive_int("hidden_size"),
            num_attention_heads=heads,
            num_layers=fields.positive_int("num_hidden_layers"),
            ffn_hidden_size=fields.positive_int("intermediate_size"),
            padded_vocab_size=fields.positive_int("vocab_size"),
            num_query_groups=fields.positive_int("num_key_value_heads", heads),
            max_position_embeddings=fields.positive_int("max_position_embeddings", 32768),
            rotary_base=rope_theta,
            norm_epsilon=fields.positive_number("rms_norm_eps", 1e-6),
        )
        dtype = None
        naming = "qwen2"
        long_context = None
    else:
        raise HFCheckpointError(
            f"{config_file}: unsupported architecture {architectures or model_type!r}; "
            "expected QWenLMHeadModel (Qwen v1) or Qwen2ForCausalLM"
        )
    key = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    declared = config.get(key)
    if dtype is None and declared is not None and str(declared) not in _DTYPES:
        # A dtype we cannot name would otherwise become fp32 without a word.
        raise _ConfigFields(config_file, config).error(key, declared, " or ".join(_DTYPES))
    dtype = dtype or _DTYPES.get(str(declared), torch.float32)
    return HFModel(
        path=path,
        naming=naming,
        arch=_named_after_preset(arch),
        dtype=dtype,
        long_context=long_context,
    )


def qwen_v1_long_context(config: dict, file: Path = Path("config.json")) -> LongContextConfig:
    """Qwen v1 config keys → long-context options: ``use_dynamic_ntk`` → ``rope_scaling``
    dynamic-ntk, ``use_logn_attn`` → ``logn_attention``, ``seq_length`` (the training length their
    rules start from, default 2048 as in Qwen's ``QWenConfig``) → ``train_seq_length``."""
    fields = _ConfigFields(file, config)
    return LongContextConfig(
        rope_scaling="dynamic-ntk" if fields.flag("use_dynamic_ntk") else "none",
        logn_attention=fields.flag("use_logn_attn"),
        train_seq_length=fields.positive_int("seq_length", QWEN_SEQ_LENGTH),
    )


def qwen_v1_long_context_config(options: LongContextConfig | None, arch: QwenPreset) -> dict:
    """The inverse, for an exported v1 ``config.json`` (``seq_length`` defaults to the
    architecture's context length, which is what the exporter writes without options).

    A fixed ``rope_alpha`` and per-layer windows have no Qwen v1 key and are not exported."""
    options = options or LongContextConfig()
    return {
        "use_dynamic_ntk": options.rope_scaling == "dynamic-ntk",
        "use_logn_attn": options.logn_attention,
        "seq_length": options.train_seq_length or arch.max_position_embeddings,
    }


def _shard_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = _load_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise HFCheckpointError(f"{index}: 'weight_map' must map tensor names to files")
            files = sorted(set(weight_map.values()))
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
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def _tensor_entry(file: Path, name: str, info) -> _TensorEntry:
    """One header entry, checked: known dtype, a shape, offsets that hold exactly its bytes."""
    if not isinstance(info, dict):
        raise HFCheckpointError(f"{file}: tensor {name}: header entry is not a JSON object")
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise HFCheckpointError(f"{file}: tensor {name}: unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HFCheckpointError(f"{file}: tensor {name}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise HFCheckpointError(f"{file}: tensor {name}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != end - begin:
        raise HFCheckpointError(
            f"{file}: tensor {name}: shape {shape} of {info['dtype']} needs {nbytes} bytes, "
            f"data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return _TensorEntry(name, dtype, shape, begin, end)


def safetensors_header(file: Path) -> tuple[int, list[_TensorEntry]]:
    """(data start, entries in file order) of a safetensors file, every entry checked against
    the file before any tensor is read: the data must be exactly the tensors, back to back (as
    the format requires), so a truncated or padded file is refused rather than read as zeros."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HFCheckpointError(f"{file}: not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise HFCheckpointError(
                f"{file}: header length {header_len} does not fit the file ({size} bytes); "
                "truncated or not a safetensors file"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise HFCheckpointError(f"{file}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    entries = sorted(
        (
            _tensor_entry(file, name, info)
            for name, info in header.items()
            if name != "__metadata__"
        ),
        key=lambda e: (e.begin, e.end),
    )
    start, position = 8 + header_len, 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap"
            raise HFCheckpointError(
                f"{file}: tensor {entry.name}: data_offsets [{entry.begin}, {entry.end}] {problem} "
                f"(expected to start at {position})"
            )
        if start + entry.end > size:
            raise HFCheckpointError(
                f"{file}: tensor {entry.name}: data ends at byte {start + entry.end} but the file "
                f"has {size} bytes (truncated)"
            )
        position = entry.end
    if start + position != size:
        raise HFCheckpointError(
            f"{file}: {size} bytes, but its header accounts for {start + position} "
            "(8 + header + tensor data); the file is damaged"
        )
    return start, entries


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, each read into its own buffer.

    The ``safetensors`` library memory-maps the whole file, so every tensor read stays resident
    until the file is closed: converting a shard costs its size twice. Reading each tensor with
    plain file I/O keeps one tensor at a time (the format is an 8-byte header length, a JSON header
    of dtype/shape/offsets, then the data)."""
    start, entries = safetensors_header(file)
    with open(file, "rb") as f:
        for entry in entries:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            f.seek(start + entry.begin)
            got = f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            if got != entry.end - entry.begin:  # the file shrank while being read
                raise HFCheckpointError(
                    f"{file}: tensor {entry.name}: read {got} of {entry.end - entry.begin} bytes"
                )
            yield entry.name, tensor


def read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model*.bin`` state dict, memory-mapped; a damaged file is an error naming it."""
    # torch.save writes a zip whose directory is at the end: truncation removes it, and torch's
    # own error does not say which file it was reading.
    if not zipfile.is_zipfile(file):
        raise HFCheckpointError(
            f"{file}: not a readable torch.save archive (truncated, or saved in the legacy format)"
        )
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise HFCheckpointError(f"{file}: cannot be loaded ({' '.join(str(e).split())})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise HFCheckpointError(f"{file}: expected a state dict of tensors")
    return state


def iter_file_tensors(path: str | Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) over every shard, one tensor in memory at a time for safetensors."""
    for file in _shard_files(Path(path)):
        if file.suffix == ".safetensors":
            for name, tensor in read_safetensors(file):
                yield file, name, tensor
        else:
            state = read_torch_bin(file)
            for name, tensor in state.items():
                yield file, name, tensor
            del state


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every shard, one tensor in memory at a time for safetensors."""
    return ((name, tensor) for _, name, tensor in iter_file_tensors(path))


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


def qwen2_tensors(
    model: HFModel, tensors: Iterator[tuple[str, torch.Tensor]] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors (or ``tensors``, read from it) under Qwen2 names, whatever its
    naming scheme."""
    tensors = iter_tensors(model.path) if tensors is None else tensors
    if model.naming == "qwen":
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
