"""Stop strings over a stream of text pieces.

Text that might be the start of a stop string is held back until it is resolved, so a
client never sees part of a stop sequence, and streamed text equals the final text.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        # The stop string that matched, once ``stopped``.
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add a piece; return what can be released now. After a match, ``stopped`` is True."""
        if self.stopped:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        found = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            self._held = ""
            return buf[:cut]
        hold = self._longest_partial(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation: whatever was held was not a stop string after all."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _longest_partial(self, buf: str) -> int:
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
