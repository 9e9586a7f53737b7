"""Import of Hugging Face Qwen checkpoints (Qwen2 and Qwen v1 naming schemes), checked against transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from base.presets import QwenPreset, get_preset
from base.tokenizer import NUM_RANKS
from tests.base.test_hf_mapping import GQA, hf_model
from tests.distributed import run_distributed

TOKENS = torch.randint(0, NUM_RANKS, (2, 24), generator=torch.Generator().manual_seed(3))


def write_qwen_v1(model, arch: QwenPreset, path: Path) -> None:
    """The same weights in Qwen v1 names (QWenLMHeadModel), as pytorch_model.bin."""
    sd = model.state_dict()
    v1 = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(arch.num_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            v1[f"{q}attn.c_attn.{kind}"] = torch.cat(
                [sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            )
        v1[f"{q}ln_1.weight"] = sd[f"{p}input_layernorm.weight"]
        v1[f"{q}ln_2.weight"] = sd[f"{p}post_attention_layernorm.weight"]
        v1[f"{q}attn.c_proj.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        v1[f"{q}mlp.w2.weight"] = sd[f"{p}mlp.gate_proj.weight"]
        v1[f"{q}mlp.w1.weight"] = sd[f"{p}mlp.up_proj.weight"]
        v1[f"{q}mlp.c_proj.weight"] = sd[f"{p}mlp.down_proj.weight"]
    path.mkdir(parents=True)
    torch.save({k: v.clone() for k, v in v1.items()}, path / "pytorch_model.bin")
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "intermediate_size": 2 * arch.ffn_hidden_size,
        "kv_channels": arch.kv_channels,
        "layer_norm_epsilon": arch.norm_epsilon,
        "rotary_emb_base": arch.rotary_base,
        "rotary_pct": 1.0,
        "seq_length": arch.max_position_embeddings,
        "vocab_size": arch.padded_vocab_size,
        "fp32": True,
        "use_dynamic_ntk": True,  # Qwen v1's long-context switches: imported, exported back
        "use_logn_attn": True,
    }
    (path / "config.json").write_text(json.dumps(config))
    # Qwen v1's generation defaults, as its checkpoints publish them.
    generation = {"chat_format": "raw", "eos_token_id": 151643, "max_new_tokens": 512}
    generation |= {"do_sample": True, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1}
    (path / "generation_config.json").write_text(json.dumps(generation))


def _import(rank: int, world_size: int, hf_dir: str, out: str) -> dict:
    from specialize.convert.hf import import_hf

    return import_hf(hf_dir, out)


def _export(rank: int, world_size: int, ckpt: str, out: str, fmt: str) -> dict:
    from specialize.convert.hf import export_hf

    return export_hf(
        ckpt, out, fmt=fmt, max_shard_bytes=8 * 2**20
    )  # small shards: exercise the index


def _logits(rank: int, world_size: int, ckpt: str, overrides: list[str]) -> torch.Tensor:
    from specialize.checkpoint import resolve_checkpoint
    from specialize.checkpoint.state import load_weights
    from specialize.config import derive, load_config
    from specialize.infer.logits import full_logits
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    results = {}
    for layout in (["parallel.tensor=1"], ["parallel.tensor=2"], ["parallel.pipeline=2"]):
        cfg = load_config(
            "configs/base/qwen-nano.yaml",
            [
                "train.steps=1",
                "schedule.warmup_steps=0",
                "train.global_batch_size=8",
                *overrides,
                *layout,
            ],
        )
        topo = init_distributed(cfg.parallel)
        seed_all(7)
        engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
        load_weights(engine, resolve_checkpoint(ckpt))
        results[layout[0]] = full_logits(engine.model[0], TOKENS)
    return results


@pytest.mark.parametrize(
    "naming,arch,overrides",
    [
        ("qwen2", get_preset("qwen-nano"), []),
        ("qwen", get_preset("qwen-nano"), []),
        ("qwen2", GQA, ["model.num_query_groups=2"]),
    ],
    ids=["qwen2-mha", "qwen-v1", "qwen2-gqa"],
)
def test_import_matches_transformers_at_tp1_tp2_pp2(tmp_path, naming, arch, overrides):
    reference = hf_model(arch)
    hf_dir = tmp_path / "hf"
    if naming == "qwen2":
        reference.save_pretrained(hf_dir)
    else:
        write_qwen_v1(reference, arch, hf_dir)
    report = run_distributed(_import, str(hf_dir), str(tmp_path / "ckpt"), world_size=1)
    assert report["layout"] == naming and report["dtype"] == "kept fp32 as stored"
    assert report["architecture"] == ("qwen-nano" if arch.name == "qwen-nano" else "custom")
    assert (tmp_path / "ckpt" / "qwen.tiktoken").is_file() and (
        tmp_path / "ckpt" / "arch.json"
    ).is_file()
    with torch.no_grad():
        expected = reference(TOKENS).logits
    results = run_distributed(_logits, str(tmp_path / "ckpt"), overrides)
    for name, logits in results.items():
        diff = (logits[..., : expected.shape[-1]] - expected).abs().max().item()
        assert diff <= 1e-4, f"{naming} {name}: max |Δlogit| {diff}"

    # Back to Hugging Face: every tensor bit-exact, and transformers loads it without remote code.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = tmp_path / "hf-out"
    report = run_distributed(_export, str(tmp_path / "ckpt"), str(exported), "qwen2", world_size=1)
    assert report["shards"] > 1 and (exported / "model.safetensors.index.json").is_file()
    tensors = {}
    for file in sorted(exported.glob("*.safetensors")):
        tensors.update(load_file(file))
    original = reference.state_dict()
    assert tensors.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151643, 151645]
    reloaded = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, expected)
    if naming == "qwen2" and arch.name == "qwen-nano":  # the tokenizer files, once
        import sysconfig

        from transformers import AutoTokenizer

        from base.tokenizer import QwenTokenizer

        ours, theirs = QwenTokenizer.load(), AutoTokenizer.from_pretrained(exported)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [p.read_text(encoding="utf-8") for p in sorted((stdlib / "json").glob("*.py"))]
        texts += ["def hello():", "12345 + 678", "Grüße, 世界! 🚀\n\n\tx"]
        for text in texts:
            assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        chat = "<|im_start|>user\nhi<|im_end|>\n"
        assert theirs.encode(chat, add_special_tokens=False)[0] == 151644
    if naming == "qwen":  # the original v1 names come back too
        v1 = tmp_path / "hf-v1-out"
        run_distributed(_export, str(tmp_path / "ckpt"), str(v1), "qwen", world_size=1)
        written = {}
        for file in sorted(v1.glob("*.safetensors")):
            written.update(load_file(file))
        source = torch.load(hf_dir / "pytorch_model.bin")
        assert written.keys() == source.keys()
        for name, tensor in source.items():
            assert torch.equal(written[name], tensor), name
        from specialize.infer.model import stored_long_context

        options = stored_long_context(tmp_path / "ckpt")
        assert options.rope_scaling == "dynamic-ntk" and options.logn_attention is True
        checksums = json.loads((tmp_path / "ckpt" / "checksums.json").read_text())["files"]
        assert "long_context.json" in checksums  # the options are verified like the weights
        # The source's generation defaults come along, verified too (the `paper` protocols use
        # its repetition_penalty, as transformers' generate does).
        from specialize.checkpoint import read_generation_config

        assert read_generation_config(tmp_path / "ckpt")["repetition_penalty"] == 1.1
        assert "generation_config.json" in checksums
        # ... and go out again: the decoding defaults, with both stop ids, without "raw".
        exported_generation = json.loads((v1 / "generation_config.json").read_text())
        assert exported_generation == {
            "do_sample": True,
            "top_k": 0,
            "top_p": 0.8,
            "repetition_penalty": 1.1,
            "max_new_tokens": 512,
            "bos_token_id": 151643,
            "eos_token_id": [151643, 151645],
            "pad_token_id": 151643,
        }
        config = json.loads((v1 / "config.json").read_text())
        assert (config["use_dynamic_ntk"], config["use_logn_attn"]) == (True, True)
        assert config["seq_length"] == arch.max_position_embeddings


def _import_errors(rank: int, world_size: int, cases: dict[str, tuple[str, str]]) -> dict[str, str]:
    from base.hf_checkpoint import HFCheckpointError
    from specialize.convert.hf import import_hf

    messages = {}
    for name, (hf_dir, out) in cases.items():
        try:
            import_hf(hf_dir, out)
            messages[name] = "no error"
        except HFCheckpointError as e:
            messages[name] = str(e)
    return messages


def test_bad_checkpoints_are_refused_and_nothing_is_written(tmp_path):
    from safetensors.torch import load_file, save_file

    arch = get_preset("qwen-nano")
    good = tmp_path / "good"
    hf_model(arch).save_pretrained(good)
    weights = load_file(good / "model.safetensors")
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, edit_weights=None, edit_config=None) -> tuple[str, str]:
        path = tmp_path / name
        path.mkdir()
        w = dict(weights)
        if edit_weights:
            edit_weights(w)
        save_file(w, path / "model.safetensors")
        c = dict(config)
        if edit_config:
            edit_config(c)
        (path / "config.json").write_text(json.dumps(c))
        return str(path), str(tmp_path / f"out-{name}")

    k = "model.layers.1.self_attn.k_proj.weight"
    cases = {
        "missing": variant("missing", lambda w: w.pop(k)),
        "misshaped": variant("misshaped", lambda w: w.__setitem__(k, torch.zeros(16, 32))),
        "unexpected": variant(
            "unexpected", lambda w: w.__setitem__("model.layers.0.extra.weight", torch.zeros(2))
        ),
        "heads": variant("heads", edit_config=lambda c: c.update(num_key_value_heads=3)),
        "vocab": variant("vocab", edit_config=lambda c: c.update(vocab_size=152064)),
        "architecture": variant(
            "architecture",
            edit_config=lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
        ),
    }
    messages = run_distributed(_import_errors, cases, world_size=1)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in messages["missing"]
    assert f"{k}: expected shape (32, 32), got (16, 32)" in messages["misshaped"]
    assert "model.layers.0.extra.weight: unexpected tensor" in messages["unexpected"]
    assert (
        "do not fit" in messages["heads"]
        and "must divide the 4 attention heads" in messages["heads"]
    )
    assert "unsupported architecture ['LlamaForCausalLM']" in messages["architecture"]
    for name in cases:
        assert not (tmp_path / f"out-{name}").exists(), name
        assert not (tmp_path / f".out-{name}.partial").exists(), name


def _verify_runs(rank: int, world_size: int, good: str, bad: str, ckpt: str) -> dict:
    from specialize.convert.parity import ParityError, verify

    passed = verify(good, ckpt, tp=2)
    try:
        verify(bad, ckpt, tp=2)
        failure = "no error"
    except ParityError as e:
        failure = str(e)
    return {"passed": passed, "failure": failure}


def _gated_training(
    rank: int, world_size: int, ckpt: str, reference: str, shard: str, run_dir: str
) -> str:
    from specialize.config import load_config
    from specialize.convert.parity import ParityError
    from specialize.train.run import train

    overrides = [
        f"init={ckpt}",
        f"init.verify_against={reference}",
        f"data.paths=[{shard}]",
        "data.split=95,5,0",
        "train.steps=1",
        "schedule.warmup_steps=0",
        "data.seq_length=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        f"checkpoint.dir={run_dir}",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    try:
        train(load_config("configs/base/qwen-nano.yaml", overrides))
    except ParityError as e:
        return str(e)
    return "trained"


def test_parity_gate_reports_the_first_diverging_layer(tmp_path, stdlib_shard):
    from safetensors.torch import load_file, save_file

    arch = get_preset("qwen-nano")
    good = tmp_path / "good"
    hf_model(arch).save_pretrained(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    weights = load_file(good / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] = (
        weights["model.layers.1.mlp.down_proj.weight"] + 0.05
    )
    save_file(weights, bad / "model.safetensors")
    (bad / "config.json").write_text((good / "config.json").read_text())
    run_distributed(_import, str(good), str(tmp_path / "ckpt"), world_size=1)

    out = run_distributed(_verify_runs, str(good), str(bad), str(tmp_path / "ckpt"))
    assert len(out["passed"]) == arch.num_layers + 1 and out["passed"][-1].startswith("logits")
    assert (
        "first diverging layer 1" in out["failure"] and "layer   0: max |Δhidden|" in out["failure"]
    )
    assert "layer   1" in out["failure"] and "<-- over tolerance" in out["failure"]

    args = (str(tmp_path / "ckpt"), str(bad), stdlib_shard, str(tmp_path / "run-bad"))
    assert "first diverging layer 1" in run_distributed(_gated_training, *args, world_size=1)
    args = (str(tmp_path / "ckpt"), str(good), stdlib_shard, str(tmp_path / "run-good"))
    assert run_distributed(_gated_training, *args, world_size=1) == "trained"


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    from safetensors.torch import load_file

    from specialize.infer.model import checkpoint_dtype

    reference = hf_model(get_preset("qwen-nano")).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf")
    report = run_distributed(_import, str(tmp_path / "hf"), str(tmp_path / "ckpt"), world_size=1)
    assert report["dtype"] == "kept bf16 as stored"
    assert checkpoint_dtype(tmp_path / "ckpt") == "bf16"  # what eval and generation run it in
    run_distributed(_export, str(tmp_path / "ckpt"), str(tmp_path / "out"), "qwen2", world_size=1)
    written = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(file))
    for name, tensor in reference.state_dict().items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _cli(rank: int, world_size: int, commands: list[list[str]], umask: int | None = None) -> list:
    """(exit code, stderr) of ``specialize`` commands run in this process."""
    import contextlib
    import io
    import os

    from specialize.cli import main

    if umask is not None:
        os.umask(umask)
    stderr, results = io.StringIO(), []
    with contextlib.redirect_stderr(stderr):
        for argv in commands:
            start = len(stderr.getvalue())
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
            results.append((code, stderr.getvalue()[start:]))
    return results


def _error_line(stderr: str) -> str:
    """The one user-facing error line (and no traceback) of a refused command."""
    assert "Traceback" not in stderr, stderr
    lines = [
        line
        for line in stderr.splitlines()
        if line.startswith(("conversion error: ", "checkpoint error: "))
    ]
    assert len(lines) == 1, stderr
    return lines[0]


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not (out.parent / f".{out.name}.partial").exists()


def test_import_refuses_truncated_or_nonfinite_weights_and_bad_config_writing_nothing(tmp_path):
    """A safetensors file cut to half its size used to import as zeros (exit 0); NaN/Inf weights
    imported silently; a config.json of the wrong types gave a traceback."""
    from safetensors.torch import load_file, save_file

    arch = get_preset("qwen-nano")
    reference = hf_model(arch)
    good = tmp_path / "good"
    reference.save_pretrained(good)

    def variant(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file in good.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
        return path

    truncated = variant("truncated")
    weights_file = truncated / "model.safetensors"
    os.truncate(weights_file, weights_file.stat().st_size // 2)

    nonfinite = variant("nonfinite")
    weights = load_file(nonfinite / "model.safetensors")
    poisoned = {
        "model.layers.0.mlp.up_proj.weight": float("nan"),
        "model.norm.weight": float("inf"),
    }
    for name, value in poisoned.items():
        weights[name][0] = value
    save_file(weights, nonfinite / "model.safetensors")

    bad_config = variant("bad-config")
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))

    v1_bin = tmp_path / "v1-bin"
    write_qwen_v1(reference, arch, v1_bin)
    bin_file = v1_bin / "pytorch_model.bin"
    os.truncate(bin_file, bin_file.stat().st_size // 2)

    bad_generation = variant("bad-generation")
    (bad_generation / "generation_config.json").write_text('{"repetition_penalty": 1.1,')

    def imported(source: Path, *flags: str) -> list[str]:
        out = tmp_path / f"out-{source.name}{''.join(flags)}"
        return ["convert", "import", "--hf", str(source), "-o", str(out), *flags]

    cases = [truncated, nonfinite, bad_config, v1_bin, bad_generation]
    results = run_distributed(
        _cli,
        [imported(c) for c in cases] + [imported(nonfinite, "--allow-nonfinite")],
        world_size=1,
    )
    for source, (code, _) in zip(cases, results):
        assert code == 2, source.name
        assert _nothing_written(tmp_path / f"out-{source.name}"), source.name
    lines = {source.name: _error_line(stderr) for source, (_, stderr) in zip(cases, results)}

    assert lines["truncated"].startswith(f"conversion error: {weights_file}: tensor ")
    named = lines["truncated"].split(": tensor ")[1].split(":")[0]
    assert named in reference.state_dict() and "truncated" in lines["truncated"]
    assert lines["nonfinite"].startswith(f"conversion error: {nonfinite / 'model.safetensors'}: ")
    named = lines["nonfinite"].split(": tensor ")[1].split(" ")[0]
    assert named in poisoned and "NaN/Inf" in lines["nonfinite"]
    assert (
        f"{bad_config / 'config.json'}: 'hidden_size' must be a positive integer"
        in lines["bad-config"]
    )
    assert (
        lines["v1-bin"].startswith(f"conversion error: {bin_file}: ")
        and "truncated" in lines["v1-bin"]
    )
    assert lines["bad-generation"].startswith(
        f"conversion error: {bad_generation / 'generation_config.json'}: unreadable generation"
    )

    code, stderr = results[-1]  # --allow-nonfinite: imported, counted, recorded
    assert code == 0
    assert "2 tensors hold NaN/Inf values" in stderr
    report = json.loads(
        (tmp_path / "out-nonfinite--allow-nonfinite" / "conversion.json").read_text()
    )
    assert sorted(report["nonfinite_tensors"]) == sorted(poisoned)


def _damage(ckpt: Path, name: str, fn) -> Path:
    import shutil

    copy = ckpt.parent / f"ckpt-{name}"
    shutil.copytree(ckpt, copy)
    fn(copy)
    return copy


# Neither 0600 nor the usual 0644 comes out of this umask by accident.
EXPORT_UMASK = 0o027


@pytest.fixture(scope="module")
def nano_exported(tmp_path_factory) -> Path:
    """A qwen-nano HF model imported (``ckpt``) and exported (``exported``) under EXPORT_UMASK."""
    root = tmp_path_factory.mktemp("nano")
    hf_model(get_preset("qwen-nano")).save_pretrained(root / "hf")
    commands = [
        ["convert", "import", "--hf", str(root / "hf"), "-o", str(root / "ckpt")],
        ["convert", "export", str(root / "ckpt"), "-o", str(root / "exported")],
    ]
    results = run_distributed(_cli, commands, EXPORT_UMASK, world_size=1)
    assert [code for code, _ in results] == [0, 0], results
    return root


def test_export_or_verify_of_a_damaged_checkpoint_or_to_a_file_is_one_line_exit_2(
    tmp_path, nano_exported
):
    """Each used to end in a torch/megatron traceback (exit 1) that did not name the checkpoint."""
    import shutil

    shutil.copytree(nano_exported / "hf", tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(nano_exported / "ckpt", ckpt)

    def truncate(file: str):
        return lambda c: os.truncate(c / file, (c / file).stat().st_size // 2)

    def remove(file: str):
        return lambda c: (c / file).unlink()

    distcp = sorted(p.name for p in ckpt.glob("*.distcp"))[-1]
    damaged = {
        "truncated-distcp": _damage(ckpt, "truncated-distcp", truncate(distcp)),
        "missing-distcp": _damage(ckpt, "missing-distcp", remove(distcp)),
        "truncated-index": _damage(ckpt, "truncated-index", truncate(".metadata")),
        "missing-index": _damage(ckpt, "missing-index", remove(".metadata")),
        "truncated-common": _damage(ckpt, "truncated-common", truncate("common.pt")),
        "missing-common": _damage(ckpt, "missing-common", remove("common.pt")),
        "missing-arch": _damage(ckpt, "missing-arch", remove("arch.json")),
        "garbled-arch": _damage(
            ckpt, "garbled-arch", lambda c: (c / "arch.json").write_text('{"hidden_size": 32}')
        ),
        "missing-metadata": _damage(ckpt, "missing-metadata", remove("metadata.json")),
    }
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    commands = [
        ["convert", "export", str(c), "-o", str(tmp_path / f"hf-{n}")] for n, c in damaged.items()
    ]
    not_json = tmp_path / "hf-not-json"
    not_json.mkdir()
    (not_json / "config.json").write_text("{")
    verify = ["convert", "verify", "--hf"]
    commands += [
        ["convert", "export", str(ckpt), "-o", str(a_file)],
        ["convert", "export", str(ckpt), "-o", str(a_file / "inside")],
        [*verify, str(tmp_path / "hf"), "--ckpt", str(damaged["truncated-distcp"])],
        [*verify, str(not_json), "--ckpt", str(ckpt)],
    ]
    results = run_distributed(_cli, commands, world_size=1)

    for (name, copy), (code, stderr) in zip(damaged.items(), results):
        line = _error_line(stderr)
        assert code == 2, (name, stderr)
        assert line.startswith(f"checkpoint error: {copy}"), (name, line)
        assert _nothing_written(tmp_path / f"hf-{name}"), name
    into_file, under_file, verify_damaged, verify_not_json = results[len(damaged) :]
    for code, stderr in (into_file, under_file):
        assert code == 2
        assert _error_line(stderr) == f"conversion error: {a_file}: exists and is not a directory"
    assert a_file.read_text() == "keep me\n"
    code, stderr = verify_damaged
    assert code == 2
    assert _error_line(stderr).startswith(f"checkpoint error: {damaged['truncated-distcp']}: ")
    code, stderr = verify_not_json
    assert code == 2
    assert _error_line(stderr).startswith(f"conversion error: {not_json / 'config.json'}: ")


def test_exported_files_get_the_umask_mode_not_0600(nano_exported):
    """safetensors writes a 0600 temporary file and renames it: the weights were private while
    the config beside them was not."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in (nano_exported / "exported").iterdir()}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~EXPORT_UMASK), modes


def test_layout_of_a_preset_shaped_checkpoint_is_named_after_the_preset():
    """A qwen-nano checkpoint was built (and named in messages) as qwen-tiny+custom."""
    import dataclasses

    from specialize.convert.hf import recipe_for, recipe_model_fields

    nano = get_preset("qwen-nano")
    assert recipe_for(nano, 1, 1).model.architecture() == nano
    assert recipe_model_fields(nano) == {"preset": "qwen-nano"}

    longer_rope = dataclasses.replace(nano, name="qwen-nano+custom", rotary_base=1e6)
    assert recipe_for(longer_rope, 1, 1).model.architecture() == longer_rope
    assert recipe_model_fields(longer_rope) == {"preset": "qwen-nano", "rotary_base": 1e6}

    other = dataclasses.replace(nano, name="custom", hidden_size=64)
    built = recipe_for(other, 1, 1).model.architecture()
    assert dataclasses.replace(built, name="custom") == dataclasses.replace(
        other, num_query_groups=4
    )
