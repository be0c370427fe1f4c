"""The Batch API: /v1/batches. A batch is validated and run by batch workers
(``tasks/batch_worker.py``) from the ``ferry.batch`` queue; this only records and reports it."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, request

from config.errors import InvalidRequest, NotFound
from tasks.batchstore import BatchStore
from tasks.filestore import FileStore
from config.contract.protocol import BATCH_QUEUE, BATCH_START_TASK
from web.auth import current_tenant
from web.schemas.batches import CreateBatchRequest, ListBatchesRequest
from web.validation import parse_body, validate

bp = Blueprint("batches", __name__)


def batches() -> BatchStore:
    ferry = current_app.extensions["ferry"]
    return BatchStore(ferry.relay.redis, ferry.settings.batch_retention)


# What BatchStore.create names a batch. Other ids are no batch; passed on, ``<id>:plan``
# would name one of a batch's own Redis keys (a 500).
_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def _known(batch_id: str) -> str:
    if not _BATCH_ID.fullmatch(batch_id):
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch_id


@bp.post("/v1/batches")
def create_batch():
    req = parse_body(CreateBatchRequest)
    ferry = current_app.extensions["ferry"]
    owner = current_tenant().owner
    try:
        source = FileStore(ferry.relay.redis, ferry.settings.files_dir).get(req.input_file_id,
                                                                            owner=owner)
    except NotFound:
        raise InvalidRequest(f"No such file: {req.input_file_id}.", param="input_file_id") from None
    if source.purpose != "batch":
        raise InvalidRequest(f"File {source.id} was not uploaded for purpose 'batch'.",
                             param="input_file_id")
    batch = batches().create(req.endpoint, req.input_file_id, req.metadata, owner)
    ferry.batch_celery.send_task(BATCH_START_TASK, args=[batch.id], queue=BATCH_QUEUE)
    return jsonify(batch.model_dump())


@bp.get("/v1/batches")
def list_batches():
    q = validate(ListBatchesRequest, request.args.to_dict())
    found, has_more = batches().list(current_tenant().owner, q.after, q.limit)
    return jsonify(q.page([b.model_dump() for b in found], has_more))


@bp.get("/v1/batches/<batch_id>")
def retrieve_batch(batch_id: str):
    return jsonify(batches().get(_known(batch_id), owner=current_tenant().owner).model_dump())


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    return jsonify(batches().cancel(_known(batch_id), owner=current_tenant().owner).model_dump())
