"""POST /v1/embeddings: validate, enqueue on the model's queue, answer with its vectors.

An embedding request is a job like any other (``X-Request-Id`` is its id, and
``/v1/jobs`` takes it too); the worker shares its forward passes with concurrent requests.
"""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from models.job import EmbeddingJob
from tasks.jobs.shapes import ResponseSpec
from web import generation
from web.schemas.embeddings import CreateEmbeddingRequest
from web.validation import parse_body

bp = Blueprint("embeddings", __name__)

# For /v1/jobs: the request this endpoint takes.
Request = CreateEmbeddingRequest


def prepare(req: CreateEmbeddingRequest) -> generation.Prepared:
    entry = current_app.extensions["ferry"].registry.resolve(req.model)
    if entry.kind != "embedding":
        raise InvalidRequest(f"The model '{req.model}' is not an embedding model.", param="model")
    job = EmbeddingJob(id=f"embd-{uuid.uuid4().hex}", model=entry.name, input=req.inputs(),
                       dimensions=req.dimensions, bulk=generation.is_bulk())
    return generation.Prepared(entry, job, ResponseSpec(endpoint="/v1/embeddings",
                                                        encoding_format=req.encoding_format))


@bp.post("/v1/embeddings")
def create_embedding():
    req = parse_body(CreateEmbeddingRequest)
    return generation.respond(prepare(req), stream=False, include_usage=False)
