"""Webhooks: the final job object, POSTed when a job ends, retried, at least once even when
the webhook worker is killed; private addresses refused unless the operator allows them (the
receiver here is on loopback, so most tests start their web and webhook sender with
FERRY_WEBHOOK_ALLOW_PRIVATE; the address-trick tests keep the check on)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from config import load_settings
from config.errors import InvalidRequest
from tasks.app import WEBHOOK_KEY_PREFIX, make_webhook_celery
from config.contract.protocol import WEBHOOK_QUEUE, WEBHOOK_TASK
from tasks.webhooks import check_url
from tests.jobclient import cancel, get, scripted, submit, submitted
from tests.loopback import Listener
from tests.services import RedisServer, Web, Webhooks, Worker, wait_for


class Receiver:
    """An HTTP server on loopback that records POSTs and answers with ``statuses`` in turn
    (200 once they run out)."""

    def __init__(self):
        self.posts: list[tuple[str, dict, dict]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 15) -> list[tuple[str, dict, dict]]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count:
            assert time.monotonic() < deadline, f"{len(self.posts)} of {count} webhooks arrived"
            time.sleep(0.05)
        return self.posts


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def open_web(redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("webhooks")
    web = Web(redis_server.url, logs, FERRY_WEBHOOK_ALLOW_PRIVATE="1").start()
    sender = Webhooks(redis_server.url, logs, FERRY_WEBHOOK_ALLOW_PRIVATE="1").start()
    yield web
    sender.stop()
    web.stop()


def test_webhook_delivered_with_retries(open_web, synthetic_worker, receiver):
    receiver.statuses = [503]
    job = submitted(open_web, scripted(tokens=["w"]), webhook=receiver.url + "/hook")
    assert job["webhook"] == receiver.url + "/hook"
    posts = receiver.wait(2)
    final = get(open_web, job["id"]).json()
    assert final["status"] == "completed"
    for path, headers, payload in posts:
        assert path == "/hook" and headers["X-Ferry-Job-Id"] == job["id"]
        assert payload == final
    assert final["result"]["choices"][0]["message"]["content"] == "w"
    time.sleep(1.5)
    assert len(receiver.posts) == 2, "delivered once it succeeded, and not again"


def test_webhook_of_a_job_cancelled_before_it_started(open_web, receiver):
    job = submitted(open_web, scripted(model="unserved", tokens=["x"]),
                    webhook=receiver.url + "/cancelled")
    assert cancel(open_web, job["id"]).json()["status"] == "cancelled"
    (path, _, payload), = receiver.wait(1)
    assert path == "/cancelled" and payload["status"] == "cancelled"
    assert payload["id"] == job["id"] and payload["result"] is None


def test_webhook_refused_by_the_receiver_is_not_retried(open_web, synthetic_worker, receiver):
    receiver.statuses = [404]
    submitted(open_web, scripted(tokens=["w"]), webhook=receiver.url + "/gone")
    receiver.wait(1)
    time.sleep(2.5)  # a retry would come after 1 s
    assert len(receiver.posts) == 1


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook",
    "http://192.168.0.1/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/hook", "http://100.64.0.1/hook",
])
def test_private_webhooks_are_refused(web, url):
    r = submit(web, scripted(tokens=["a"]), webhook=url)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "webhook"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "http:///x",
                                 "http://host.invalid/x", "http://example.com:99999/x"])
def test_malformed_webhooks_are_refused(url):
    with pytest.raises(InvalidRequest) as e:
        check_url(url, allow_private=True)
    assert e.value.param == "webhook"


def test_public_and_allowed_addresses_pass():
    check_url("https://93.184.216.34/hook", allow_private=False)
    check_url("http://[2606:4700::1111]:8080/hook", allow_private=False)
    check_url("http://127.0.0.1:9/hook", allow_private=True)


@pytest.fixture(scope="module")
def strict_sender(redis_server, tmp_path_factory):
    """A webhook sender with the private check on, beside the ``web`` fixture's (also on)."""
    sender = Webhooks(redis_server.url, tmp_path_factory.mktemp("strict")).start()
    yield sender
    sender.stop()


