"""Which layer spec a machine runs: ``model.spec`` resolution and the Transformer Engine check.

The one place that decides between ``te`` (Transformer Engine kernels) and ``local`` (plain
PyTorch). It does not import megatron-core, so the config validates recipes with it cheaply.
Transformer Engine counts as usable only when there is a CUDA device, its version is in the range
megatron-core declares, and ``transformer_engine.pytorch`` imports; otherwise ``why_not_te`` says
which of these failed, in one line.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SPECS = ("auto", "te", "local")

MEGATRON_CORE = "megatron-core 0.16.1"
# megatron-core 0.16.1's own bound on Transformer Engine, as its wheel declares it: NVIDIA/Megatron-LM
# pyproject.toml at core_v0.16.1 (55ac7082517c3878ae653c07c09c534b8aed49f6), line 71. The `gpu`
# extra in our pyproject.toml pins the same range.
TE_RANGE = ">=2.9.0a0,<2.12.0"
TE_VERSIONS = SpecifierSet(TE_RANGE)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _version_problem(version: str) -> str | None:
    try:
        inside = TE_VERSIONS.contains(Version(version), prereleases=True)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return f"transformer_engine {version} is outside {MEGATRON_CORE}'s range {TE_RANGE}"


@functools.cache
def why_not_te() -> str | None:
    """Why the ``te`` spec cannot run on this machine (one line), or None when it can.

    Imports ``transformer_engine.pytorch`` at most once per process (the answer is cached), and
    only on a CUDA machine; a version outside the range is refused without importing it.
    """
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    try:  # the installed distribution's version, when pip knows it (not for source checkouts)
        installed = importlib.metadata.version("transformer_engine")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and (problem := _version_problem(installed)):
        return problem
    try:
        importlib.import_module("transformer_engine.pytorch")
    except ModuleNotFoundError as e:
        if e.name == "transformer_engine":
            return "transformer_engine is not installed (pip install -e '.[gpu]')"
        return f"import failed: {_first_line(e)}"
    except Exception as e:  # a build for another torch or CUDA fails in many ways
        return f"import failed: {_first_line(e)}"
    if installed is None:
        version = getattr(importlib.import_module("transformer_engine"), "__version__", None)
        if version is None:
            return "transformer_engine has no __version__ to check against megatron-core's range"
        return _version_problem(str(version))
    return None


def transformer_engine_available() -> bool:
    """CUDA and a Transformer Engine megatron-core can use are both present."""
    return why_not_te() is None


def resolve_spec(requested: str, te_available: bool | None = None) -> str:
    """``te`` or ``local`` for ``model.spec``: ``auto`` is ``te`` where Transformer Engine is
    usable (``te_available``; None: this machine), else ``local``. An explicit spec is kept as
    asked; whether this machine can run ``te`` is checked when a run starts."""
    if requested not in SPECS:
        raise ValueError(f"model.spec={requested!r}: must be one of {', '.join(SPECS)}")
    if requested != "auto":
        return requested
    if te_available is None:
        te_available = transformer_engine_available()
    return "te" if te_available else "local"
