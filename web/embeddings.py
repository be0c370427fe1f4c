"""POST /v1/embeddings: validate, enqueue on the model's queue, answer with its vectors.

An embedding request is a job like any other (``X-Request-Id`` is its id, and
``/v1/jobs`` takes it too); the worker shares its forward passes with concurrent requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import gevent.pool
from flask import Blueprint, current_app

from config.errors import FerryError, InvalidRequest
from config.settings import ModelEntry
from config.tenants import Tenant
from config.contract.job import EmbeddingJob, EmbeddingPart, EmbeddingPartsJob
from tasks.jobs.shapes import ResponseSpec
from web import generation
from web.schemas.embeddings import MAX_INPUTS, CreateEmbeddingRequest
from web.validation import parse_body

bp = Blueprint("embeddings", __name__)

# For /v1/jobs: the request this endpoint takes.
Request = CreateEmbeddingRequest


def _embedding_model(name: str) -> ModelEntry:
    entry = current_app.extensions["ferry"].registry.resolve(name)
    if entry.kind != "embedding":
        raise InvalidRequest(f"The model '{name}' is not an embedding model.", param="model")
    return entry


def prepare(req: CreateEmbeddingRequest) -> generation.Prepared:
    entry = _embedding_model(req.model)
    job = EmbeddingJob(id=f"embd-{uuid.uuid4().hex}", model=entry.name, input=req.inputs(),
                       dimensions=req.dimensions, bulk=generation.is_bulk())
    return generation.Prepared(entry, job, ResponseSpec(endpoint="/v1/embeddings",
                                                        encoding_format=req.encoding_format))


Answer = tuple[int, str | None, dict]  # status, request id, body


def run_parts(reqs: list[CreateEmbeddingRequest], tenant: Tenant,
              abandoned: Callable[[], bool] = lambda: False) -> list[Answer | None]:
    """Many requests of ``tenant`` as bulk jobs (the Batch API runs a chunk's lines so): per
    model, jobs of consecutive requests holding at most ``MAX_INPUTS`` inputs together (no larger than one
    request may be), run side by side. For each request, the status, request id and body
    this endpoint would have answered it with; None for those whose job was cancelled
    because ``abandoned()`` became true. Runs in an app context, not a request's."""
    answers: list[Answer | None] = [None] * len(reqs)
    by_model: dict[str, tuple[ModelEntry, list[int]]] = {}
    for i, req in enumerate(reqs):
        try:
            entry = _embedding_model(req.model)
        except FerryError as e:
            answers[i] = (e.status, None, {"error": e.to_dict()})
            continue
        by_model.setdefault(entry.name, (entry, []))[1].append(i)
    work: list[tuple[ModelEntry, list[int]]] = []
    for entry, idx in by_model.values():
        job, inputs = [], 0
        for i in idx:
            n = len(reqs[i].inputs())
            if job and inputs + n > MAX_INPUTS:
                work.append((entry, job))
                job, inputs = [], 0
            job.append(i)
            inputs += n
        work.append((entry, job))

    app = current_app._get_current_object()  # greenlets start without the app context

    def run(entry: ModelEntry, idx: list[int]) -> None:
        job = EmbeddingPartsJob(
            id=f"embd-{uuid.uuid4().hex}", model=entry.name,
            parts=[EmbeddingPart(input=reqs[i].inputs(), dimensions=reqs[i].dimensions)
                   for i in idx])
        spec = ResponseSpec(endpoint="/v1/embeddings",
                            part_formats=[reqs[i].encoding_format for i in idx])
        try:
            with app.app_context():
                job_id, body = generation.run_to_end(generation.Prepared(entry, job, spec),
                                                     tenant=tenant, bulk=True,
                                                     abandoned=abandoned)
        except generation.ClientGone:
            return
        except FerryError as e:  # the job failed as a whole: so did each of its requests
            for i in idx:
                answers[i] = (e.status, job.id, {"error": e.to_dict()})
            return
        for i, part in zip(idx, body["data"]):
            answers[i] = (part["status"], job_id, part["body"])

    gevent.pool.Pool(max(len(work), 1)).map(lambda w: run(*w), work)
    return answers


@bp.post("/v1/embeddings")
def create_embedding():
    req = parse_body(CreateEmbeddingRequest)
    return generation.respond(prepare(req), stream=False, include_usage=False)
