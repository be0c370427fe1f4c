"""Streams written straight to the client's socket by the relay's reader (``web/generation.py``
``_Pump``): the bytes a client gets must be those of one valid HTTP body however the two
writers (the pump, and gunicorn through the response iterator) take turns."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

from tests.test_pipeline import script


def _request(web, body: dict, version: str = "1.1", rcvbuf: int | None = None,
             path: str = "/v1/chat/completions") -> socket.socket:
    url = urlsplit(web.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Before connecting: the window the server may fill stays this small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((url.hostname, url.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/{version}\r\nHost: {url.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                 "Connection: close\r\n\r\n".encode() + data)
    return sock


def _read_all(sock: socket.socket) -> tuple[bytes, bytes]:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
    sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head, body


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked body; fails on any framing error."""
    out, pos = [], 0
    while True:
        nl = body.index(b"\r\n", pos)
        size = int(body[pos:nl], 16)
        start = nl + 2
        assert body[start + size:start + size + 2] == b"\r\n", f"bad chunk at {pos}"
        if size == 0:
            assert start + 2 == len(body), "bytes after the last chunk"
            return b"".join(out)
        out.append(body[start:start + size])
        pos = start + size + 2


def _contents(sse: bytes) -> tuple[str, list[bytes]]:
    events = [e for e in sse.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), events[:3]
    payloads = [e[len(b"data: "):] for e in events]
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or ""
                   for p in payloads[:-1])
    return text, payloads


def test_a_client_that_reads_slowly_gets_every_byte(web, synthetic_worker):
    """Tokens come far faster than the client reads: the server's socket buffer fills, a
    write is taken only in part, the request's greenlet sends the rest and the pump takes
    the stream back. The body is one valid chunked body holding every token in order."""
    count, pad = 2500, 3000  # ~7.5 MB: more than the kernel buffers on both sides hold
    sock = _request(web, {"model": "synthetic", "stream": True,
                          "messages": script(count=count, pad=pad, delay=0.001)}, rcvbuf=4096)
    # Read nothing while the worker sends (a token a millisecond: the web keeps up, so the
    # pump writes them, until the socket is full).
    time.sleep(2)
    head, body = _read_all(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    text, payloads = _contents(_dechunk(body))
    assert payloads[-1] == b"[DONE]"
    assert text == "".join(f"t{i} {'x' * pad}" for i in range(count))


def test_a_messages_stream_read_slowly_is_whole(web, synthetic_worker):
    """The same for a dialect's named events (``/v1/messages``): every text delta, in order,
    between ``message_start`` and ``message_stop``, in one valid chunked body."""
    count, pad = 2500, 3000
    sock = _request(web, {"model": "synthetic", "stream": True, "max_tokens": 4000,
                          "messages": script(count=count, pad=pad, delay=0.001)},
                    rcvbuf=4096, path="/v1/messages")
    time.sleep(2)
    head, body = _read_all(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    events = [e for e in _dechunk(body).split(b"\n\n") if e]
    kinds = [e.split(b"\n", 1)[0] for e in events]
    assert kinds[0] == b"event: message_start" and kinds[-1] == b"event: message_stop"
    datas = [json.loads(e.split(b"\ndata: ", 1)[1]) for e in events]
    text = "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")
    assert text == "".join(f"t{i} {'x' * pad}" for i in range(count))


def test_an_http10_stream_is_sent_unframed(web, synthetic_worker):
    """HTTP/1.0 has no chunked framing: gunicorn sends the body as it is and closes the
    connection, so the pump (which frames chunks) leaves such a stream to the iterator."""
    sock = _request(web, {"model": "synthetic", "stream": True,
                          "messages": script(count=50, delay=0.002)}, version="1.0")
    head, body = _read_all(sock)
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding" not in head.lower()
    text, payloads = _contents(body)
    assert payloads[-1] == b"[DONE]"
    assert text == "".join(f"t{i} " for i in range(50))


def test_pubsub_frames_split_anywhere_parse_the_same():
    """The relay reads its pub/sub socket itself (``tasks/core/relay.py`` ``_Frames``): a
    message may arrive cut at any byte, in RESP2 arrays or RESP3 pushes, with integers,
    nulls, simple strings and errors among them."""
    import random

    from tasks.core.relay import _Frames

    stream = (b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
              b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$12\r\nhello\r\nworld\r\n"
              b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$0\r\n\r\n"
              b"+OK\r\n-ERR nope\r\n$-1\r\n_\r\n"
              b">4\r\n$8\r\npmessage\r\n$3\r\nc:*\r\n$3\r\nc:1\r\n$3\r\n\x00\xff\n\r\n")
    want = [[b"subscribe", b"ch", 1], [b"message", b"ch", b"hello\r\nworld"],
            [b"message", b"ch", b""], b"OK", b"ERR nope", None, b"",
            [b"pmessage", b"c:*", b"c:1", b"\x00\xff\n"]]
    rng = random.Random(3)
    for trial in range(200):
        frames, got, pos = _Frames(), [], 0
        while pos < len(stream):
            step = 1 if trial == 0 else rng.randint(1, 40)
            got += frames.feed(stream[pos:pos + step])
            pos += step
        assert got == want, trial


def test_tokens_nobody_streams_travel_in_few_messages(web, synthetic_worker, redis_server):
    """A request answered with one body needs its answer, not its tokens as they come: the
    worker holds them after the first (``FERRY_UNSTREAMED_HOLD_MS``) and sends one delta per
    choice, so its 100 tokens make a handful of messages (Redis, web) where a stream of the
    same job makes one per token. The answer is the same."""
    import redis
    import requests

    from config.contract.protocol import events_log

    r = redis.Redis.from_url(redis_server.url)
    tokens = [f"<{i}>" for i in range(100)]
    sizes = {}
    for stream in (False, True):
        body = {"model": "synthetic", "stream": stream,
                "messages": script(tokens=tokens, delay=0.01)}
        reply = requests.post(web.url + "/v1/chat/completions", json=body, timeout=60,
                              stream=stream)
        if stream:
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in reply.iter_lines()
                           if line.startswith(b"data: {"))
        else:
            text = reply.json()["choices"][0]["message"]["content"]
        assert text == "".join(tokens)
        sizes[stream] = r.llen(events_log(reply.headers["X-Request-Id"]))
    assert sizes[False] <= 6, sizes  # started, first token, the rest, finish, done
    assert sizes[True] >= 50, sizes
