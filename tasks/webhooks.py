"""Webhooks: the final job object, POSTed to the submitter's URL when a job ends.

Delivered by a Celery task on an app and queue of their own (``make_webhook_celery``,
served by ``python -m tasks.worker --webhooks``), never from a web request or a model
worker: a slow or dead receiver holds up nothing but its own retries.

At least once, a crash of the webhook worker included: a delivery and a pending retry stay
unacknowledged in Redis until they end, and another worker takes them once the dead one's
``webhook_visibility_timeout`` has passed. So a receiver may see a job twice (after a
timeout that hid a success, a crash after a success, or a crash between queueing a retry and
acknowledging the attempt it replaces), never a job that did not end.

The URL is checked when the job is submitted and again, after a fresh DNS lookup, before
each attempt, which then connects to an address that check approved (``config/network.py``:
no DNS rebinding, no URL two parsers read differently); redirects are not followed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from celery import shared_task

from config import network
from config.errors import HostNotFound, InvalidRequest
from config.settings import Settings
from tasks.app import make_webhook_celery
from config.contract.protocol import WEBHOOK_QUEUE, WEBHOOK_TASK

log = logging.getLogger(__name__)


def check_url(url: str, *, allow_private: bool) -> network.Target:
    """The checked target (param ``webhook``), or ``InvalidRequest`` unless ``url`` is an
    unambiguous http(s) URL whose host resolves only to public addresses (or ``allow_private``)."""
    return network.target(url, allow_private=allow_private, param="webhook", what="webhook")


def notifier(settings: Settings) -> Callable:
    """``JobStore.on_end``: queue the delivery of a job's webhook, if it has one."""
    celery = make_webhook_celery(settings)

    def notify(record) -> None:
        if not record.webhook:
            return
        try:
            celery.send_task(WEBHOOK_TASK, args=[record.webhook, record.public()],
                             queue=WEBHOOK_QUEUE)
        except Exception:
            log.exception("could not queue the webhook of job %s", record.id)

    return notify


def _attempt(url: str, job: dict, settings: Settings) -> str | None:
    """Check the URL afresh and POST. None when delivered or not worth retrying, else why
    it should be retried."""
    try:
        target = check_url(url, allow_private=settings.webhook_allow_private)
    except HostNotFound as e:
        return e.message  # a resolver hiccup must not lose the webhook
    except InvalidRequest as e:
        log.warning("webhook of job %s not sent: %s", job["id"], e.message)
        return None
    try:
        reply = network.send(target, "POST", timeout=settings.webhook_timeout,
                             body=json.dumps(job).encode(),
                             headers={"User-Agent": "ferry-webhook", "X-Ferry-Job-Id": job["id"],
                                      "Content-Type": "application/json"})
    except InvalidRequest as e:
        return e.message
    if 200 <= reply.status < 300:
        log.info("webhook of job %s delivered (HTTP %d)", job["id"], reply.status)
        return None
    if reply.status >= 500 or reply.status in (408, 429):
        return f"HTTP {reply.status}"
    log.warning("webhook of job %s refused by the receiver (HTTP %d); not retried",
                job["id"], reply.status)
    return None


@shared_task(name=WEBHOOK_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver(self, url: str, job: dict) -> None:
    settings = self.app.ferry_settings
    failure = _attempt(url, job, settings)
    if failure is None:
        return
    attempt = self.request.retries
    if attempt >= settings.webhook_retries:
        log.warning("webhook of job %s given up after %d attempts: %s", job["id"], attempt + 1,
                    failure)
        return
    delay = settings.webhook_backoff * 2 ** attempt
    log.info("webhook of job %s failed (%s); retrying in %g s", job["id"], failure, delay)
    raise self.retry(countdown=delay)
