"""Files (the Files API): content on disk under ``settings.files_dir``, metadata in Redis.

Shared by the web process (uploads, downloads) and the batch workers (inputs, outputs),
which must therefore see the same directory. Content is written to a temporary name and
renamed, and metadata is written after it, so a file listed is always complete; a file is
named on disk by its id only (never by the client's filename).

Every file has an owner (``config/tenants.py``), kept with its metadata and never shown; the
reads, the listing and the delete take the owner and find nothing of anyone else's. Each
owner's files have an index of their own, so a listing never reads anyone else's.

Every file has an ``expires_at``; past it the file is gone for readers at once, and the
janitor (``sweep_expired``) deletes its metadata and its content on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from collections.abc import Iterable
from typing import BinaryIO, Literal

import redis as redis_lib
from pydantic import BaseModel

from config.errors import NotFound
from config.tenants import ANONYMOUS, ANY_OWNER

Purpose = Literal["batch", "batch_output"]

# The anonymous owner's index is the one every file was listed in before owners existed.
FILES_INDEX = "ferry:files"
# Files by expiry time (``sweep_expired``).
FILES_EXPIRING = "ferry:files:expiring"


def _meta_key(file_id: str) -> str:
    return f"ferry:file:{file_id}"


def _index(owner: str) -> str:
    return FILES_INDEX if owner == ANONYMOUS else f"{FILES_INDEX}:{owner}"


def _load(raw: bytes | None, owner: str | None) -> FileObject | None:
    """The file object stored, if ``owner`` may see it (``ANY_OWNER``: anyone)."""
    if raw is None:
        return None
    data = json.loads(raw)
    if owner is not ANY_OWNER and data.pop("owner", ANONYMOUS) != owner:
        return None
    return FileObject.model_validate(data)


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: Purpose
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileStore:
    def __init__(self, redis: redis_lib.Redis, root: Path):
        self.redis, self.root = redis, Path(root)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def put(self, source: BinaryIO, filename: str, purpose: Purpose, owner: str,
            lifetime: float) -> FileObject:
        """Store an upload of ``owner`` under a new id, for ``lifetime`` seconds."""
        return self.write(iter(lambda: source.read(1024 * 1024), b""), filename, purpose,
                          f"file-{uuid.uuid4().hex}", owner, lifetime)

    def write(self, chunks: Iterable[bytes], filename: str, purpose: Purpose,
              file_id: str, owner: str, lifetime: float) -> FileObject:
        """Store (or replace: idempotent writers name their file) ``file_id``, as ``owner``'s,
        to expire ``lifetime`` seconds from now."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            size = os.path.getsize(tmp)
            os.replace(tmp, self.path(file_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        now = int(time.time())
        obj = FileObject(id=file_id, bytes=size, created_at=now, filename=filename,
                         purpose=purpose, expires_at=now + int(lifetime))
        pipe = self.redis.pipeline()
        pipe.set(_meta_key(file_id), json.dumps({**obj.model_dump(), "owner": owner}))
        pipe.zadd(_index(owner), {file_id: time.time()})
        pipe.zadd(FILES_EXPIRING, {file_id: obj.expires_at})
        pipe.execute()
        return obj

    def get(self, file_id: str, *, owner: str | None) -> FileObject:
        """The file, if ``owner`` has it (else ``NotFound``, as for no file at all)."""
        obj = _load(self.redis.get(_meta_key(file_id)), owner)
        if obj is None or _expired(obj):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return obj

    def open(self, file_id: str, *, owner: str | None) -> BinaryIO:
        self.get(file_id, owner=owner)
        try:
            return open(self.path(file_id), "rb")
        except FileNotFoundError:
            raise NotFound(f"The content of file {file_id} is missing on this host.",
                           param="file_id") from None

    def list(self, owner: str, purpose: str | None, order: str, after: str | None,
             limit: int) -> tuple[list[FileObject], bool]:
        """``owner``'s files newest first (``order="desc"``) or oldest first, after the id
        ``after``."""
        index = _index(owner)
        ids = [i.decode() for i in (self.redis.zrevrange(index, 0, -1) if order == "desc"
                                    else self.redis.zrange(index, 0, -1))]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        raws = self.redis.mget([_meta_key(i) for i in ids]) if ids else []
        objs = [o for o in (_load(r, owner) for r in raws) if o is not None and not _expired(o)]
        if purpose is not None:
            objs = [o for o in objs if o.purpose == purpose]
        return objs[:limit], len(objs) > limit

    def delete(self, file_id: str, *, owner: str) -> None:
        self.get(file_id, owner=owner)
        self._remove(file_id)

    def sweep_expired(self) -> int:
        """Delete the files past their ``expires_at``, metadata and content; how many."""
        due = [i.decode() for i in self.redis.zrangebyscore(FILES_EXPIRING, "-inf", time.time(),
                                                            start=0, num=500)]
        for file_id in due:
            self._remove(file_id)
        return len(due)

    def _remove(self, file_id: str) -> None:
        # Metadata first: a reader never finds metadata whose content is gone. The owner's
        # index is named in the metadata (none: the file's record is already gone).
        raw = self.redis.get(_meta_key(file_id))
        owner = ANONYMOUS if raw is None else json.loads(raw).get("owner", ANONYMOUS)
        pipe = self.redis.pipeline()
        pipe.delete(_meta_key(file_id))
        pipe.zrem(_index(owner), file_id)
        pipe.zrem(FILES_EXPIRING, file_id)
        pipe.execute()
        self.path(file_id).unlink(missing_ok=True)


def _expired(obj: FileObject) -> bool:
    return obj.expires_at is not None and obj.expires_at <= time.time()
