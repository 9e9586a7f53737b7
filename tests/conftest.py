import gzip
import sysconfig
import warnings
from pathlib import Path

import pytest

# megatron-core announces each optional kernel it falls back from; on CPU that is expected.
warnings.filterwarnings(
    "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed"
)

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_TRAIN = FIXTURES / "gsm8k" / "train.jsonl.gz"  # MIT, see its README.md
MATH401_SAMPLE = FIXTURES / "math401" / "sample.jsonl"  # Math401's schema, our own expressions
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def gsm8k_train_lines() -> list[str]:
    """The JSONL lines of the GSM8K training split (7,473 problems)."""
    return gzip.decompress(GSM8K_TRAIN.read_bytes()).decode("utf-8").splitlines()


def shipped_recipes() -> list[Path]:
    """Every training recipe under configs/: not pipelines (they list ``steps``) nor evaluation
    configs (``configs/eval``)."""
    return sorted(
        path
        for path in CONFIGS.rglob("*.yaml")
        if "\nsteps:" not in "\n" + path.read_text() and path.parent.name != "eval"
    )


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None:
        return
    skip = pytest.mark.skip(reason="needs CUDA and Transformer Engine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


STDLIB_PACKAGES = ("json", "email", "http", "urllib", "logging", "xml", "asyncio")


@pytest.fixture(scope="session")
def stdlib_shard(tmp_path_factory) -> str:
    """A few standard-library packages prepared by `data prepare`; returns the directory."""
    from base.tokenizer import QwenTokenizer
    from specialize.data.prepare import PrepareOptions, prepare
    from specialize.data.sources import Source, SourceOptions

    out = tmp_path_factory.mktemp("stdlib") / "stdlib"
    sources = [Source("directory", str(STDLIB / p)) for p in STDLIB_PACKAGES]
    prepare(
        sources,
        out,
        QwenTokenizer.load(),
        PrepareOptions(SourceOptions(extensions=(".py",)), filters=(), workers=0),
    )
    return str(out)
