"""Prefix affinity across workers (tasks/routing.py): the digests both sides compute, and two
real workers of one model behind the real web, one of them killed."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis
import requests

from config.contract.job import GenerationJob
from tasks import routing
from tests.affinity import MODEL, converse, script, turn, worker_of
from tests.services import RedisServer, Web, Worker, wait_for
from tasks.core.schemas.chat import Message



# -- the digests, without services ---------------------------------------------------------

def _job(messages: list[dict]) -> GenerationJob:
    return GenerationJob(id="j", model=MODEL,
                         messages=[Message.model_validate(m).for_template(i)
                                   for i, m in enumerate(messages)])


def test_next_turn_prefix_is_this_turn_and_its_reply():
    """A client's next turn, parsed as the web parses it, starts with the digest the worker
    recorded for this turn plus its reply, tool calls included (ids aside)."""
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    call = {"id": "call_worker", "type": "function",
            "function": {"name": "look", "arguments": '{"q": "tides"}'}}
    served = routing.digest(_job(first), _job(first).messages
                            + [routing.reply_message("", [call])])
    client_call = dict(call, id="call_client_copy")
    second = first + [{"role": "assistant", "content": None, "tool_calls": [client_call]},
                      {"role": "tool", "tool_call_id": "call_client_copy", "content": "high"}]
    assert routing.prefix_digest(_job(second)) == served
    # Its own prefix is the system prompt: another conversation on it may go there too.
    opening = _job(first)
    assert routing.prefix_digest(opening) == routing.digest(opening, opening.messages[:1])
    assert routing.prefix_digest(_job([{"role": "user", "content": "hi"}])) is None
    third = second + [{"role": "assistant", "content": "It is high."},
                      {"role": "user", "content": "and now?"}]
    assert routing.prefix_digest(_job(third)) != served


# -- two workers behind one web --------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    redis_server = RedisServer(tmp_path).start()
    web = Web(redis_server.url, tmp_path).start()
    workers = [Worker(MODEL, redis_server.url, tmp_path).start() for _ in range(2)]
    yield redis.Redis.from_url(redis_server.url), web, workers
    for s in (*workers, web, redis_server):
        s.kill()


def test_conversations_return_to_their_worker(pair):
    """9 conversations of 3 turns, interleaved: every warm turn lands on the worker that
    served the conversation's first turn, and both workers served some. Without routing,
    idle workers take sequential jobs in turn, so an odd count moves every conversation.
    The counter says so too."""
    r, web, workers = pair
    chats = converse(r, web.url, 9, 3)
    for c, (_, served) in chats.items():
        assert len(served) == 1, f"conversation {c} went to {served}"
    names = {next(iter(s)) for _, s in chats.values()}
    assert names == {f"{MODEL}.{w.proc.pid}@{os.uname().nodename}" for w in workers}
    metrics = requests.get(web.url + "/metrics", timeout=5).text
    hits = [line for line in metrics.splitlines()
            if line.startswith("ferry_routed_total{") and 'reason="hit"' in line]
    routed = [line for line in metrics.splitlines() if line.startswith("ferry_routed_total{")]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 18, routed


def _stop_one(r, web, workers):
    """Conversations pinned to their workers, then the first worker SIGSTOPped: they, the
    worker, its name and the conversations pinned to it."""
    chats = converse(r, web.url, 6, 1)
    # Turn 1 of each, so that every conversation is pinned to one worker.
    for c, (messages, _) in chats.items():
        messages.append({"role": "user", "content": script(f"c{c}warm")})
        reply, worker = turn(r, web.url, messages)
        messages.append({"role": "assistant", "content": reply})
        chats[c] = (messages, {worker})
    victim = workers[0]
    name = f"{MODEL}.{victim.proc.pid}@{os.uname().nodename}"
    pinned = [c for c, (_, served) in chats.items() if served == {name}]
    assert pinned, "no conversation was pinned to the first worker"
    os.killpg(victim.proc.pid, signal.SIGSTOP)
    # Past the stopped worker's last BRPOP (kombu's 1 s): Redis would hand it a message of
    # the shared queue, lost with it (README, delivery guarantees: not this test's subject).
    time.sleep(1.2)
    return chats, victim, name, pinned


def test_a_submitted_job_routed_to_a_killed_worker_runs_on_the_other(pair):
    """A /v1/jobs submission has no web process waiting for it: routed to a worker that is
    then killed, it is moved back to the shared queue by the janitor and completes on the
    other worker."""
    r, web, workers = pair
    chats, victim, name, pinned = _stop_one(r, web, workers)
    messages = chats[pinned[0]][0] + [{"role": "user", "content": script("submitted")}]
    resp = requests.post(web.url + "/v1/jobs", timeout=10, json={
        "endpoint": "/v1/chat/completions", "body": {"model": MODEL, "messages": messages}})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    own = routing.worker_queue(f"ferry.{MODEL}", name)
    assert r.llen(own) == 1
    victim.kill()
    killed = time.monotonic()

    def done() -> bool:
        job = requests.get(f"{web.url}/v1/jobs/{job_id}", timeout=5).json()
        return job["status"] == "completed"
    wait_for(done, 3 + 3, "the submitted job completing elsewhere")
    assert time.monotonic() - killed < 3 + 3
    job = requests.get(f"{web.url}/v1/jobs/{job_id}", timeout=5).json()
    assert job["result"]["choices"][0]["message"]["content"] == "submitted "
    assert worker_of(r, job_id) == f"{MODEL}.{workers[1].proc.pid}@{os.uname().nodename}"
    assert r.llen(own) == 0


def test_a_killed_workers_routed_jobs_are_served_by_the_other(pair):
    """The worker holding some conversations stops (SIGSTOP: its heartbeat still looks live
    for up to FERRY_WORKER_TIMEOUT), their next turns are routed to its own queue, and it is
    then killed: those turns, and the ones after, are answered by the other worker, within a
    few seconds of the kill; nothing is left in the dead worker's queue."""
    r, web, workers = pair
    chats, victim, name, pinned = _stop_one(r, web, workers)
    answers: dict[int, tuple[str, str, float]] = {}

    def ask(c: int) -> None:
        messages = chats[c][0] + [{"role": "user", "content": script(f"c{c}late")}]
        answers[c] = (*turn(r, web.url, messages), time.monotonic())

    threads = [threading.Thread(target=ask, args=(c,)) for c in pinned]
    for t in threads:
        t.start()
    own = routing.worker_queue(f"ferry.{MODEL}", name)
    deadline = time.monotonic() + 5
    # One: the stopped worker looks live, with one free thread (its solo pool); the rest
    # go to the shared queue.
    while r.llen(own) < 1:
        assert time.monotonic() < deadline, "the turns were not routed to the stopped worker"
        time.sleep(0.02)
    victim.kill()
    killed = time.monotonic()
    for t in threads:
        t.join(30)
    other = f"{MODEL}.{workers[1].proc.pid}@{os.uname().nodename}"
    assert sorted(answers) == pinned
    for c, (reply, worker, at) in answers.items():
        assert (reply, worker) == (f"c{c}late ", other)
        assert at - killed < 3 + 3  # FERRY_WORKER_TIMEOUT, then a sweep or two
    # The web that waited resent the job; the janitor's next sweep empties the dead queue
    # (the copy it moves is refused a second start).
    wait_for(lambda: r.llen(own) == 0, 3, "the dead worker's queue emptied")
    # Later turns no longer name the dead worker.
    messages = chats[pinned[0]][0] + [{"role": "user", "content": script("after")}]
    assert turn(r, web.url, messages) == ("after ", other)


