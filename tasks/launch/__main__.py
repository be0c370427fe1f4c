"""``python -m tasks.launch [--conf FILE]``: what ``make run`` runs once the install is done.

Exit status: 0 after Ctrl-C (or SIGTERM) stopped everything; 1 when a process failed to
start or supervisord ended by itself; 2 when a check before the start failed (nothing was
started then).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import pydantic
from pydantic_settings import SettingsError

from config import load_settings
from tasks.launch import preflight
from tasks.launch.plan import DEFAULT_CONF, Plan
from tasks.launch.supervisor import Supervisord
from tasks.launch.tail import Tail
from tasks.launch.watch import StartFailed, Watch

POLL = 0.25


def say(line: str) -> None:
    print(line, flush=True)


class Launch:
    def __init__(self, plan: Plan, redis_server: str | None):
        self.plan = plan
        self.programs = plan.running(start_redis=redis_server is not None)
        self.supervisord = Supervisord(plan, plan.environment(redis_server))
        # supervisord's own log (a process exited, why, and that it was started again) is
        # shown once Ferry is ready: before, it only repeats the lines about each start.
        self.tails = {p: Tail(plan.log_path(p)) for p in (*self.programs, "supervisord")}
        self.width = max(len(p) for p in self.tails)
        self.watch = Watch(plan, self.programs, say)
        self.stopping = False
        self.asked_to_stop = False  # set by a signal; acted on (and said) by the loop
        # Redis first (config/supervisord.cpu.conf starts only Redis by itself).
        self.started = redis_server is None

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.supervisord.start()
        failed = None
        while self.supervisord.exit_code() is None:
            self._show_logs()
            if self.asked_to_stop and not self.stopping:
                self._stop()
            if not self.stopping:
                try:
                    self.watch.step(self.supervisord.programs())
                except StartFailed as e:
                    failed = e
                    self._show_logs()
                    say(self._failure(e))
                    self._stop()
                if not self.started and self.watch.seen["redis"].up:
                    self.started = self.supervisord.start_all()
            time.sleep(POLL)
        self._show_logs()
        code = self.supervisord.exit_code()
        if failed is not None:
            say(self._failure(failed))
            return 1
        if self.stopping and code == 0:
            say("ferry: stopped")
            return 0
        say(f"ferry: supervisord exited with status {code}: see "
            f"{self.plan.log_path('supervisord')}")
        return 1

    def _failure(self, e: StartFailed) -> str:
        return (f"ferry: {e.program} stopped while starting ({e.state}): its last lines are "
                f"above, all of them in {self.plan.log_path(e.program)}")

    def _on_signal(self, *_) -> None:
        # A terminal's Ctrl-C reaches supervisord too; SIGTERM or a signal to the launcher
        # alone is passed on by _stop.
        self.asked_to_stop = True

    def _stop(self) -> None:
        self.stopping = True
        say("ferry: stopping (model workers first, Redis last)")
        self.supervisord.stop()

    def _show_logs(self) -> None:
        for name, tail in self.tails.items():
            lines = tail.lines()
            if name == "supervisord" and not self.watch.ready:
                continue
            for line in lines:
                print(f"{name:<{self.width}} | {line}")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.launch", description=__doc__)
    parser.add_argument("--conf", type=Path, default=DEFAULT_CONF,
                        help="the supervisord config (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        say(f"ferry: setting {'.'.join(map(str, first['loc']))}: {first['msg']} "
            f"(from FERRY_* or {preflight.config_path()})")
        return 2
    except SettingsError as e:  # a FERRY_* value that is not the JSON its field needs
        say(f"ferry: {e} (from FERRY_*)")
        return 2
    try:
        plan = Plan.read(settings, args.conf)
        redis_server = preflight.check(plan)
    except (preflight.Problem, FileNotFoundError) as e:
        say(f"ferry: {e}")
        return 2
    if redis_server is None:
        say(f"ferry: using the Redis that answers at {settings.redis_url} (not started here)")
    if os.geteuid() == 0:
        say("ferry: note: running as root (Celery's warning about it is silenced here); "
            "run Ferry as a plain user where you can")
    say(f"ferry: starting {', '.join(plan.running(redis_server is not None))} under "
        f"supervisord; logs in {plan.log_dir}")
    return Launch(plan, redis_server).run()


if __name__ == "__main__":
    sys.exit(main())