def test_address_tricks_refused_and_nothing_reaches_the_receiver(web, synthetic_worker,
                                                                 strict_sender):
    """Each URL leads to a loopback listener by a way the old check let through: parsers that
    disagree (urlsplit saw 8.8.8.8 where requests connected to 127.0.0.1), or an IPv6 form
    that carries 127.0.0.1."""
    listener = Listener()
    p = listener.port
    urls = [f"http://127.0.0.1:{p}\\@8.8.8.8/hook", f"http://[64:ff9b::7f00:1]:{p}/hook",
            f"http://[2002:7f00:1::]:{p}/hook", f"http://[::127.0.0.1]:{p}/hook",
            f"http://[::ffff:0:127.0.0.1]:{p}/hook", f"http://[64:ff9b:1::7f00:1]:{p}/hook"]
    try:
        answers = [submit(web, scripted(tokens=["a"]), webhook=url) for url in urls]
        time.sleep(3)  # an accepted job would have ended and its webhook been sent by now
        assert listener.connections == 0, listener.heads
        for url, r in zip(urls, answers):
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["param"] == "webhook"
    finally:
        listener.close()


KILL_ENV = {"FERRY_WEBHOOK_ALLOW_PRIVATE": "1", "FERRY_WEBHOOK_BACKOFF": "3",
            "FERRY_WEBHOOK_RETRIES": "1", "FERRY_WEBHOOK_TIMEOUT": "2",
            "FERRY_WEBHOOK_VISIBILITY_TIMEOUT": "6"}


def test_a_pending_retry_survives_a_killed_webhook_worker(tmp_path, receiver):
    """The receiver fails the first attempt; the webhook worker is SIGKILLed while it holds
    the retry (3 s away); a new worker delivers it once the visibility timeout (6 s) passed."""
    own_redis = RedisServer(tmp_path).start()
    web = Web(own_redis.url, tmp_path, **KILL_ENV).start()
    worker = Worker("synthetic", own_redis.url, tmp_path, **KILL_ENV).start()
    first = Webhooks(own_redis.url, tmp_path, **KILL_ENV).start()
    second = Webhooks(own_redis.url, tmp_path / "second", **KILL_ENV)
    (tmp_path / "second").mkdir()
    try:
        receiver.statuses = [503]
        job = submitted(web, scripted(tokens=["k"]), webhook=receiver.url + "/hook")
        receiver.wait(1)
        # The retry is a second message, which the worker takes and holds until it is due;
        # the first is acknowledged just after (a kill in between would deliver both: at
        # least once). Kill when the retry is all the worker holds.
        unacked = redis.Redis.from_url(own_redis.url)
        wait_for(lambda: first.log.read_text().count("Task ferry.webhook[") >= 2
                 and unacked.hlen(WEBHOOK_KEY_PREFIX + "unacked") <= 1, 10,
                 "the retry held by the webhook worker")
        first.kill()
        killed = time.monotonic()
        assert len(receiver.posts) == 1
        second.start()
        ready = time.monotonic() - killed
        posts = receiver.wait(2, timeout=30)
        redelivered = time.monotonic() - killed
        assert posts[1][2]["id"] == job["id"] and posts[1][2]["status"] == "completed"
        print(f"retry redelivered {redelivered:.1f} s after the SIGKILL "
              f"(new worker ready after {ready:.1f} s)")
        # The visibility timeout, or the new worker's start if slower, then one 2 s sweep.
        assert redelivered < max(6, ready) + 2 + 2
        time.sleep(2)
        assert len(receiver.posts) == 2, "delivered once it succeeded, and not again"
    finally:
        for service in (second, first, worker, web, own_redis):
            service.stop()


def test_a_host_that_does_not_resolve_at_delivery_is_retried(tmp_path):
    """DNS failing at the moment of delivery (the name resolved when the job was submitted)
    is a reason to try again, not to drop the webhook."""
    own_redis = RedisServer(tmp_path).start()
    sender = Webhooks(own_redis.url, tmp_path, FERRY_WEBHOOK_RETRIES="1").start()
    try:
        celery = make_webhook_celery(load_settings(redis_url=own_redis.url))
        celery.send_task(WEBHOOK_TASK, args=["http://ferry-test.invalid/hook", {"id": "job-dns"}],
                         queue=WEBHOOK_QUEUE)
        wait_for(lambda: "job-dns given up after 2 attempts" in sender.log.read_text(), 15,
                 "two attempts")
        assert "does not resolve" in sender.log.read_text()
    finally:
        sender.stop()
        own_redis.stop()


def test_visibility_timeout_must_outlast_the_longest_retry():
    with pytest.raises(ValueError, match="webhook_visibility_timeout"):
        load_settings(webhook_visibility_timeout=20)  # 16 s backoff + a 10 s attempt
    load_settings(webhook_visibility_timeout=27)
