"""Reading Hugging Face checkpoints: damaged weight files and invalid config.json are refused with
one line naming the file and the tensor or field; a model of a preset's shape is named after it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from base.hf_checkpoint import HFCheckpointError, read_config, read_safetensors
from base.hf_mapping import qwen2_config
from base.presets import get_preset


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(64, 32, generator=g),
        "small": torch.randn(5, generator=g).to(torch.bfloat16),
        "last": torch.randn(3, 4, generator=g),
    }


def _parts(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + header_len]), raw[8 + header_len :]


def _write(file: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.fixture
def good_file(tmp_path) -> Path:
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    save_file(_tensors(), str(file))
    return file


def test_valid_safetensors_reads_every_tensor_exactly(good_file):
    read = dict(read_safetensors(good_file))
    expected = _tensors()
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def _truncate_half(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def _append_garbage(file: Path) -> None:
    file.write_bytes(file.read_bytes() + b"\0" * 16)


def _edit(change):
    def apply(file: Path) -> None:
        header, data = _parts(file)
        change(header)
        _write(file, header, data)

    return apply


def _offsets(header: dict, name: str, begin: int, end: int) -> None:
    header[name]["data_offsets"] = [begin, end]


def _layout(header: dict) -> dict[str, tuple[int, int]]:
    return {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def _overlap(header: dict) -> None:  # the second tensor starts 4 bytes inside the first
    order = sorted(_layout(header).items(), key=lambda kv: kv[1])
    (_, (_, first_end)), (second, (_, end)) = order[0], order[1]
    _offsets(header, second, first_end - 4, end - 4)


def _gap(header: dict) -> None:  # the last tensor moves 4 bytes on (and the file stays the same)
    name, (begin, end) = max(_layout(header).items(), key=lambda kv: kv[1])
    _offsets(header, name, begin + 4, end + 4)


DAMAGE = {
    # (damage, tensor the message must name: a name, a position in file order, or None when
    # the damage is not a tensor's)
    "truncated to half": (_truncate_half, "big"),
    "trailing bytes": (_append_garbage, None),
    "unknown dtype": (_edit(lambda h: h["small"].update(dtype="F8_E9M9")), "small"),
    "shape != bytes": (_edit(lambda h: h["last"].update(shape=[4, 4])), "last"),
    "begin > end": (_edit(lambda h: _offsets(h, "last", 10, 2)), "last"),
    "offsets not a pair": (_edit(lambda h: h["small"].update(data_offsets=[0])), "small"),
    "overlapping": (_edit(_overlap), 1),
    "gap": (_edit(_gap), -1),
    "entry not an object": (_edit(lambda h: h.update(small=[1, 2])), "small"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_safetensors_is_refused_naming_file_and_tensor_before_any_read(good_file, damage):
    """A truncated (or otherwise inconsistent) file used to be read as zeros past its end."""
    corrupt, tensor = DAMAGE[damage]
    if isinstance(tensor, int):
        in_file_order = sorted(_layout(_parts(good_file)[0]).items(), key=lambda kv: kv[1])
        tensor = in_file_order[tensor][0]
    corrupt(good_file)
    yielded = []
    with pytest.raises(HFCheckpointError) as error:
        for name, _ in read_safetensors(good_file):
            yielded.append(name)
    message = str(error.value)
    assert message.startswith(f"{good_file}: ") and "\n" not in message, message
    if tensor is not None:
        assert f"tensor {tensor}:" in message, message
    assert yielded == [], "nothing may be read from a file whose header does not hold"


@pytest.mark.parametrize(
    "header,problem",
    [
        (b"{not json", "not a safetensors file"),
        (b"[1, 2]", "header is not a JSON object"),
    ],
    ids=["not json", "not an object"],
)
def test_unparseable_safetensors_header_names_the_file(tmp_path, header, problem):
    file = tmp_path / "model.safetensors"
    _write(file, header, b"")
    with pytest.raises(HFCheckpointError, match=problem) as error:
        list(read_safetensors(file))
    assert str(error.value).startswith(f"{file}: ")


def test_safetensors_header_length_past_the_file_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(HFCheckpointError, match="header length 1000000 does not fit") as error:
        list(read_safetensors(file))
    assert str(error.value).startswith(f"{file}: ")


def test_truncated_torch_bin_is_refused_naming_the_file(tmp_path):
    from base.hf_checkpoint import iter_tensors

    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, file)
    _truncate_half(file)
    with pytest.raises(HFCheckpointError) as error:
        list(iter_tensors(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{file}: ") and "truncated" in message and "\n" not in message


# ----------------------------------------------------------------------------- config.json


def _qwen2_config() -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **qwen2_config(get_preset("qwen-nano")),
    }


def _qwen_v1_config() -> dict:
    arch = get_preset("qwen-nano")
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "intermediate_size": 2 * arch.ffn_hidden_size,
        "vocab_size": arch.padded_vocab_size,
        "seq_length": arch.max_position_embeddings,
    }


BAD_CONFIGS = {
    # name: (base config, edit, what the message must say)
    "missing field": (_qwen2_config, lambda c: c.pop("hidden_size"), "missing 'hidden_size'"),
    "string size": (
        _qwen2_config,
        lambda c: c.update(hidden_size="32"),
        "'hidden_size' must be a positive integer, got '32'",
    ),
    "zero heads": (
        _qwen2_config,
        lambda c: c.update(num_attention_heads=0),
        "'num_attention_heads' must be a positive integer, got 0",
    ),
    "fractional layers": (
        _qwen2_config,
        lambda c: c.update(num_hidden_layers=2.5),
        "'num_hidden_layers' must be a positive integer, got 2.5",
    ),
    "boolean vocab": (
        _qwen2_config,
        lambda c: c.update(vocab_size=True),
        "'vocab_size' must be a positive integer, got True",
    ),
    "string rope_theta": (
        _qwen2_config,
        lambda c: c.update(rope_theta="1e6"),
        "'rope_theta' must be a positive finite number, got '1e6'",
    ),
    "rope_parameters not an object": (
        _qwen2_config,
        lambda c: (c.pop("rope_theta"), c.update(rope_parameters="fast")),
        "'rope_parameters' must be a JSON object, got 'fast'",
    ),
    "negative nested rope_theta": (
        _qwen2_config,
        lambda c: (c.pop("rope_theta"), c.update(rope_parameters={"rope_theta": -1})),
        "'rope_parameters.rope_theta' must be a positive finite number, got -1",
    ),
    "string tie flag": (
        _qwen2_config,
        lambda c: c.update(tie_word_embeddings="no"),
        "'tie_word_embeddings' must be true or false, got 'no'",
    ),
    "architectures not a list": (
        _qwen2_config,
        lambda c: c.update(architectures="Qwen2ForCausalLM"),
        "'architectures' must be a list of class names",
    ),
    "v1 string kv_channels": (
        _qwen_v1_config,
        lambda c: c.update(kv_channels="8"),
        "'kv_channels' must be a positive integer, got '8'",
    ),
    "v1 string ntk switch": (
        _qwen_v1_config,
        lambda c: c.update(use_dynamic_ntk="yes"),
        "'use_dynamic_ntk' must be true or false, got 'yes'",
    ),
    "unknown torch_dtype": (
        _qwen2_config,
        lambda c: c.update(torch_dtype="float8_e4m3"),
        "'torch_dtype' must be bfloat16 or float16 or float32, got 'float8_e4m3'",
    ),
    "v1 negative seq_length": (
        _qwen_v1_config,
        lambda c: c.update(seq_length=-1),
        "'seq_length' must be a positive integer, got -1",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_invalid_config_json_is_one_line_naming_file_and_field(tmp_path, case):
    base, edit, expected = BAD_CONFIGS[case]
    config = base()
    assert read_config(_write_config(tmp_path / "ok", config)).arch.hidden_size == 32
    edit(config)
    file = _write_config(tmp_path / "bad", config) / "config.json"
    with pytest.raises(HFCheckpointError) as error:
        read_config(file.parent)
    message = str(error.value)
    assert message.startswith(f"{file}: ") and expected in message and "\n" not in message, message


@pytest.mark.parametrize(
    "text,problem",
    [('{\n  "hidden_size": 32,\n', "not valid JSON"), ("[1]", "expected a JSON object")],
    ids=["not json", "not an object"],
)
def test_unparseable_config_json_names_the_file(tmp_path, text, problem):
    file = tmp_path / "config.json"
    file.write_text(text)
    with pytest.raises(HFCheckpointError, match=problem) as error:
        read_config(tmp_path)
    assert str(error.value).startswith(f"{file}: ") and "\n" not in str(error.value)


def _write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "edit,name",
    [
        ({}, "qwen-nano"),
        ({"num_key_value_heads": None}, "qwen-nano"),  # null: one key/value head per query head
        ({"rope_theta": 1e6}, "qwen-nano+custom"),
        ({"max_position_embeddings": 32768}, "qwen-nano+custom"),
        ({"hidden_size": 64}, "custom"),
    ],
    ids=["same", "null groups", "other rope base", "longer context", "other shape"],
)
def test_model_of_a_presets_shape_is_named_after_the_preset(tmp_path, edit, name):
    """Named plainly after the preset only when it is the preset; +custom when only its RoPE base,
    norm epsilon or context length differ (the name a recipe of that preset would give it)."""
    config = {**_qwen2_config(), **edit}
    assert read_config(_write_config(tmp_path, config)).arch.name == name
