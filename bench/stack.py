"""The processes a benchmark runs against, started on free loopback ports and always stopped.

Ferry's own processes are launched exactly as the tests launch them (``tests/services.py``:
redis-server, ``python -m tasks.worker``, gunicorn with the gevent worker), but with the
bench registry (``bench/ferry.bench.toml``) and the production heartbeat settings. The peer
is llama-cpp-python's own OpenAI server, ``python -m llama_cpp.server``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import tempfile
import time
import tomllib
from pathlib import Path

import redis
import requests

from bench.common import BENCH_DIR
from config.settings import ModelEntry
from tests.services import RedisServer, Service, Web, Worker, free_port, wait_for

BENCH_CONFIG = BENCH_DIR / "ferry.bench.toml"
# The production defaults (config/settings.py), not the tests' shorter ones: a heartbeat
# thread delayed by a busy benchmark must not make the web side give up on a live worker.
ENV = {"FERRY_CONFIG": str(BENCH_CONFIG), "FERRY_WORKER_TIMEOUT": "5",
       "FERRY_HEARTBEAT_INTERVAL": "1"}


# ``python -m tasks.worker`` with the gevent monkey patches applied before anything imports.
_GEVENT_WORKER = ("from gevent import monkey; monkey.patch_all(); import runpy, sys; "
                  "sys.argv[0] = 'tasks.worker'; "
                  "runpy.run_module('tasks.worker', run_name='__main__', alter_sys=True)")


def models_env(name: str, options: dict) -> dict[str, str]:
    """FERRY_MODELS for a worker whose entry ``name`` takes ``options`` over the bench
    registry's (the registry's other entries unchanged): one process set up differently."""
    models = tomllib.loads(BENCH_CONFIG.read_text())["models"]
    for m in models:
        if m["name"] == name:
            m["options"] = {**m.get("options", {}), **options}
    return {"FERRY_MODELS": json.dumps(models)}


def bench_entry(name: str) -> ModelEntry:
    """A model entry of the bench registry, as the workers will see it."""
    models = tomllib.loads(BENCH_CONFIG.read_text())["models"]
    return ModelEntry(**next(m for m in models if m["name"] == name))


class PeerServer(Service):
    """llama-cpp-python's OpenAI-compatible server (FastAPI + uvicorn), one model."""

    def __init__(self, model_path: Path, log_dir: Path, label: str, **options):
        self.port = free_port()
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        super().__init__(argv, dict(os.environ), log_dir / f"peer-{label}.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "PeerServer":
        super().start()
        wait_for(lambda: requests.get(self.url + "/v1/models", timeout=1).ok, 60,
                 "llama_cpp.server", self.proc)
        return self


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


class Stack:
    """A set of services; leaving the ``with`` block stops every one, newest first."""

    def __init__(self, name: str):
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"ferry-bench-{name}-"))
        self.services: list[Service] = []
        self.redis_url: str | None = None

    def __enter__(self) -> "Stack":
        # A benchmark stopped by SIGTERM or SIGHUP (``timeout``, a closed terminal) unwinds
        # like one stopped by Ctrl-C, so its services stop with it instead of living on.
        self._handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, _exit_on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for service in reversed(self.services):
                service.stop()
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
        if exc is not None:
            print(f"(service logs kept in {self.log_dir})", file=sys.stderr)

    def _add(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def redis(self) -> str:
        server = self._add(RedisServer(self.log_dir))
        server.start()
        self.redis_url = server.url
        return server.url

    def workers(self, model: str, count: int, *celery_args: str, gevent: bool = False,
                options: dict | None = None) -> list[Worker]:
        """``count`` worker processes for ``model``, started together, ready when each has
        sent its first heartbeat (i.e. has loaded its model). ``gevent``: patch the process
        for Celery's gevent pool first, as the ``celery`` command does for ``-P gevent``
        (``python -m tasks.worker`` does not: its backends compute, they do not wait).
        ``options``: backend options over the bench registry's, for these processes only."""
        env = {**ENV, **(models_env(model, options) if options else {})}
        started = []
        for _ in range(count):
            w = self._add(Worker(model, self.redis_url, self.log_dir, **env))
            if gevent:
                w.argv = [sys.executable, "-c", _GEVENT_WORKER, *w.argv[3:], "-P", "gevent"]
            w.argv = [*w.argv, *celery_args]
            Service.start(w)
            started.append(w)
        client = redis.Redis.from_url(self.redis_url)
        key = f"ferry:workers:{bench_entry(model).queue}"
        for w in started:
            name = f"{model}.{w.proc.pid}@"
            wait_for(lambda: any(m.decode().startswith(name) for m in client.zrange(key, 0, -1)),
                     120, f"worker {model}", w.proc)
        return started

    def web(self, **env: str) -> Web:
        web = self._add(Web(self.redis_url, self.log_dir, **{**ENV, "FERRY_WEB_WORKERS": "1", **env}))
        web.start()
        return web

    def peer(self, model_path: Path, label: str, **options) -> PeerServer:
        peer = self._add(PeerServer(model_path, self.log_dir, label, **options))
        peer.start()
        return peer


def web_worker_pid(web: Web) -> int:
    """The pid of the one gunicorn worker under the web master (the process serving)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{web.proc.pid}/task/{web.proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn has no worker process")
