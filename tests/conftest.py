import warnings
from pathlib import Path

import pytest

# megatron-core announces each optional kernel it falls back from; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA and Transformer Engine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
