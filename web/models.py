"""GET /v1/models and /v1/models/{model}: OpenAI's shapes, or Anthropic's when the request
carries ``anthropic-version`` (as Anthropic's clients always send it)."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, current_app, jsonify, request

from config.settings import ModelEntry

bp = Blueprint("models", __name__)


def model_object(entry: ModelEntry) -> dict:
    try:
        created = int(entry.weights_path().stat().st_mtime) if entry.weights else 0
    except OSError:
        created = 0
    return {"id": entry.name, "object": "model", "created": created, "owned_by": entry.owned_by}


def _anthropic() -> bool:
    return "anthropic-version" in request.headers


def _anthropic_model(entry: ModelEntry) -> dict:
    created = datetime.fromtimestamp(model_object(entry)["created"], timezone.utc)
    return {"type": "model", "id": entry.name, "display_name": entry.name,
            "created_at": created.isoformat().replace("+00:00", "Z")}


@bp.get("/v1/models")
def list_models():
    registry = current_app.extensions["ferry"].registry
    if _anthropic():
        data = [_anthropic_model(e) for e in registry]
        return jsonify({"data": data, "has_more": False,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[-1]["id"] if data else None})
    return jsonify({"object": "list", "data": [model_object(e) for e in registry]})


@bp.get("/v1/models/<path:model>")
def retrieve_model(model: str):
    entry = current_app.extensions["ferry"].registry.resolve(model)
    return jsonify(_anthropic_model(entry) if _anthropic() else model_object(entry))
