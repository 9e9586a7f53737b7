"""Layer-spec resolution and the Transformer Engine check, on simulated machines.

A fake ``transformer_engine`` package written to a temporary directory (optionally with pip's
``dist-info``) stands in for the real one; CUDA is simulated by patching ``torch.cuda``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from base import spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A CUDA machine whose ``transformer_engine`` is what ``install`` writes; returns ``install``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec.why_not_te.cache_clear()

    def install(version: str, pytorch: str = "", dist_info: bool = False) -> Path:
        package = tmp_path / "transformer_engine"
        (package / "pytorch").mkdir(parents=True)
        (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
        # Each import of transformer_engine.pytorch leaves a line in imports.log.
        log = tmp_path / "imports.log"
        (package / "pytorch" / "__init__.py").write_text(
            f"with open({str(log)!r}, 'a') as f:\n    f.write('imported\\n')\n{pytorch}\n"
        )
        if dist_info:
            meta = tmp_path / f"transformer_engine-{version}.dist-info"
            meta.mkdir()
            (meta / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: transformer_engine\nVersion: {version}\n"
            )
        importlib.invalidate_caches()  # the path finder may have listed the directory already
        return log

    yield install
    spec.why_not_te.cache_clear()
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]


def test_a_usable_transformer_engine_is_imported_once(machine) -> None:
    log = machine("2.10.0")
    assert spec.why_not_te() is None and spec.transformer_engine_available()
    assert spec.resolve_spec("auto") == "te"
    del sys.modules["transformer_engine.pytorch"]
    assert spec.why_not_te() is None  # cached: not imported again
    assert log.read_text() == "imported\n"


def test_an_import_error_is_not_available_with_its_first_line(machine) -> None:
    machine(
        "2.10.0",
        pytorch="raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c10\\n"
        "more detail')",
    )
    assert spec.why_not_te() == (
        "import failed: transformer_engine_torch.so: undefined symbol: _ZN3c10"
    )
    assert not spec.transformer_engine_available()
    assert spec.resolve_spec("auto") == "local"


def test_other_import_failures_are_reported_too(machine) -> None:
    machine("2.10.0", pytorch="raise OSError('libcudnn.so.9: cannot open shared object file')")
    assert spec.why_not_te() == "import failed: libcudnn.so.9: cannot open shared object file"


def test_a_version_outside_megatron_cores_range_is_not_available(machine) -> None:
    machine("2.13.0")
    assert spec.why_not_te() == (
        "transformer_engine 2.13.0 is outside megatron-core 0.16.1's range >=2.9.0a0,<2.12.0"
    )
    assert spec.resolve_spec("auto") == "local"


def test_an_installed_version_outside_the_range_is_refused_without_importing(machine) -> None:
    log = machine("2.8.0", dist_info=True)
    assert spec.why_not_te() == (
        "transformer_engine 2.8.0 is outside megatron-core 0.16.1's range >=2.9.0a0,<2.12.0"
    )
    assert not log.exists()


@pytest.mark.parametrize("version", ["2.9.0", "2.11.0+cu12", "2.10.0.dev0+a1b2c3d"])
def test_versions_inside_the_range(machine, version: str) -> None:
    machine(version)
    assert spec.why_not_te() is None


def test_not_installed_and_no_cuda(machine, monkeypatch) -> None:
    if importlib.util.find_spec("transformer_engine") is None:  # a GPU machine may have it
        assert spec.why_not_te().startswith("transformer_engine is not installed")
    spec.why_not_te.cache_clear()
    log = machine("2.10.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert spec.why_not_te() == "no CUDA device"
    assert not log.exists()  # nothing imported without CUDA


def test_resolve_spec() -> None:
    assert spec.resolve_spec("auto", te_available=True) == "te"
    assert spec.resolve_spec("auto", te_available=False) == "local"
    # An explicit spec is kept as asked; the run checks the machine (check_machine).
    assert spec.resolve_spec("te", te_available=False) == "te"
    assert spec.resolve_spec("local", te_available=True) == "local"
    with pytest.raises(ValueError, match="model.spec='fast': must be one of auto, te, local"):
        spec.resolve_spec("fast")


def _te_requirement(requirements: list[str]) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == "transformer-engine"]
    assert len(found) == 1
    return found[0]


def test_the_range_is_megatron_cores_and_the_gpu_extra_pins_it() -> None:
    assert spec.MEGATRON_CORE == f"megatron-core {importlib.metadata.version('megatron-core')}"
    declared = _te_requirement(importlib.metadata.requires("megatron-core"))
    assert declared.specifier == spec.TE_VERSIONS
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _te_requirement(project["optional-dependencies"]["gpu"])
    assert pinned.specifier == spec.TE_VERSIONS and "pytorch" in pinned.extras
    assert "megatron-core==0.16.1" in project["dependencies"]
