"""The lines a program adds to its log file, as they come, for a terminal."""

from __future__ import annotations

import os
from pathlib import Path


class Tail:
    """New lines of one log file. supervisord rotates a log by renaming it and opening a new
    one: the rest of the old file is read before the new one, so no line is lost there."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None
        self.partial = b""
        try:
            self.file = open(path, "rb")
            self.file.seek(0, os.SEEK_END)  # earlier runs' lines stay in the file only
        except FileNotFoundError:
            pass

    def lines(self) -> list[str]:
        if self.file is None:
            try:
                self.file = open(self.path, "rb")
            except FileNotFoundError:
                return []
        data = self.file.read()
        if self._replaced():
            self.file.close()
            self.file = open(self.path, "rb")
            data += self.file.read()
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace").rstrip("\r") for line in complete]

    def _replaced(self) -> bool:
        try:
            return os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
