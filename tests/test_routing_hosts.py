"""Ferry across hosts, as a deployment that outgrew one machine runs it: Redis, the web and
two workers each on a host of its own (network namespaces on this machine, tests/netns.py).
One worker host's cable is pulled mid-stream and plugged back in."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import redis
import requests

from tests.affinity import MODEL, converse, script, turn, worker_of
from tests.netns import Hosts, unavailable
from tests.services import Service, ferry_env, redis_server_binary, wait_for

WORKER_TIMEOUT = 3  # FERRY_WORKER_TIMEOUT in ferry_env


@pytest.fixture
def hosts(tmp_path):
    why = unavailable()
    if why is not None:
        print(f"skipped: {why}")
        pytest.skip(why)
    net = Hosts(["redis", "web", "a", "b"])
    services: list[Service] = []
    try:
        yield net, services
    finally:
        for s in services:
            s.kill()
        net.close()


def start(net: Hosts, services: list[Service], host: str, argv: list[str], env: dict,
          log) -> Service:
    service = Service(net.exec_argv(host) + argv, env, log).start()
    services.append(service)
    return service


def live(r, queue: str) -> dict[str, float]:
    return {m.decode(): s / 1000 for m, s in r.zrange(f"ferry:workers:{queue}", 0, -1,
                                                      withscores=True)}


@dataclass
class Deployment:
    net: Hosts
    r: redis.Redis  # made, and used, inside the web host's namespace
    url: str
    queue: str
    names: dict[str, str]  # host -> its worker's name


def deploy(net: Hosts, services: list[Service], tmp_path) -> Deployment:
    """Redis, the web and a worker on each of hosts a and b; ready when both beat."""
    redis_url = f"redis://{net.address('redis')}:6379/0"
    env = ferry_env(redis_url, FERRY_HOST="127.0.0.1", FERRY_PORT="8000",
                    FERRY_FILES_DIR=str(tmp_path / "files"))
    start(net, services, "redis", [redis_server_binary(), "--port", "6379", "--bind",
                                   net.address("redis"), "--protected-mode", "no", "--save", "",
                                   "--appendonly", "no"], env, tmp_path / "redis.log")
    web = start(net, services, "web", [sys.executable, "-m", "gunicorn", "-c",
                                       "web/gunicorn.conf.py", "web.wsgi:app"], env,
                tmp_path / "web.log")
    workers = {h: start(net, services, h, [sys.executable, "-m", "tasks.worker", MODEL], env,
                        tmp_path / f"worker-{h}.log") for h in ("a", "b")}
    url, queue = "http://127.0.0.1:8000", f"ferry.{MODEL}"
    with net.inside("web"):
        r = redis.Redis.from_url(redis_url, socket_timeout=5)
        wait_for(lambda: len(live(r, queue)) == 2, 90, "two workers on their hosts")
        wait_for(lambda: requests.get(url + "/health", timeout=1).ok, 30, "web", web.proc)
        names = {h: next(n for n in live(r, queue) if n.startswith(f"{MODEL}.{w.proc.pid}@"))
                 for h, w in workers.items()}
    return Deployment(net, r, url, queue, names)


def stream(d: Deployment, messages: list[dict], out: dict) -> threading.Thread:
    """Stream a long reply (6 s) in a thread: ``out`` gets the job id, when the first chunk
    came, and the error event with its arrival time."""
    def follow() -> None:
        with d.net.inside("web"):
            body = {"model": MODEL, "stream": True, "messages": messages + [
                {"role": "user", "content": json.dumps({"count": 60, "rate": 10})}]}
            with requests.post(d.url + "/v1/chat/completions", stream=True, timeout=60,
                               json=body) as resp:
                out["id"] = resp.headers["X-Request-Id"]
                for line in resp.iter_lines():
                    if line.startswith(b"data: {"):
                        out.setdefault("first", time.monotonic())
                        if b'"error"' in line:
                            out["error"] = json.loads(line[6:])["error"]
                            out["at"] = time.monotonic()
    reader = threading.Thread(target=follow)
    reader.start()
    return reader


def two_at_once(d: Deployment) -> tuple[list[str], list[list[dict]]]:
    """Two 1-second requests at once: the workers that ran them, and host a's conversation
    (if it ran one). With both idle, each takes one (solo pools)."""
    served: list[str] = []
    on_a: list[list[dict]] = []

    def ask(i: int) -> None:
        with d.net.inside("web"):
            messages = [{"role": "user", "content": script(f"back{i}", delay=1.0)}]
            reply, worker = turn(d.r, d.url, messages)
            served.append(worker)
            if worker == d.names["a"]:
                on_a.append(messages + [{"role": "assistant", "content": reply}])
    askers = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(30)
    return served, on_a


def test_worker_host_cut_mid_stream_then_rejoins(hosts, tmp_path):
    net, services = hosts
    d = deploy(net, services, tmp_path)
    with net.inside("web"):
        # Odd: with both idle, Redis hands sequential jobs to the two workers in turn, so an
        # even count would keep each conversation on one worker by itself.
        chats = converse(d.r, d.url, 7, 3)
    for c, (_, served) in chats.items():
        assert len(served) == 1, f"conversation {c} went to {served} across hosts"
    on_a = [c for c, (_, served) in chats.items() if served == {d.names["a"]}]
    assert on_a and len(on_a) < len(chats), "the conversations did not spread over both hosts"

    # A long reply streams from host a; its cable is pulled after the first tokens.
    out: dict = {}
    reader = stream(d, chats[on_a[0]][0], out)
    wait_for(lambda: "first" in out, 20, "the stream's first tokens")
    net.cut("a")
    cut = time.monotonic()
    # The rest, of both hosts' conversations, is served by host b meanwhile.
    with net.inside("web"):
        for c, (messages, _) in chats.items():
            ask = messages + [{"role": "user", "content": script(f"c{c}cut")}]
            assert turn(d.r, d.url, ask) == (f"c{c}cut ", d.names["b"])
    reader.join(30)
    assert out.get("error", {}).get("code") == "worker_lost", out
    assert out["at"] - cut < WORKER_TIMEOUT + 2.5
    with net.inside("web"):
        assert worker_of(d.r, out["id"]) == d.names["a"]
        # Plugged back in: host a beats again, by itself, and takes work again.
        net.mend("a")
        wait_for(lambda: live(d.r, d.queue).get(d.names["a"], 0) > time.time(), 60,
                 "host a's worker rejoining")
        load = f"ferry:load:{d.queue}:{d.names['a']}"
        wait_for(lambda: int(d.r.hget(load, "active") or 0) == 0, 30,
                 "host a's worker finishing its stale job")
    # A few tries: host a's consumer may still be waiting out TCP's retransmission back-off.
    for _ in range(5):
        served, pinned = two_at_once(d)
        if d.names["a"] in served:
            break
    assert sorted(served) == sorted(d.names.values())

    # Cut while idle: its next turn goes to host a's own queue, where a BRPOP the worker
    # will never read may take it. Once host a's heartbeat lapses the web sends the job to
    # the shared queue (the janitor moves it, if it is still in the list): host b answers.
    net.cut("a")
    cut = time.monotonic()
    with net.inside("web"):
        messages = pinned[0] + [{"role": "user", "content": script("stranded")}]
        assert turn(d.r, d.url, messages) == ("stranded ", d.names["b"])
    assert time.monotonic() - cut < WORKER_TIMEOUT + 3
