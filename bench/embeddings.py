"""Embeddings throughput: a 10k-sentence Batch API job through Ferry against
sentence-transformers' own ``encode`` of the same sentences, in one run. Goal: >= 0.9x.

    .venv/bin/python -m bench.embeddings [--sentences 10000] [--torch]

Direct encode runs first, alone (batch_size 32, as its default). Then Ferry starts as in
production (config/ferry.toml: gunicorn web app, one all-minilm worker on onnxruntime, one
batch worker) on a private redis-server, and a JSONL of one request per sentence (base64
vectors, the official client's default) runs as one batch: timed from ``batches.create``
until the batch is ``completed``, so validation, queueing, every line's trip through the
queue and assembling the output file are all inside the figure; the upload is timed apart.
The vectors are checked against the direct ones. CPU heavy: run it once, not in a loop.

The goal's ratio is against sentence-transformers, the reference. So that the runtime's
speed does not hide Ferry's own cost, the same runtime is also timed without Ferry (the
backend's ``embed`` in this process), and with ``--torch`` the batch runs a second time
with the worker on the sentence_transformers backend: "ferry/same runtime" is Ferry's
overhead alone.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import openai
import redis

from tests.services import ROOT, BatchWorker, RedisServer, Web, Worker

MODEL = "all-minilm"
WORDS = ("the a ferry boat harbour river bay crossing morning evening night passengers cargo "
         "captain crew engine deck tide wind storm calm water bridge island city port island "
         "ticket queue car bicycle seagull lighthouse fog rain sun wave rope anchor dock "
         "slowly quickly quietly early late always never often leaves arrives waits carries "
         "sails turns stops returns watches counts hears sees across under over along beside "
         "near far old new small large busy empty cold warm blue grey green long short").split()
PRODUCTION = {"FERRY_CONFIG": str(ROOT / "config" / "ferry.toml"),
              "FERRY_WORKER_TIMEOUT": "5", "FERRY_HEARTBEAT_INTERVAL": "1"}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))).capitalize() + "."
            for _ in range(n)]


def direct(texts: list[str]) -> tuple[float, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from config import Registry, load_settings

    os.environ["FERRY_CONFIG"] = PRODUCTION["FERRY_CONFIG"]
    path = Registry(load_settings().models).resolve(MODEL).weights_path()
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.encode(texts[:64], batch_size=32)  # warm up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32)
    return time.perf_counter() - started, vectors


def same_runtime(texts: list[str], backend: str) -> float:
    """Seconds for the worker's backend to tokenize and embed ``texts`` in this process, in
    batch_size passes over length-sorted inputs, as the worker's bulk passes are."""
    from config import Registry, load_settings
    from models import load_backend

    os.environ["FERRY_CONFIG"] = PRODUCTION["FERRY_CONFIG"]
    entry = Registry(load_settings().models).resolve(MODEL).model_copy(update={"backend": backend})
    model = load_backend(entry)
    model.embed(model.tokenize(texts[:64]))  # warm up
    started = time.perf_counter()
    model.embed(model.tokenize(texts))
    return time.perf_counter() - started


def config_with(backend: str, workdir: Path) -> Path:
    """config/ferry.toml with the embedding model served by ``backend``."""
    text = Path(PRODUCTION["FERRY_CONFIG"]).read_text()
    served = 'backend = "onnxruntime"'
    assert text.count(served) == 1, "config/ferry.toml: expected one onnxruntime model"
    path = workdir / f"ferry.{backend}.toml"
    path.write_text(text.replace(served, f'backend = "{backend}"'))
    return path


