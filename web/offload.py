"""CPU-heavy validation, run off the gevent hub.

Every stream of a web process is a greenlet on one hub: pure-Python work in a handler (a
JSON schema's metaschema check costs ~15 ms per KB) froze them all, ``/health`` included.
``off_hub`` runs such work in the hub's thread pool: the interpreter hands the GIL back to
the hub thread every switch interval (5 ms), so greenlets keep running while it computes.
That helps Python code only — a C call that holds the GIL (``json.loads`` of a whole body)
blocks anyway, so what reaches here must also be bounded (``config.settings``).

The function runs in another thread: it must not touch Flask's request or app context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


def off_hub(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in the hub's thread pool when running under gevent (its exception
    raised here), else in place."""
    if not monkey.is_module_patched("threading"):
        return fn(*args)
    return gevent.get_hub().threadpool.apply(fn, args)
