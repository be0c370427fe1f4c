"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from config.settings import ModelEntry

bp = Blueprint("models", __name__)


def model_object(entry: ModelEntry) -> dict:
    try:
        created = int(entry.weights_path().stat().st_mtime) if entry.weights else 0
    except OSError:
        created = 0
    return {"id": entry.name, "object": "model", "created": created, "owned_by": entry.owned_by}


@bp.get("/v1/models")
def list_models():
    registry = current_app.extensions["ferry"].registry
    return jsonify({"object": "list", "data": [model_object(e) for e in registry]})


@bp.get("/v1/models/<path:model>")
def retrieve_model(model: str):
    return jsonify(model_object(current_app.extensions["ferry"].registry.resolve(model)))