def through_ferry(texts: list[str], workdir: Path, backend: str | None = None,
                  ) -> tuple[float, float, np.ndarray, dict]:
    logs = workdir / f"logs-{backend or 'production'}"
    logs.mkdir()
    env = {**PRODUCTION, "FERRY_FILES_DIR": str(workdir / "files")}
    if backend:
        env["FERRY_CONFIG"] = str(config_with(backend, workdir))
    services = [RedisServer(logs).start()]
    url = services[0].url
    try:
        services += [Worker(MODEL, url, logs, **env).start(120), BatchWorker(url, logs, **env).start(),
                     Web(url, logs, **env).start()]
        client = openai.OpenAI(base_url=services[-1].url + "/v1", api_key="unused", timeout=600)
        lines = b"".join(json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/embeddings",
                                     "body": {"model": MODEL, "input": t,
                                              "encoding_format": "base64"}}).encode() + b"\n"
                         for i, t in enumerate(texts))
        started = time.perf_counter()
        f = client.files.create(file=("bench.jsonl", io.BytesIO(lines)), purpose="batch")
        uploaded = time.perf_counter()
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - uploaded
        assert batch.status == "completed", batch
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        stats = {k.decode(): int(v) for k, v in
                 redis.Redis.from_url(url).hgetall(f"ferry:stats:ferry.{MODEL}").items()}
    finally:
        for s in reversed(services):
            s.stop()
    assert [r["custom_id"] for r in out] == [f"s{i}" for i in range(len(texts))]
    vectors = np.array([np.frombuffer(base64.b64decode(r["response"]["body"]["data"][0]["embedding"]),
                                      dtype="<f4") for r in out])
    return uploaded - started, elapsed, vectors, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--torch", action="store_true",
                        help="also run the batch with the worker on sentence-transformers")
    parser.add_argument("--keep", type=Path, help="keep logs and files in this new directory")
    args = parser.parse_args()
    texts = sentences(args.sentences)
    load_before = os.getloadavg()
    t_direct, ref = direct(texts)
    print(f"direct encode: {len(texts)} sentences in {t_direct:.1f} s "
          f"({len(texts) / t_direct:.0f}/s)", flush=True)
    t_ort = same_runtime(texts, "onnxruntime")
    print(f"onnxruntime, in process, no Ferry: {t_ort:.1f} s ({len(texts) / t_ort:.0f}/s)",
          flush=True)
    if args.keep:
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        t_upload, t_ferry, got, stats = through_ferry(texts, workdir)
        torch_run = through_ferry(texts, workdir, "sentence_transformers") if args.torch else None
    ratio = t_direct / t_ferry
    diff = float(np.abs(got - ref).max())
    result = {"sentences": len(texts), "direct_s": round(t_direct, 2),
              "ferry_batch_s": round(t_ferry, 2), "upload_s": round(t_upload, 2),
              "ratio": round(ratio, 3), "max_abs_diff": diff, "worker_stats": stats,
              "onnxruntime_in_process_s": round(t_ort, 2),
              "ratio_same_runtime": round(t_ort / t_ferry, 3),
              "loadavg_before": load_before, "cpus": os.cpu_count()}
    print(f"ferry batch:   {len(texts)} sentences in {t_ferry:.1f} s "
          f"({len(texts) / t_ferry:.0f}/s), upload {t_upload:.1f} s apart")
    print(f"worker: {stats.get('batches', 0)} model calls for {stats.get('requests', 0)} requests "
          f"({stats.get('inputs', 0) / max(stats.get('batches', 1), 1):.1f} inputs per call)")
    print(f"vectors: max |ferry - direct| = {diff:.2e}")
    print(f"ratio ferry/direct throughput: {ratio:.2f}x (goal >= 0.9x)")
    print(f"ratio ferry/same runtime (onnxruntime) without Ferry: {t_ort / t_ferry:.2f}x")
    if torch_run:
        t_torch = torch_run[1]
        result.update(ferry_torch_batch_s=round(t_torch, 2),
                      ratio_torch=round(t_direct / t_torch, 3),
                      max_abs_diff_torch=float(np.abs(torch_run[2] - ref).max()))
        print(f"ferry batch on sentence-transformers (torch): {t_torch:.1f} s "
              f"({len(texts) / t_torch:.0f}/s) = {t_direct / t_torch:.2f}x direct encode, "
              f"the same runtime")
    result["loadavg_after"] = os.getloadavg()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "embeddings.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
