import os

import pytest
import torch

# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-wait stalls on a busy
# 2-core machine (seen: 100x slower steps with 2 threads while another process ran).
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run one test with float64 as the default dtype, restoring it afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MSAM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow study/benchmark: set MSAM_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
