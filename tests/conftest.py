import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be switched on
# before the kernels are defined (lori_kernels imports them on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lori_kernels import _extension  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden():
    """LoRI-RNG v1 known answers (a copy of shared/rng_golden_v1.json; test_rng checks it)."""
    return json.loads((DATA / "rng_golden_v1.json").read_text())


@pytest.fixture(scope="session")
def ext():
    """Skip unless lori_kernels._C is built; with LORI_REQUIRE_EXT=1 (make test) a missing
    build fails instead, so CI cannot pass without compiling the extension."""
    error = _extension.load_error()
    if error is not None:
        if os.environ.get("LORI_REQUIRE_EXT") == "1":
            pytest.fail(f"LORI_REQUIRE_EXT=1 but {error}")
        pytest.skip(error)
    return torch.ops.lori


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
