"""``make run``'s launch step (``python -m tasks.launch``, what the Makefile runs after the install)
with the test registry, on free loopback ports and a data directory of the test's own.

supervisord gives each of its programs a process group of its own, so killing the launcher's
group does not reach them: leftovers are found by the run directory in their environment,
which every process of one ``make run`` inherits and no other process has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.services import ROOT, free_port, ferry_env


class MakeRun:
    def __init__(self, data: Path, port: int | None = None, redis_port: int | None = None,
                 **env: str):
        self.data = data
        self.port = port or free_port()
        self.redis_port = redis_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = ferry_env(self.redis_url, FERRY_PORT=str(self.port),
                             FERRY_FILES_DIR=str(data / "files"), **env)
        self.run_dir = str(data / "run")
        self.lines: list[str] = []
        self._ended = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MakeRun":
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.launch"], env=self.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self._ended.set()

    def wait_for(self, predicate, timeout: float) -> int:
        """The index of the first line (from all so far) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        checked = 0
        while time.monotonic() < deadline:
            ended = self._ended.is_set()
            lines = list(self.lines)
            for i in range(checked, len(lines)):
                if predicate(lines[i]):
                    return i
            checked = len(lines)
            if ended:
                raise RuntimeError("make run ended first:\n" + self.output())
            time.sleep(0.05)
        raise TimeoutError(f"no such line after {timeout}s:\n" + self.output())

    def wait_ready(self, timeout: float = 240) -> int:
        return self.wait_for(lambda line: line.startswith("Ferry is ready: "), timeout)

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to the whole foreground group (launcher, supervisord)."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._ended.wait(5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def leftovers(self) -> list[psutil.Process]:
        """Live processes started by this run (zombies count as gone): those with its
        FERRY_RUN_STATE, and those working in its data directory, which is how its Redis is
        found (redis-server writes its title over its environment)."""
        found = []
        data = str(self.data) + os.sep
        for proc in psutil.process_iter():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and (
                        proc.environ().get("FERRY_RUN_STATE") == self.run_dir
                        or (proc.cwd() + os.sep).startswith(data)):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for proc in self.leftovers():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
