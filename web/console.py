"""The console at ``/``: a static page (``web/console/``: HTML, CSS and ES modules, no build
step, nothing fetched from elsewhere) that calls the /v1 API from the browser with the
key the user gives it. It holds no data of its own and needs no key to load: everything
it shows comes from /v1 with the caller's key, so it shows only that tenant's objects."""

from __future__ import annotations

from flask import Blueprint, send_from_directory

bp = Blueprint("console", __name__, static_folder="console", static_url_path="/console")


@bp.get("/")
def index():
    # Always revalidated: a new deployment's page is picked up on reload.
    resp = send_from_directory(bp.static_folder, "index.html", max_age=0)
    # Only this origin's own files run; the page cannot be framed (it holds a key).
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'")
    return resp
