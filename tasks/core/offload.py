"""CPU-heavy validation, run off the gevent hub.

Every stream of a web process is a greenlet on one hub: pure-Python work in a handler (a
JSON schema's metaschema check costs ~20 ms per KB) froze them all, ``/health`` included.
``off_hub`` runs such work in a thread: the interpreter hands the GIL back to the hub thread
every switch interval (5 ms), so greenlets keep running while it computes. One thread per
process, not the hub's pool of ten: each computing thread is one more in line for the GIL,
and with 8 large schemas validated at once ``/health`` took 1.1 s with ten threads; with
one, a request waits its turn (a greenlet waiting costs nothing).

That helps Python code only: a C call that holds the GIL (``json.loads`` of a whole body)
blocks anyway, so what reaches here must also be bounded (``config.settings``). The function
runs in another thread, so it must not touch Flask's request or app context.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from typing import TypeVar

from gevent import monkey
from gevent.threadpool import ThreadPool

T = TypeVar("T")


@cache
def _pool() -> ThreadPool:
    # Made on first use, so in the process that serves (after gunicorn forks). Every socket
    # call of the hub releases the GIL and then waits for the switch interval to get it
    # back from a computing thread: during validations a /health took 30 ms (median; at
    # most 93) at Python's default 5 ms, and 16-22 ms (at most ~55) at 1 ms. Without a
    # computing thread there is no one to switch to, so the web loses nothing.
    sys.setswitchinterval(0.001)
    return ThreadPool(maxsize=1)


def off_hub(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in the validation thread when running under gevent (its exception
    raised here), else in place."""
    if not monkey.is_module_patched("threading"):
        return fn(*args)
    return _pool().apply(fn, args)
