"""supervisord as the launcher's child, and what its XML-RPC interface says of each program."""

from __future__ import annotations

import ctypes
import http.client
import signal
import subprocess
import sys
import xmlrpc.client
from dataclasses import dataclass

from supervisor.xmlrpc import SupervisorTransport

from tasks.launch.plan import ROOT, Plan


@dataclass(frozen=True)
class Program:
    """One program as supervisord last saw it (``statename``: STARTING, RUNNING, BACKOFF,
    EXITED, FATAL, STOPPING, STOPPED). ``pid`` is 0 while no process runs; ``start`` is the
    Unix time its current (or last) process started."""

    name: str
    state: str
    pid: int
    start: float


PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In supervisord's process, before it starts: a SIGTERM when the launcher dies, so that
    a launcher killed outright (SIGKILL) still stops everything it started."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisord:
    """supervisord in the foreground. It stays in the launcher's process group, so a
    terminal's Ctrl-C reaches it as well; its programs each get a group of their own
    (supervisord's doing), which it stops as a whole."""

    def __init__(self, plan: Plan, env: dict[str, str]):
        self.plan, self.env = plan, env
        self.proc: subprocess.Popen | None = None
        self._rpc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.plan.conf)],
            env=self.env, cwd=ROOT,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None)

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """Ask for a shutdown (as Ctrl-C does): each program gets its stop signal."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def start_all(self) -> bool:
        """Start every program not yet started; False while supervisord does not answer."""
        try:
            self._proxy().supervisor.startAllProcesses(False)
            return True
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            self._rpc = None
            return False

    def programs(self) -> dict[str, Program]:
        """Every program by name; empty while supervisord does not answer (starting, or gone)."""
        try:
            infos = self._proxy().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            self._rpc = None  # a fresh connection next time
            return {}
        return {i["name"]: Program(i["name"], i["statename"], i["pid"], float(i["start"]))
                for i in infos}

    def _proxy(self):
        if self._rpc is None:
            transport = SupervisorTransport(None, None, f"unix://{self.plan.socket}")
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._rpc
