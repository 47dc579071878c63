"""The CPU kernels run on torch's thread count (dcn_tvm.kernels.threads): TVM's pool follows
torch.set_num_threads, TVM_NUM_THREADS overrides it, and the caller is never pinned to one core.
Fresh interpreters: a TVM pool is sized when first used on a thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = """
import json, os, torch, dcn_tvm
from dcn_tvm.kernels.threads import pool_size
x, offset, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.randn(4, 4, 3, 3)
affinity, seen = os.sched_getaffinity(0), []
for count, override in ((1, None), (2, None), (1, None), (2, None), (2, "1"), (1, "2")):
    torch.set_num_threads(count)
    if override:
        os.environ["TVM_NUM_THREADS"] = override  # read again at each call, as torch's count is
    dcn_tvm.deform_conv2d(x, offset, weight, padding=1)
    seen.append(pool_size())
print(json.dumps({"pool": seen, "pinned": os.sched_getaffinity(0) != affinity,
                  "spin": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")}))
"""


def run_child() -> dict:
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_pool_follows_torch_and_tvm_num_threads_overrides(monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    assert run_child() == {"pool": [1, 2, 1, 2, 1, 2], "pinned": False, "spin": "0"}
