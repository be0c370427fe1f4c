"""The shape both batching backends share: one thread owns the engine, and the task threads
reach it only through an inbox of commands, applied between two decode steps.

``InboxLoop`` holds the inbox and the thread; a backend's loop (``models/llama_batch.py``,
``models/exllamav2/loop.py``) writes ``_run`` (its steps, calling ``_drain`` between them),
``_apply`` (what a command does) and ``_shutdown`` (what "stop" does to the jobs it holds).
"""

from __future__ import annotations

import queue
import threading
from typing import Any


class InboxLoop:
    thread_name = "batch-loop"

    def __init__(self, idle_wait: float):
        self.idle_wait = idle_wait
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    # --- called from task threads -------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def submit(self, item: Any) -> None:
        self._inbox.put(("submit", item))

    def cancel(self, item: Any) -> None:
        self._inbox.put(("cancel", item))

    def close(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # --- the loop thread ----------------------------------------------------------------

    def _run(self) -> None:
        raise NotImplementedError

    def _apply(self, op: str, arg: Any) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Apply every waiting command (waiting up to ``timeout``, else ``idle_wait``, for one
        if ``block``). False once told to stop."""
        try:
            item = self._inbox.get(timeout=self.idle_wait if timeout is None else timeout) \
                if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while item is not None:
            op, arg = item
            if op == "stop":
                self._shutdown()
                return False
            self._apply(op, arg)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
        return True
