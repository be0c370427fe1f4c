"""The Files API: /v1/files. Files are stored for the Batch API (``tasks/filestore.py``)."""

from __future__ import annotations

import os

from flask import Blueprint, current_app, jsonify, request, send_file

from config.errors import InvalidRequest, PayloadTooLarge
from tasks.filestore import FileStore
from web.auth import current_tenant
from web.schemas.files import CreateFileRequest, ListFilesRequest
from web.validation import validate

bp = Blueprint("files", __name__)

# Room for the multipart framing and the other form fields around the file itself.
FORM_OVERHEAD = 64 * 1024
# OpenAI's bounds on ``expires_after[seconds]``: an hour to 30 days.
EXPIRES_AFTER = (3600, 2_592_000)


def store() -> FileStore:
    ferry = current_app.extensions["ferry"]
    return FileStore(ferry.relay.redis, ferry.settings.files_dir)


@bp.post("/v1/files")
def create_file():
    tenant = current_tenant()
    limit = tenant.max_file_bytes or current_app.extensions["ferry"].settings.max_file_bytes
    request.max_content_length = limit + FORM_OVERHEAD
    form = request.form
    lifetime = _lifetime(form) or current_app.extensions["ferry"].settings.file_ttl
    req = validate(CreateFileRequest, form.to_dict())
    upload = request.files.get("file")
    if upload is None:
        raise InvalidRequest("Missing the 'file' part of the form.", param="file")
    upload.stream.seek(0, os.SEEK_END)
    if upload.stream.tell() > limit:
        raise PayloadTooLarge(f"The file is larger than the limit of {limit} bytes "
                              "(max_file_bytes).", param="file")
    upload.stream.seek(0)
    obj = store().put(upload.stream, os.path.basename(upload.filename or "upload.jsonl"),
                      req.purpose, tenant.owner, lifetime)
    return jsonify(obj.model_dump())


def _lifetime(form) -> int | None:
    """OpenAI's ``expires_after[anchor]=created_at`` and ``expires_after[seconds]``, in
    seconds; None if the form has neither."""
    fields = {k: v for k, v in form.items() if k.startswith("expires_after")}
    if not fields:
        return None
    unknown = set(fields) - {"expires_after[anchor]", "expires_after[seconds]"}
    if unknown:
        raise InvalidRequest(f"Unknown field {sorted(unknown)[0]}.", param=sorted(unknown)[0])
    if fields.get("expires_after[anchor]") != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.",
                             param="expires_after[anchor]")
    low, high = EXPIRES_AFTER
    seconds = fields.get("expires_after[seconds]", "")
    if not seconds.isdigit() or not low <= int(seconds) <= high:
        raise InvalidRequest(f"expires_after[seconds] must be a whole number of seconds from "
                             f"{low} to {high}.", param="expires_after[seconds]")
    return int(seconds)


@bp.get("/v1/files")
def list_files():
    q = validate(ListFilesRequest, request.args.to_dict())
    files, has_more = store().list(current_tenant().owner, q.purpose, q.order, q.after, q.limit)
    return jsonify({"object": "list", "data": [f.model_dump() for f in files],
                    "first_id": files[0].id if files else None,
                    "last_id": files[-1].id if files else None, "has_more": has_more})


@bp.get("/v1/files/<file_id>")
def retrieve_file(file_id: str):
    return jsonify(store().get(file_id, owner=current_tenant().owner).model_dump())


@bp.get("/v1/files/<file_id>/content")
def retrieve_file_content(file_id: str):
    files, owner = store(), current_tenant().owner
    obj = files.get(file_id, owner=owner)
    return send_file(files.open(file_id, owner=owner), mimetype="application/octet-stream",
                     download_name=obj.filename, as_attachment=True)


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str):
    store().delete(file_id, owner=current_tenant().owner)
    return jsonify({"id": file_id, "object": "file", "deleted": True})
