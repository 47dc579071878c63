"""Locks that a forked child gets afresh.

A thread of the parent may hold a lock when the process forks; in the child that thread does not exist,
so it never releases the lock and the child's first caller waits forever (a DataLoader worker forked
while another thread compiles a kernel, for example). Every `ForkSafeLock` is replaced by a new,
unheld one in the child.
"""

from __future__ import annotations

import os
import threading
import weakref

_every_lock: weakref.WeakSet = weakref.WeakSet()


class ForkSafeLock:
    """A threading.Lock (or RLock, with `reentrant`) that is unheld again in a forked child."""

    def __init__(self, reentrant: bool = False):
        self._factory = threading.RLock if reentrant else threading.Lock
        self._lock = self._factory()
        _every_lock.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = self._factory()


def _after_fork_in_child() -> None:
    for lock in list(_every_lock):
        lock._renew()


os.register_at_fork(after_in_child=_after_fork_in_child)