def test_rescue_moves_a_lapsed_workers_queue_to_the_head_of_the_shared_one(redis_server):
    """Against Redis alone: the messages of a worker whose heartbeat lapsed, every priority
    list of them, go to the front of the shared queue's lists in their order (kombu pushes
    on the left and pops on the right); a live worker's stay."""
    r = redis.Redis.from_url(redis_server.url)
    queue, now = "ferry.rescue-test", time.time()
    r.delete(queue, queue + "\x06\x169", routing.routes_key(queue), f"ferry:workers:{queue}")
    r.zadd(f"ferry:workers:{queue}", {"gone": int((now - 1) * 1000),
                                      "here": int((now + 60) * 1000)})
    r.zadd(routing.routes_key(queue), {"gone": int(now * 1000), "here": int(now * 1000)})
    for name in ("gone", "here"):
        own = routing.worker_queue(queue, name)
        r.delete(own, own + "\x06\x169")
        r.lpush(own, f"{name}-1", f"{name}-2")
        r.lpush(own + "\x06\x169", f"{name}-bulk")
    r.lpush(queue, "shared-1")
    router = routing.Router(r, enabled=True, max_queued=0, forget_after=6)
    assert router.rescue(queue) == 3
    assert [r.rpop(queue) for _ in range(4)] == [b"gone-1", b"gone-2", b"shared-1", None]
    assert r.lrange(queue + "\x06\x169", 0, -1) == [b"gone-bulk"]
    assert r.llen(routing.worker_queue(queue, "here")) == 2
    assert router.rescue(queue) == 0


@pytest.fixture
def smollm2_pair(tmp_path):
    redis_server = RedisServer(tmp_path).start()
    web = Web(redis_server.url, tmp_path).start()
    workers = [Worker("smollm2", redis_server.url, tmp_path).start() for _ in range(2)]
    yield web
    for s in (*workers, web, redis_server):
        s.kill()


@pytest.mark.model
def test_smollm2_pair_warm_turns_read_their_conversation_from_cache(smollm2_pair):
    """Two real CPU workers: 3 conversations of 3 turns, interleaved. Every warm turn reads at
    least the whole previous turn's prompt from its worker's cache (the other worker holds
    none of it; without routing the odd count sends each warm turn to the other one)."""
    web = smollm2_pair
    chats = {c: [{"role": "system", "content": f"You are guide {c}. Answer in one line."}]
             for c in range(3)}
    prompt_before: dict[int, int] = {}
    for t in range(3):
        for c, messages in chats.items():
            messages.append({"role": "user", "content": f"Question {t}: name a colour."})
            resp = requests.post(web.url + "/v1/chat/completions", timeout=60, json={
                "model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            usage = body["usage"]
            if t > 0:
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                assert cached >= prompt_before[c], (c, t, usage)
            prompt_before[c] = usage["prompt_tokens"]
            messages.append({"role": "assistant",
                             "content": body["choices"][0]["message"]["content"]})
