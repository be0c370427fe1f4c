"""tasks/publisher.py against a real Redis: what a drain leaves in a job's replay buffer and
on its channels, and the wire format of its messages (config/contract/events.py)."""

from __future__ import annotations

import json
import threading
import time

import redis

from config.contract import events
from config.contract.events import Delta, Done, Finish, Started, ToolCallDelta
from config.contract.protocol import connect, events_channel, events_log
from tasks.publisher import Publisher
from tests.services import RedisServer


def _publisher(client, **kw) -> Publisher:
    return Publisher(client, log_max=kw.pop("log_max", 1000), log_ttl_ms=60_000,
                     retry_s=kw.pop("retry_s", 2.0),
                     window_s=kw.pop("window_s", 0.005), **kw)


def _buffer(r, job_id: str) -> list[tuple[int, list]]:
    return [events.decode(message) for message in r.lrange(events_log(job_id), 0, -1)]


def _job_id(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def test_a_delta_on_the_wire_leaves_out_its_defaults_and_reads_back_whole():
    lp = [{"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": []}]
    evs = [Started("w", 3), Delta(0, 't"\\\n\u2028☃'), Delta(1, "", tokens=0, prompt=True),
           Delta(0, "é", tokens=2, logprobs=lp), ToolCallDelta(0, 0, "{", id="c1", name="f"),
           Finish(0, "stop", 3), Done(3, 3)]
    message = events.encode(7, evs)
    assert events.decode(message) == (7, evs)
    plain = json.loads(events.encode(0, [Delta(2, "x")]))["e"][0]
    assert plain == {"index": 2, "text": "x", "t": "delta"}
    # A web channel's lines: a batch's events as they are; a batch that is one delta of
    # text as that text's JSON string, which decodes to the same delta.
    text = Delta(3, 't"\\\n\u2028☃ x', tokens=2)
    routed = events.encode_routed([events.routed("job-1", 7, evs, message),
                                   events.routed("job-2", 9, [text], events.encode(9, [text]))])
    (j1, s1, got), (j2, s2, wire) = events.decode_routed(routed)
    assert (j1, s1, got) == ("job-1", 7, evs)
    assert (j2, s2, wire.index, wire.tokens) == ("job-2", 9, 3, 2)
    assert wire.text == json.dumps(text.text).encode() and wire.events() == [text]
    # What a worker not yet upgraded sends a web process's channel still reads.
    before = '[{"j":"job-3","s":4,"e":[{"index":0,"text":"hi","t":"delta"},{"t":"done",' \
             '"prompt_tokens":1,"completion_tokens":1}]}]'
    assert events.decode_routed(before) == [("job-3", 4, [Delta(0, "hi"), Done(1, 1)])]


def test_the_publisher_does_not_wait_for_the_clients_pool(redis_server):
    """Every connection of the worker's client pool is taken (busy jobs): events still go
    out, on the publisher's own connection, and in order."""
    client = connect(redis_server.url, max_connections=1, timeout=0.5)
    held = client.connection_pool.get_connection()
    try:
        pub = _publisher(client, retry_s=0.0)
        job_id = _job_id("pool")
        evs = [Started("w", 1), *(Delta(0, f"t{i} ") for i in range(5)), Finish(0, "stop", 5),
               Done(1, 5)]
        for ev in evs:
            pub.put(job_id, ev, None)
        assert pub.flush(timeout=5)
    finally:
        client.connection_pool.release(held)
    batches = _buffer(redis.Redis.from_url(redis_server.url), job_id)
    assert [seq for seq, _ in batches] == [0] + [
        sum(len(b) for _, b in batches[:i]) for i in range(1, len(batches))]
    got = [ev for _, b in batches for ev in b]
    assert "".join(ev.text for ev in got if isinstance(ev, Delta)) == "t0 t1 t2 t3 t4 "
    assert got[0] == Started("w", 1) and got[-2:] == evs[-2:]


def test_events_keep_flowing_when_redis_forgets_the_script_or_drops_the_connection(
        tmp_path, request):
    """SCRIPT FLUSH (as after a restart) and a killed connection between drains: the
    publisher loads the script again, reconnects, and the buffer, the job's channel and
    the web's reply channel each get every event once, in order."""
    server = RedisServer(tmp_path).start()
    request.addfinalizer(server.kill)
    r = redis.Redis.from_url(server.url)
    job_id, reply = _job_id("heal"), _job_id("ferry:reply:test")
    sub = r.pubsub()
    sub.subscribe(events_channel(job_id), reply)
    confirmed = 0
    while confirmed < 2:
        msg = sub.get_message(timeout=1)
        confirmed += msg is not None and msg["type"] == "subscribe"
    pub = _publisher(connect(server.url))
    pub.put(job_id, Started("w", 1), reply)
    pub.put(job_id, Delta(0, "a"), reply)
    assert pub.flush()
    r.script_flush()
    pub.put(job_id, Delta(0, "b"), reply)
    assert pub.flush()
    mine = r.client_id()
    killed = [r.client_kill_filter(_id=c["id"]) for c in r.client_list()
              if int(c["id"]) != mine and c["cmd"] != "subscribe"]
    assert killed  # the publisher's connection(s)
    pub.put(job_id, Delta(0, "c"), reply)
    pub.put(job_id, Done(1, 3), reply)
    assert pub.flush()
    on_job, on_reply = [], []
    deadline = time.monotonic() + 5
    while (len(on_job) < 4 or len(on_reply) < 4) and time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.2)
        if msg is None:
            continue
        if msg["channel"].decode() == reply:
            for j, seq, evs in events.decode_routed(msg["data"]):
                assert j == job_id
                if isinstance(evs, events.WireText):
                    evs = evs.events()
                on_reply += [(seq + i, ev) for i, ev in enumerate(evs)]
        else:
            seq, evs = events.decode(msg["data"])
            on_job += [(seq + i, ev) for i, ev in enumerate(evs)]
    want = list(enumerate([Started("w", 1), Delta(0, "a"), Delta(0, "b"), Delta(0, "c"),
                           Done(1, 3)]))
    logged = [(seq + i, ev) for seq, evs in _buffer(r, job_id) for i, ev in enumerate(evs)]
    assert logged == want
    assert on_job == want and on_reply == want
    sub.close()


