"""``ferry batch``: upload a JSONL file, run it as a Batch API job with a progress bar, and
download the output (and the error file, if any). Only the HTTP API is used."""

from __future__ import annotations

import sys
import time

import requests

ENDED = {"completed", "failed", "cancelled", "expired"}


def progress(batch: dict, width: int = 30) -> str:
    counts = batch.get("request_counts") or {}
    total, done = counts.get("total") or 0, (counts.get("completed") or 0) + (counts.get("failed") or 0)
    filled = width * done // total if total else 0
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"({counts.get('failed') or 0} failed) {batch['status']:<11}")


def download(http: requests.Session, base: str, file_id: str, path: str | None) -> None:
    r = http.get(f"{base}/v1/files/{file_id}/content", timeout=60)
    r.raise_for_status()
    if path is None or path == "-":
        sys.stdout.write(r.text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(r.text)


def run(call, http: requests.Session, base: str, path: str, endpoint: str, output: str | None,
        errors: str | None, poll: float) -> int:
    with open(path, "rb") as f:
        uploaded = call("POST", f"{base}/v1/files", files={"file": (path, f)},
                        data={"purpose": "batch"})
    batch = call("POST", f"{base}/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"})
    print(f"batch {batch['id']} (file {uploaded['id']})", file=sys.stderr)
    try:
        while batch["status"] not in ENDED:
            print(progress(batch), end="", file=sys.stderr, flush=True)
            time.sleep(poll)
            batch = call("GET", f"{base}/v1/batches/{batch['id']}")
    except KeyboardInterrupt:
        print(f"\nstopped watching; the batch goes on: {batch['id']}", file=sys.stderr)
        return 1
    print(progress(batch), file=sys.stderr)
    if batch.get("output_file_id"):
        download(http, base, batch["output_file_id"], output)
    if batch.get("error_file_id") and errors:
        download(http, base, batch["error_file_id"], errors)
    return 0 if batch["status"] == "completed" else 1
