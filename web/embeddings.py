"""POST /v1/embeddings: validate, enqueue on the model's queue, answer with its vectors."""

from __future__ import annotations

from flask import Blueprint, current_app

from tasks.core import embeddings
from tasks.core.schemas.embeddings import CreateEmbeddingRequest
from web import generation
from web.validation import parse_body

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
def create_embedding():
    req = parse_body(CreateEmbeddingRequest)
    prepared = embeddings.prepare_all(req, current_app.extensions["ferry"])
    return generation.respond(prepared, stream=False, include_usage=False)
