"""GET /openapi.json: an OpenAPI 3.1 document generated from the pydantic request models.

It documents what Ferry validates, so a fuzzer (tests/test_fuzz.py runs schemathesis) and
client generators see the same contract the handlers enforce.
"""

from __future__ import annotations

from flask import Blueprint, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from web.schemas.batches import CreateBatchRequest
from tasks.core.schemas.messages import CountMessageTokensRequest, CreateMessageRequest
from tasks.core.schemas.chat import CreateChatCompletionRequest
from tasks.core.schemas.completions import CreateCompletionRequest
from tasks.core.schemas.embeddings import CreateEmbeddingRequest
from web.schemas.jobs import CreateJobRequest

bp = Blueprint("openapi", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {k: {"type": ["string", "null"]} for k in ("message", "type", "param", "code")},
}}}

# Anthropic's error shape, for /v1/messages (web/errors.py).
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "request_id": {"type": "string"},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}

# (method, path, request model or None, operation id, summary)
OPERATIONS: list[tuple[str, str, type[BaseModel] | None, str, str]] = [
    ("post", "/v1/chat/completions", CreateChatCompletionRequest, "createChatCompletion",
     "Create a chat completion (streamed as server-sent events with stream=true)"),
    ("post", "/v1/completions", CreateCompletionRequest, "createCompletion",
     "Create a text completion"),
    ("post", "/v1/embeddings", CreateEmbeddingRequest, "createEmbedding", "Create embeddings"),
    ("post", "/v1/messages", CreateMessageRequest, "createMessage",
     "Create a message, Anthropic's Messages API (streamed as named events with stream=true)"),
    ("post", "/v1/messages/count_tokens", CountMessageTokensRequest, "countMessageTokens",
     "The input tokens a message with the same body would use"),
    ("get", "/v1/models", None, "listModels", "List the served models"),
    ("get", "/v1/models/{model}", None, "retrieveModel", "Retrieve a model"),
    ("post", "/v1/jobs", CreateJobRequest, "createJob",
     "Submit a request as a job (202); collect, watch or cancel it later"),
    ("get", "/v1/jobs", None, "listJobs", "The caller's jobs, newest first (cursor: after)"),
    ("get", "/v1/jobs/{job_id}", None, "retrieveJob", "A job's status and result"),
    ("post", "/v1/jobs/{job_id}/cancel", None, "cancelJob", "Cancel a job"),
    ("get", "/v1/jobs/{job_id}/events", None, "jobEvents",
     "A job's events from the start (or Last-Event-ID), then live (server-sent events)"),
    ("get", "/v1/workers", None, "listWorkers",
     "Live workers, queue depth, in-flight jobs and tokens/s per model"),
    ("get", "/v1/files", None, "listFiles", "List files"),
    ("get", "/v1/files/{file_id}", None, "retrieveFile", "Retrieve a file's metadata"),
    ("get", "/v1/files/{file_id}/content", None, "downloadFile", "A file's content"),
    ("delete", "/v1/files/{file_id}", None, "deleteFile", "Delete a file"),
    ("post", "/v1/batches", CreateBatchRequest, "createBatch", "Create a batch"),
    ("get", "/v1/batches", None, "listBatches", "List batches"),
    ("get", "/v1/batches/{batch_id}", None, "retrieveBatch", "Retrieve a batch"),
    ("post", "/v1/batches/{batch_id}/cancel", None, "cancelBatch", "Cancel a batch"),
]


def _error(path: str) -> dict:
    if path.startswith("/v1/messages"):
        return {"description": "An Anthropic error",
                "content": {"application/json": {"schema": ANTHROPIC_ERROR}}}
    return {"description": "An OpenAI error", "content": {"application/json": {"schema": ERROR}}}


def document() -> dict:
    models = [(m, "validation") for _, _, m, _, _ in OPERATIONS if m is not None]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for method, path, model, op_id, summary in OPERATIONS:
        op: dict = {"operationId": op_id, "summary": summary, "responses": {
            "200": {"description": "OK"},
            "default": _error(path)}}
        if model is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}}
        names = [p[1:-1] for p in path.split("/") if p.startswith("{")]
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for n in names]
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0",
            "info": {"title": "Ferry", "version": "0.1.0",
                     "description": "OpenAI-compatible serving through a job queue"},
            "paths": paths, "components": {"schemas": defs.get("$defs", {})}}


@bp.get("/openapi.json")
def openapi():
    return jsonify(document())
