"""Ferry's one exception tree.

Every layer raises these; the web layer maps them onto the OpenAI error envelope
``{"error": {"message", "type", "param", "code"}}`` with ``status``. Workers send them
across Redis as ``Failed`` events built from the same attributes, so an error raised in a
backend reaches the client with the status it would have had in-process.
Errors are recognised by class and ``code``, never by matching message text.
"""

from __future__ import annotations


class FerryError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(FerryError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """The request is well formed but asks for something this model cannot do."""

    code = "unsupported_parameter"


class HostNotFound(InvalidRequest):
    """A URL's host does not resolve (now: a webhook sender tries again later)."""

    code = "host_not_found"


class AuthenticationFailed(FerryError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(FerryError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )


class PayloadTooLarge(FerryError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(FerryError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServiceUnavailable(FerryError):
    """No live worker serves the model, or Redis is unreachable."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class WorkerLost(FerryError):
    """The worker running the request died or stopped answering."""

    status = 503
    type = "server_error"
    code = "worker_lost"


class JobLost(FerryError):
    """The job's queued message is gone (lost with Redis's last writes, or with a worker killed
    as it took it) and no worker started it: it will never run."""

    status = 503
    type = "server_error"
    code = "job_lost"


class JobExpired(FerryError):
    """The job was not started before its deadline (nobody waits for it any more)."""

    status = 408
    type = "invalid_request_error"
    code = "expired"


class JobCancelled(FerryError):
    """The job was cancelled before it started (a running job ends with its partial output)."""

    status = 409
    type = "invalid_request_error"
    code = "cancelled"


class GenerationFailed(FerryError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class RequestExpired(FerryError):
    """Nobody waits for the request any more: it was still queued at its deadline."""

    status = 408
    type = "invalid_request_error"
    code = "expired"


def rebuild(error: dict, status: int) -> FerryError:
    """Rebuild an error that crossed Redis (see ``config.contract.events.Failed``)."""
    err = FerryError(error.get("message") or "error", param=error.get("param"), code=error.get("code"))
    err.type = error.get("type") or FerryError.type
    err.status = status
    return err

