"""Issue 22, item 6: a fork while another thread holds one of dcn_tvm's in-process locks must not leave
the child waiting forever on it."""

import os
import threading

import pytest

from dcn_tvm.forksafe import ForkSafeLock
from dcn_tvm.kernels import cache, runtime
from dcn_tvm.ops import scratch, shapes
from dcn_tvm.tuning import store


def _in_child_while_held(lock, child) -> int:
    """Hold `lock` in another thread, fork, run `child()` in the child with an alarm as the bound;
    the child's exit status (0: `child` returned)."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 if child() returns, killed by the alarm if it hangs
            import signal
            signal.alarm(10)
            try:
                child()
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    return status


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_lock_held_by_another_thread_at_fork_is_free_in_the_child(reentrant):
    lock = ForkSafeLock(reentrant)
    assert _in_child_while_held(lock, lambda: lock.acquire(timeout=5) or os._exit(2)) == 0
    # without the renewal the child would time out: a plain lock held the same way stays held
    plain = threading.Lock()
    assert _in_child_while_held(plain, lambda: plain.acquire(timeout=0.5) or os._exit(2)) >> 8 == 2


def test_every_process_wide_lock_is_fork_safe():
    for lock in (cache._lock, runtime._lock, scratch._lock, shapes._lock, store._folder_locks_guard):
        assert isinstance(lock, ForkSafeLock)
    assert _in_child_while_held(scratch._lock, scratch.release_scratch) == 0
