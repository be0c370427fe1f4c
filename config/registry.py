"""The model registry: names and aliases to entries. Unknown names are an error, never a default."""

from __future__ import annotations

from collections.abc import Iterator

from config.errors import ModelNotFound
from config.settings import ModelEntry


class Registry:
    def __init__(self, entries: list[ModelEntry]):
        self._entries = list(entries)
        self._by_name = {n: e for e in entries for n in (e.name, *e.aliases)}

    def resolve(self, name: str) -> ModelEntry:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise ModelNotFound(str(name)) from None

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries)
