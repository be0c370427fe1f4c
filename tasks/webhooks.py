"""Webhooks: the final job object, POSTed to the submitter's URL when a job ends.

Delivered by a Celery task on a queue of its own (``ferry.webhooks``, served by
``python -m tasks.worker --webhooks``), never from a web request or a model worker: a slow
or dead receiver holds up nothing but its own retries. At least once: a receiver may see a
job twice (after a timeout that hid a success), never a job that did not end.

Addresses are checked when the job is submitted and again, after a fresh DNS lookup, before
each attempt; redirects are not followed. (A name that resolves to a public address when
checked and to a private one a moment later can still slip through between the check and
the connect: operators who need that closed route webhooks through an egress proxy.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import requests
from celery import Celery, shared_task

from config.errors import InvalidRequest
from config.network import public_addresses
from tasks.protocol import WEBHOOK_QUEUE, WEBHOOK_TASK

log = logging.getLogger(__name__)


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise ``InvalidRequest`` (param ``webhook``) unless ``url`` is http(s) and every
    address its host resolves to is public (or ``allow_private``)."""
    public_addresses(url, allow_private=allow_private, param="webhook", what="webhook")


def notifier(celery: Celery) -> Callable:
    """``JobStore.on_end``: queue the delivery of a job's webhook, if it has one."""

    def notify(record) -> None:
        if not record.webhook:
            return
        try:
            celery.send_task(WEBHOOK_TASK, args=[record.webhook, record.public()],
                             queue=WEBHOOK_QUEUE)
        except Exception:
            log.exception("could not queue the webhook of job %s", record.id)

    return notify


def _attempt(url: str, job: dict, timeout: float) -> str | None:
    """One POST. None when delivered or not worth retrying, else why it should be retried."""
    try:
        r = requests.post(url, json=job, timeout=timeout, allow_redirects=False,
                          headers={"User-Agent": "ferry-webhook", "X-Ferry-Job-Id": job["id"]})
    except requests.RequestException as e:
        return f"{type(e).__name__}: {e}"
    if 200 <= r.status_code < 300:
        log.info("webhook of job %s delivered (HTTP %d)", job["id"], r.status_code)
        return None
    if r.status_code >= 500 or r.status_code in (408, 429):
        return f"HTTP {r.status_code}"
    log.warning("webhook of job %s refused by the receiver (HTTP %d); not retried",
                job["id"], r.status_code)
    return None


@shared_task(name=WEBHOOK_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver(self, url: str, job: dict) -> None:
    settings = self.app.ferry_settings
    try:
        check_url(url, allow_private=settings.webhook_allow_private)
    except InvalidRequest as e:
        log.warning("webhook of job %s not sent: %s", job["id"], e.message)
        return
    failure = _attempt(url, job, settings.webhook_timeout)
    if failure is None:
        return
    attempt = self.request.retries
    if attempt >= settings.webhook_retries:
        log.warning("webhook of job %s given up after %d attempts: %s", job["id"], attempt + 1,
                    failure)
        return
    log.info("webhook of job %s failed (%s); retrying in %d s", job["id"], failure, 2 ** attempt)
    raise self.retry(countdown=2 ** attempt)
