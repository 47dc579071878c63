import os
import tempfile

import pytest
import torch

# Kernels compile into a cache private to this test session unless the caller points elsewhere.
os.environ.setdefault("DCN_TVM_CACHE_DIR", tempfile.mkdtemp(prefix="dcn_tvm_test_cache_"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