def test_put_from_many_threads_loses_and_reorders_nothing(redis_server):
    """``put`` takes no lock: 8 threads each stream a job's 300 tokens; every job's buffer
    holds its tokens once each, in order, numbered without a gap."""
    pub = _publisher(connect(redis_server.url), window_tokens=7)
    jobs = [_job_id(f"threads{i}") for i in range(8)]

    def stream(job_id):
        pub.put(job_id, Started("w", 1), None)
        for i in range(300):
            pub.put(job_id, Delta(0, f"{i},"), None)
            if i % 50 == 0:
                time.sleep(0.001)
        pub.put(job_id, Done(1, 300), None)

    threads = [threading.Thread(target=stream, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pub.flush()
    r = redis.Redis.from_url(redis_server.url)
    for job_id in jobs:
        batches = _buffer(r, job_id)
        seqs = [seq for seq, _ in batches]
        assert seqs == [sum(len(b) for _, b in batches[:i]) for i in range(len(batches))]
        text = "".join(ev.text for _, b in batches for ev in b if isinstance(ev, Delta))
        assert text == "".join(f"{i}," for i in range(300))
        assert isinstance(batches[-1][1][-1], Done)


def test_a_buffer_keeps_its_latest_messages_up_to_its_cap(redis_server):
    """A job's buffer is trimmed from its oldest end: past ``log_max`` it holds at most a
    sixteenth more (trimmed back to ``log_max`` then), always its latest messages, in order,
    and it still ends with the job's last event."""
    from config import load_settings
    from tasks.jobs.store import JobStore

    r = redis.Redis.from_url(redis_server.url)
    pub = _publisher(connect(redis_server.url), log_max=32)
    job_id = _job_id("capped")
    lengths = []
    for i in range(100):
        pub.put(job_id, Delta(0, f"{i},"), None)
        assert pub.flush()  # one message per delta
        lengths.append(r.llen(events_log(job_id)))
    pub.put(job_id, Done(1, 100), None)
    assert pub.flush()
    assert lengths[:32] == list(range(1, 33))
    assert max(lengths) == 34 and min(lengths[32:]) == 32
    batches = _buffer(r, job_id)
    assert [seq for seq, _ in batches] == list(range(101 - len(batches), 101))
    replayed = list(JobStore(r, load_settings()).replay(job_id))
    assert [seq for seq, _ in replayed] == [seq for seq, _ in batches]
    assert replayed[-1][1] == Done(1, 100)


def test_a_drain_sent_twice_is_read_once(redis_server):
    """The publisher sends a drain again when the reply to it was lost with its connection,
    and Redis may have run both: the job's buffer then holds those events twice, and the
    web's subscription receives them twice. Each reader keeps every event once, in order,
    and a stream does not fail for it (a gap still does)."""
    from config import load_settings
    from tasks.core.relay import Relay, Subscription
    from tasks.jobs.store import JobStore

    r = redis.Redis.from_url(redis_server.url)
    job = "sent-twice"
    batches = [(0, [Started("w", 1), Delta(0, "a")]), (0, [Started("w", 1), Delta(0, "a")]),
               (1, [Delta(0, "a"), Delta(0, "b")]), (3, [Delta(0, "c")])]
    for first, evs in batches:
        r.rpush(events_log(job), events.encode(first, evs))
    settings = load_settings()
    store = JobStore(r, settings)
    assert [(seq, ev.text if isinstance(ev, Delta) else ev.t) for seq, ev in store.replay(job)] \
        == [(0, "started"), (1, "a"), (2, "b"), (3, "c")]
    assert [seq for seq, _ in store.replay(job, after=1)] == [2, 3]

    sub = Subscription(Relay(settings, r, store), job, "q")
    for first, evs in batches:
        sub._deliver(*events.decode(events.encode(first, evs)))
    got = [sub.next(timeout=0) for _ in range(sub.pending())]
    assert [ev.text if isinstance(ev, Delta) else ev.t for ev in got] == \
        ["started", "a", "b", "c"]
    sub._deliver(5, [Delta(0, "e")])  # 4 is missing: that is a loss, and said
    assert isinstance(sub.next(timeout=0), events.Failed)
