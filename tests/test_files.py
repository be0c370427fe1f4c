"""The Files API with the official client: upload, list, retrieve, download, delete, limits."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
import redis
import requests

from tests.conftest import MAX_FILE_BYTES

CONTENT = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'


def upload(client, content=CONTENT, name="input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def test_upload_retrieve_download_delete(client, files_dir):
    f = upload(client)
    assert f.id.startswith("file-") and f.object == "file"
    assert f.bytes == len(CONTENT) and f.filename == "input.jsonl"
    assert f.purpose == "batch" and f.status == "processed" and f.created_at > 1_600_000_000
    assert client.files.retrieve(f.id) == f
    assert client.files.content(f.id).read() == CONTENT
    assert (files_dir / f.id).read_bytes() == CONTENT
    deleted = client.files.delete(f.id)
    assert deleted.id == f.id and deleted.deleted
    assert not (files_dir / f.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)


def test_list_newest_first_with_cursor(client):
    ids = [upload(client, name=f"{i}.jsonl").id for i in range(3)]
    listed = [f.id for f in client.files.list(purpose="batch").data]
    assert listed[:3] == ids[::-1]
    page = client.files.list(limit=2, after=ids[2])
    assert [f.id for f in page.data] == [ids[1], ids[0]]
    asc = [f.id for f in client.files.list(order="asc").data]
    assert asc.index(ids[0]) < asc.index(ids[2])


def test_filename_never_reaches_the_disk_path(client, files_dir):
    f = upload(client, name="../../etc/evil.jsonl")
    assert f.filename == "evil.jsonl"
    assert (files_dir / f.id).read_bytes() == CONTENT


@pytest.mark.parametrize("size", [MAX_FILE_BYTES + 1, 3 * MAX_FILE_BYTES])
def test_too_large_is_413(web, files_dir, size):
    before = set(files_dir.iterdir())
    r = requests.post(web.url + "/v1/files", data={"purpose": "batch"},
                      files={"file": ("big.jsonl", b"x" * size)}, timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert set(files_dir.iterdir()) == before


@pytest.mark.parametrize("data,param", [
    ({"purpose": "fine-tune"}, "purpose"),
    ({}, "purpose"),
    ({"purpose": "batch", "expires_after[anchor]": "created_at"}, "expires_after[seconds]"),
    ({"purpose": "batch", "expires_after[anchor]": "last_active_at",
      "expires_after[seconds]": "3600"}, "expires_after[anchor]"),
    ({"purpose": "batch", "expires_after[anchor]": "created_at",
      "expires_after[seconds]": "60"}, "expires_after[seconds]"),
    ({"purpose": "batch", "expires_after[anchor]": "created_at",
      "expires_after[seconds]": "2592001"}, "expires_after[seconds]"),
])
def test_bad_form_is_400(web, data, param):
    r = requests.post(web.url + "/v1/files", data=data, files={"file": ("a.jsonl", CONTENT)},
                      timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_missing_file_part_is_400(web):
    r = requests.post(web.url + "/v1/files", data={"purpose": "batch"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_expires_after_is_honoured_and_the_content_deleted(client, redis_server, files_dir):
    f = client.files.create(file=("soon.jsonl", io.BytesIO(CONTENT)), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    default = upload(client)
    assert default.expires_at == default.created_at + 30 * 86400  # FERRY_FILE_TTL
    assert (files_dir / f.id).exists()
    # Move its expiry to now (white box: the metadata and the expiry index, in Redis).
    r = redis.Redis.from_url(redis_server.url)
    meta = json.loads(r.get(f"ferry:file:{f.id}"))
    r.set(f"ferry:file:{f.id}", json.dumps({**meta, "expires_at": int(time.time())}))
    r.zadd("ferry:files:expiring", {f.id: int(time.time())})
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert f.id not in {x.id for x in client.files.list()}
    deadline = time.monotonic() + 5
    while (files_dir / f.id).exists():  # the janitor deletes it within a sweep or two
        assert time.monotonic() < deadline, "the expired file is still on disk"
        time.sleep(0.1)
    assert not r.exists(f"ferry:file:{f.id}")
    assert client.files.retrieve(default.id).id == default.id
