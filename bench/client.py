"""An asyncio SSE client for OpenAI-style streams (chat and completions), timing each chunk.

Kept lean because it shares the machine with the servers it measures: one aiohttp session,
one read per arriving TCP segment (not per line), one ``json.loads`` per event.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field

import aiohttp


# SSE events end with a blank line; sse-starlette (the peer) writes CRLF line ends.
_EVENT_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class StreamResult:
    sent: float                      # monotonic time the request was sent
    ttft: float | None = None        # seconds to the first non-empty text
    times: list[float] = field(default_factory=list)  # arrival of each non-empty text chunk
    pieces: list[str] = field(default_factory=list)  # the text of each of those chunks
    text: str = ""
    chunks: int = 0                  # chunks that carried text
    usage_tokens: int | None = None  # completion_tokens, if the server reported usage
    usage: dict | None = None        # the whole usage object, if the server reported it
    finish_reason: str | None = None
    done: bool = False               # saw ``data: [DONE]``
    error: str | None = None
    end: float | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count when it gives one, else one per chunk."""
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ok(self) -> bool:
        return self.error is None and self.done and bool(self.text)


def connector(limit: int, fresh: bool = False) -> aiohttp.TCPConnector:
    """``fresh``: a new connection per request, for requests spaced out further than a
    server's keep-alive timeout (gunicorn: 5 s), where reusing one races with its close."""
    return aiohttp.TCPConnector(limit=limit, force_close=fresh, ttl_dns_cache=None)


async def stream(session: aiohttp.ClientSession, url: str, body: dict,
                 timeout: float) -> StreamResult:
    """POST ``body`` with ``stream: true`` and read the SSE stream to its end."""
    res = StreamResult(sent=time.monotonic())
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json={**body, "stream": True}) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return res
                buf = b""
                async for data in resp.content.iter_any():
                    buf += data
                    *events, buf = _EVENT_END.split(buf)
                    for event in events:
                        _event(res, event)
                    if res.done or res.error:
                        break
    except TimeoutError:
        res.error = f"timed out after {timeout}s"
    except (aiohttp.ClientError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.monotonic()
    if res.error is None and not res.done:
        res.error = "stream ended without [DONE]"
    return res


def _event(res: StreamResult, raw: bytes) -> None:
    for line in raw.splitlines():
        if line.startswith(b"data:"):  # not comments, pings or event names
            _data(res, line[5:].strip())


def _data(res: StreamResult, data: bytes) -> None:
    if data == b"[DONE]":
        res.done = True
        return
    chunk = json.loads(data)
    if "error" in chunk:
        res.error = f"error event: {chunk['error'].get('message')}"
        return
    if chunk.get("usage"):
        res.usage = chunk["usage"]
        res.usage_tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk.get("choices") or ():
        text = choice.get("text")
        if text is None:
            delta = choice.get("delta") or {}
            # A tool call's chunks carry its arguments (bench/structured.py times them).
            text = delta.get("content") or "".join(
                (c.get("function") or {}).get("arguments") or ""
                for c in delta.get("tool_calls") or ())
        if text:
            now = time.monotonic()
            if res.ttft is None:
                res.ttft = now - res.sent
            res.times.append(now)
            res.pieces.append(text)
            res.text += text
            res.chunks += 1
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]


async def burst(url: str, bodies: list[dict], timeout: float) -> tuple[list[StreamResult], float]:
    """One stream per body, all sent at once; the results (in order) and the burst's wall time."""
    async with aiohttp.ClientSession(connector=connector(len(bodies)),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.monotonic()
        results = await asyncio.gather(*(stream(session, url, b, timeout) for b in bodies))
        return list(results), time.monotonic() - t0
