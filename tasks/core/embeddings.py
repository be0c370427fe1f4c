"""Embeddings: the job a ``CreateEmbeddingRequest`` asks for, and many requests as one job.

An embedding request is a job like any other (``X-Request-Id`` is its id, and
``/v1/jobs`` takes it too); the worker shares its forward passes with concurrent requests.
"""

from __future__ import annotations

import dataclasses
import uuid

import gevent.pool

from config.errors import FerryError, InvalidRequest
from config.settings import ModelEntry
from config.contract.job import EmbeddingJob, EmbeddingPart, EmbeddingPartsJob
from tasks.jobs.shapes import ResponseSpec
from tasks.core import generation
from tasks.core.services import Ferry
from tasks.core.schemas.embeddings import MAX_INPUTS, CreateEmbeddingRequest

# The request this endpoint takes.
Request = CreateEmbeddingRequest


def _embedding_model(ferry: Ferry, name: str) -> ModelEntry:
    entry = ferry.registry.resolve(name)
    if entry.kind != "embedding":
        raise InvalidRequest(f"The model '{name}' is not an embedding model.", param="model")
    return entry


def prepare(req: CreateEmbeddingRequest, ferry: Ferry, *,
            bulk: bool = False) -> generation.Prepared:
    """``bulk``: the worker serves the job behind interactive ones (a batch line's)."""
    entry = _embedding_model(ferry, req.model)
    job = EmbeddingJob(id=f"embd-{uuid.uuid4().hex}", model=entry.name, input=req.inputs(),
                       dimensions=req.dimensions, bulk=bulk)
    return generation.Prepared(entry, job, ResponseSpec(endpoint="/v1/embeddings",
                                                        encoding_format=req.encoding_format))


def prepare_all(req: CreateEmbeddingRequest, ferry: Ferry, *,
                bulk: bool = False) -> list[generation.Prepared]:
    return [prepare(req, ferry, bulk=bulk)]


Answer = tuple[int, str | None, dict]  # status, request id, body


def run_parts(ferry: Ferry, reqs: list[CreateEmbeddingRequest],
              caller: generation.Caller) -> list[Answer | None]:
    """Many requests of the caller's as bulk jobs (the Batch API runs a chunk's lines so): per
    model, jobs of consecutive requests holding at most ``MAX_INPUTS`` inputs together (no larger than one
    request may be), run side by side. For each request, the status, request id and body
    this endpoint would have answered it with; None for those whose job was cancelled
    because ``caller.abandoned()`` became true."""
    caller = dataclasses.replace(caller, bulk=True)
    answers: list[Answer | None] = [None] * len(reqs)
    by_model: dict[str, tuple[ModelEntry, list[int]]] = {}
    for i, req in enumerate(reqs):
        try:
            entry = _embedding_model(ferry, req.model)
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

    def run(entry: ModelEntry, idx: list[int]) -> None:
        job = EmbeddingPartsJob(
            id=f"embd-{uuid.uuid4().hex}", model=entry.name,
            parts=[EmbeddingPart(input=reqs[i].inputs(), dimensions=reqs[i].dimensions)
                   for i in idx])
        spec = ResponseSpec(endpoint="/v1/embeddings",
                            part_formats=[reqs[i].encoding_format for i in idx])
        try:
            job_id, body = generation.run_to_end(ferry, generation.Prepared(entry, job, spec),
                                                 caller)
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

