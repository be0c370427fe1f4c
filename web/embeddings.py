"""POST /v1/embeddings: validate, enqueue on the model's queue, answer with its vectors."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
from flask import Blueprint, Response, current_app

from config.errors import InvalidRequest, ServiceUnavailable
from models import events
from models.job import EmbeddingJob
from models.vectors import from_base64, to_base64
from tasks.protocol import EMBED_TASK
from web import generation
from web.relay import Subscription
from web.schemas.embeddings import CreateEmbeddingRequest
from web.validation import parse_body

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
def create_embedding():
    req = parse_body(CreateEmbeddingRequest)
    ferry = current_app.extensions["ferry"]
    entry = ferry.registry.resolve(req.model)
    if entry.kind != "embedding":
        raise InvalidRequest(f"The model '{req.model}' is not an embedding model.", param="model")
    job = EmbeddingJob(id=f"embd-{uuid.uuid4().hex}", model=entry.name, input=req.inputs(),
                       dimensions=req.dimensions, bulk=generation.is_bulk(),
                       deadline=time.time() + ferry.settings.queue_timeout)
    result = wait(generation.start(entry, job, EMBED_TASK))
    body = response(from_base64(result.data, result.dimensions), req.encoding_format,
                    entry.name, result.prompt_tokens)
    return Response(json.dumps(body), status=200, mimetype="application/json",
                    headers={"X-Request-Id": job.id})


def wait(sub: Subscription) -> events.Embedded:
    try:
        for ev in generation.follow(sub, generation.client_watch()):
            if isinstance(ev, events.Embedded):
                return ev
    finally:
        sub.close()
    raise ServiceUnavailable("The response ended early.")


def response(vectors: np.ndarray, encoding: str, model: str, tokens: int) -> dict:
    if encoding == "base64":
        rows = [to_base64(v) for v in vectors]
    else:  # float32 values, written exactly (a float64 holds every float32)
        rows = vectors.astype(np.float64).tolist()
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row}
                     for i, row in enumerate(rows)],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
