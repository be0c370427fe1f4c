"""When each program is up, and what to tell a person about it.

"Up" is what a client would need: Redis answers a PING, the web answers ``/health``, a model
worker's heartbeat (with its own pid in its name) is in its queue's live set; any other
program is up once supervisord holds it RUNNING (it stayed up ``startsecs``). Until every
program has been up once, a program that exits is a failure to start and ends ``make run``;
after that it is supervisord's to restart, and this only says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import requests

from tasks.launch.plan import Plan
from tasks.launch.supervisor import Program
from config.contract.protocol import workers_key

# supervisord's states in which no process of the program runs.
DOWN = {"BACKOFF", "EXITED", "FATAL", "STOPPED"}


class StartFailed(Exception):
    def __init__(self, program: str, state: str):
        super().__init__(program, state)
        self.program, self.state = program, state


@dataclass
class Seen:
    pid: int = 0
    up: bool = False
    started: float = 0.0
    restarts: int = 0
    fatal: bool = False


class Probe:
    """A check that may take a while, run in a thread so that the logs keep flowing: the
    web's first request waits until its app is loaded (15 s on two busy cores)."""

    def __init__(self, check: Callable[[], bool]):
        self.check = check
        self.thread: threading.Thread | None = None
        self.result = False

    def __call__(self) -> bool:
        if self.thread is None:
            self.result = False
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        if self.thread.is_alive():
            return False
        self.thread = None
        return self.result

    def _run(self) -> None:
        try:
            self.result = self.check()
        except Exception:
            self.result = False


class Watch:
    def __init__(self, plan: Plan, programs: tuple[str, ...], say: Callable[[str], None]):
        self.plan, self.say = plan, say
        self.seen = {name: Seen() for name in programs}
        self.ready = False
        self.redis = redis.Redis.from_url(plan.settings.redis_url, socket_connect_timeout=0.5,
                                          socket_timeout=1)
        self.queues = {m: plan.queue(m) for m in plan.models}
        self.web_up = Probe(lambda: requests.get(plan.web_url + "/health", timeout=(0.5, 60)).ok)

    def step(self, programs: dict[str, Program]) -> None:
        for name, seen in self.seen.items():
            program = programs.get(name)
            if program is not None:
                self._follow(name, seen, program)
        if not self.ready and all(s.up for s in self.seen.values()):
            self.ready = True
            self.say(f"Ferry is ready: {self.plan.web_url}/v1 — models: "
                     f"{', '.join(self.plan.models)} (Ctrl-C stops)")

    def _follow(self, name: str, seen: Seen, program: Program) -> None:
        gone = bool(seen.pid) and program.pid != seen.pid
        if not self.ready and (gone or program.state in DOWN - {"STOPPED"}):
            raise StartFailed(name, program.state)
        if gone:
            self._died(name, seen)
        if program.state == "FATAL" and not seen.fatal:
            seen.fatal = True
            self.say(f"ferry: {name} kept exiting as it started; supervisord gave up on it and "
                     f"the others keep serving: see {self.plan.log_path(name)}, then "
                     f"`supervisorctl -s unix://{self.plan.socket} start {name}`")
        if program.pid and program.pid != seen.pid:
            seen.pid, seen.started, seen.up, seen.fatal = program.pid, program.start, False, False
        if seen.pid and not seen.up and self._is_up(name, program):
            seen.up = True
            self._came_up(name, seen)

    def _died(self, name: str, seen: Seen) -> None:
        seen.restarts += 1
        seen.up = False
        lived = time.time() - seen.started
        self.say(f"ferry: {name} (pid {seen.pid}) exited after {lived:.0f} s; supervisord "
                 "starts it again")
        seen.pid = 0

    def _came_up(self, name: str, seen: Seen) -> None:
        took = f"{time.time() - seen.started:.1f} s after its start"
        again = " again" if seen.restarts else ""
        if name in self.queues:
            self.say(f"ferry: model {name} serving{again} (pid {seen.pid}), {took}")
        elif name == "web":
            self.say(f"ferry: web up{again} at {self.plan.web_url} (pid {seen.pid})")
        elif name == "redis":
            self.say(f"ferry: redis up{again} on port {self.plan.redis_port}, keeping its data "
                     f"in {self.plan.redis_dir} (maxmemory "
                     f"{self.plan.settings.redis_maxmemory}, noeviction)")
        else:
            self.say(f"ferry: {name} up{again} (pid {seen.pid})")

    def _is_up(self, name: str, program: Program) -> bool:
        try:
            if name in self.queues:
                prefix = f"{name}.{program.pid}@"
                live = self.redis.zrangebyscore(workers_key(self.queues[name]),
                                                int(time.time() * 1000), "+inf")
                return any(m.decode().startswith(prefix) for m in live)
            if name == "web":
                return self.web_up()
            if name == "redis":
                return bool(self.redis.ping())
        except redis.RedisError:
            return False
        return program.state == "RUNNING"
