import os
import shutil
import sys
import tempfile
import uuid

import pytest
import torch

# Kernels compile into a cache private to this test session, removed at its end, unless the caller
# points elsewhere (processes the tests start inherit it).
PRIVATE_CACHE = None if "DCN_TVM_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="dcn_tvm_test_cache_")
if PRIVATE_CACHE:
    os.environ["DCN_TVM_CACHE_DIR"] = PRIVATE_CACHE
# Every process this session starts inherits this mark, so it is found even once orphaned.
SESSION_MARK = ("DCN_TVM_TEST_SESSION", uuid.uuid4().hex)
os.environ[SESSION_MARK[0]] = SESSION_MARK[1]


def pytest_unconfigure(config):
    if PRIVATE_CACHE:
        shutil.rmtree(PRIVATE_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _exits_with_pytest(process) -> bool:
    """multiprocessing's resource tracker of this very process: it ends when pytest does."""
    return process.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(process.cmdline())


def _started_by_this_session(psutil) -> list:
    """The live processes that carry this session's mark (children, and orphans of killed ones)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE and \
                    process.environ().get(SESSION_MARK[0]) == SESSION_MARK[1] and not _exits_with_pytest(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Fail the run if a process the tests started (e.g. MetaSchedule's tvm.exec.popen_worker) is
    still alive at the end; such processes are killed, then reported."""
    import psutil

    yield
    if "torch._inductor.async_compile" in sys.modules:  # torch.compile's worker pool, torch's to end
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
    # A process may be exiting right now (a subprocess of the last test): give it a moment.
    _, alive = psutil.wait_procs(_started_by_this_session(psutil), timeout=10)
    left = []
    for process in alive:
        try:
            left.append(f"{process.pid}: {' '.join(process.cmdline())}")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    if left:
        pytest.fail("processes started by the tests were still alive at the end:\n" + "\n".join(left), pytrace=False)


@pytest.fixture
def simulated_gpu_of(monkeypatch):
    """`simulated_gpu_of(*op_modules)`: a context manager factory inside whose context those dcn_tvm.ops
    modules run their CUDA kernels (sm_90) on the simulated GPU (tests/gpusim.py); the test is skipped
    without pyopencl or an OpenCL device."""
    pytest.importorskip("pyopencl", reason="the simulated GPU needs pyopencl and an OpenCL device (PoCL)")
    import gpusim

    missing = gpusim.available()
    if missing:
        pytest.skip(f"the simulated GPU needs an OpenCL device: {missing}")
    return lambda *modules: gpusim.simulating(monkeypatch, *modules)
