"""A worker coalesces a job's tokens (``FERRY_STREAM_COALESCE_MS`` / ``_TOKENS``), and the
web reads every synchronous stream's events on its process's one reply channel."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import redis
import requests

from bench.stack import _GEVENT_WORKER
from config.contract import events
from tasks.jobs.shapes import ChatShape, CompletionShape
from tests.services import Worker
from web.generation import _data, _TextChunks

WINDOW_MS = 1000


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


@pytest.fixture(scope="module")
def held(redis_server, logs):
    """A "scratch" worker that holds tokens for a second (far longer than a test's stream)
    and runs many jobs at once (Celery's gevent pool, as the relay benchmark's)."""
    w = Worker("scratch", redis_server.url, logs, FERRY_STREAM_COALESCE_MS=str(WINDOW_MS),
               FERRY_STREAM_COALESCE_TOKENS="1000")
    w.argv = [sys.executable, "-c", _GEVENT_WORKER, *w.argv[3:], "-P", "gevent", "-c", "100"]
    w.start()
    yield w
    w.stop()


def _contents(stream) -> tuple[list[str], list[float], object]:
    pieces, times, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
                times.append(time.monotonic())
    return pieces, times, usage


def test_coalesce_merges_a_choices_deltas_and_keeps_logprobs_aligned():
    lp = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []}
          for t in ("He", "llo", " w")]
    evs = [events.Delta(0, "He", logprobs=lp[:1]), events.Delta(0, "llo", logprobs=lp[1:2]),
           events.Delta(1, "x"), events.Delta(0, " w", logprobs=lp[2:]),
           events.Delta(0, "!"),  # no logprobs: not merged into a delta that has them
           events.ToolCallDelta(0, 0, "", id="call_1", name="f"),
           events.ToolCallDelta(0, 0, '{"a"', tokens=2), events.ToolCallDelta(0, 0, ": 1}", tokens=3),
           events.ToolCallDelta(0, 1, "", id="call_2", name="g"),  # a new call starts
           events.Finish(0, "stop", 5), events.Done(1, 5)]
    out = events.coalesce(evs)
    assert out[0] == events.Delta(0, "Hello", tokens=2, logprobs=lp[:2])
    assert out[1] == events.Delta(1, "x")
    assert out[2] == events.Delta(0, " w", logprobs=lp[2:])
    assert out[3] == events.Delta(0, "!")
    assert out[4] == events.ToolCallDelta(0, 0, '{"a": 1}', id="call_1", name="f", tokens=5)
    assert out[5].id == "call_2" and out[6:] == evs[-2:]
    # The chunk of a merged delta: its logprobs' tokens spell its content.
    chunk = ChatShape("chatcmpl-1", "m", 0, logprobs=True).chunk(0, out[0])
    choice = chunk["choices"][0]
    assert "".join(e["token"] for e in choice["logprobs"]["content"]) == choice["delta"]["content"]
    # Through the wire format and back, and a web channel's message holds several jobs.
    routed = events.encode_routed([events.routed("a", 3, out[:2], events.encode(3, out[:2])),
                                   events.routed("b", 0, out[2:3], events.encode(0, out[2:3]))])
    assert events.decode_routed(routed) == [("a", 3, out[:2]), ("b", 0, out[2:3])]


def test_text_chunks_from_the_template_are_the_shapes_own_bytes():
    shapes = [ChatShape("chatcmpl-1", "m", 7), CompletionShape("cmpl-1", "m", 7)]
    for shape in shapes:
        for include_usage in (False, True):
            texts = _TextChunks(shape, include_usage)
            for index in (0, 2):
                for text in ("t1 ", 'a"b\\c\n', "héllo ☃", "\u2028", "\x00ferry-text\x00"):
                    ev = events.Delta(index, text)
                    assert texts.get(ev) == _data(shape.chunk(index, ev), include_usage)
                    # The same text as a web channel carries it, spliced undecoded.
                    line = events.routed("j-1", 0, [ev], events.encode(0, [ev]))
                    [(_, _, wire)] = events.decode_routed(line)
                    assert texts.wire(wire) == texts.get(ev)
    # Logprobs asked for: the shape builds every chunk itself.
    assert _TextChunks(ChatShape("chatcmpl-1", "m", 7, logprobs=True), False).get(
        events.Delta(0, "x")) is None


def test_fast_tokens_come_in_fewer_chunks_with_the_same_text(scripted):
    """300 tokens at 3,000 tok/s with the default window (5 ms / 16 tokens): a chunk carries
    several tokens, the text and the usage are those of every token."""
    stream = scripted.chat.completions.create(
        model="synthetic", messages=script(count=300, rate=3000), stream=True,
        stream_options={"include_usage": True})
    pieces, _, usage = _contents(stream)
    assert "".join(pieces) == "".join(f"t{i} " for i in range(300))
    assert usage.completion_tokens == 300
    assert len(pieces) < 150, f"{len(pieces)} chunks for 300 tokens: not coalesced"


def test_first_token_is_not_held_and_the_end_flushes(client, held):
    """With a 1 s window, the first token still comes at once; the tokens after it wait,
    and go with the choice's end (not a window later)."""
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model="scratch", messages=script(tokens=[f"<{i}>" for i in range(10)], delay=0.05),
        stream=True)
    pieces, times, _ = _contents(stream)
    assert "".join(pieces) == "".join(f"<{i}>" for i in range(10))
    assert pieces[0] == "<0>" and times[0] - t0 < 0.5 * WINDOW_MS / 1000
    assert len(pieces) == 2  # the first token, then the nine held until the end
    assert times[-1] - t0 < 0.9 * WINDOW_MS / 1000


def test_held_tokens_come_before_the_error(client, held):
    stream = client.chat.completions.create(
        model="scratch", messages=script(tokens=list("abcde"), delay=0.02, fail="boom"),
        stream=True)
    got = []
    with pytest.raises(openai.APIError, match="boom"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "abcde"


def test_a_burst_of_streams_opens_no_channel_per_stream(web, held, redis_server):
    """60 streams opened at once all complete; while they are open, Redis has no channel per
    job subscribed, only the web processes' reply channels (one SUBSCRIBE per process, ever)."""
    n = 60
    body = {"model": "scratch", "stream": True, "messages": script(count=20, rate=20)}
    r = redis.Redis.from_url(redis_server.url)

    def one(_):
        with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=60) as resp:
            if resp.status_code != 200:
                return f"HTTP {resp.status_code}: {resp.text[:200]}"
            text = ""
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
            return text

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        time.sleep(0.5)  # all sent; the jobs tick for a second
        job_channels = r.pubsub_channels("ferry:ev:*")
        reply_channels = r.pubsub_channels("ferry:reply:*")
        results = [f.result() for f in futures]
    want = "".join(f"t{i} " for i in range(20))
    assert [x for x in results if x != want] == []
    assert job_channels == []
    assert len(reply_channels) >= 1
