"""Runs batch jobs: validate the input, run it chunk by chunk, assemble the output files.

Delivery: a batch worker may die at any point. Chunk tasks are acknowledged late, so a
dead worker's chunk is run again; its results are stored once (``BatchStore.write_chunk``)
and the output is assembled from the stored chunks in order, so nothing is lost and nothing
is duplicated. Finalizing is idempotent too: output files get ids derived from the batch id.
Every line runs as the batch's owner, and its output files are the owner's.

A batch always ends. Kombu's Redis transport takes a message off its list (BRPOP) before it
records it as unacknowledged (``QoS.append``, a second round trip): a worker killed between
the two loses that message for good, and no visibility timeout brings it back. So the batch
workers also sweep for stalled batches (``resume_stalled``): no chunk written and none
running for a visibility timeout means their unwritten work is queued again (harmless, as
above). A chunk that cannot run (its input file deleted, or its retries spent) ends its
batch ``failed``, or has its lines reported as failed (``give_up``), instead of leaving it
``in_progress``.
Chat and completions lines run side by side, each through the request core the HTTP routes
use (``tasks.core.endpoints.answer``); a chunk's embedding lines run as one job
(``tasks.core.embeddings.run_parts``), each still answered as the endpoint would answer it.
Needs gevent (the lines of a chunk are greenlets; the core's relay follows events with
gevent), so it runs in ``tasks/batch_worker.py``, which patches first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

import gevent.pool

from config.errors import JobExpired, JobLost, NotFound, ServiceUnavailable, WorkerLost
from config.settings import Settings
from config.tenants import ANY_OWNER, Tenant
from tasks.batch_lines import (Line, LineError, TooManyLines, error_record,
                               invalid_from_json, invalid_to_json, parse, read_lines,
                               response_record, scan)
from config.contract.protocol import connect
from tasks.batchstore import FINAL, BatchObject, BatchStore, ChunkResult
from tasks.core import endpoints, services
from tasks.core.embeddings import run_parts
from tasks.core.endpoints import Answer
from tasks.core.generation import Caller
from tasks.core.schemas.embeddings import CreateEmbeddingRequest
from tasks.filestore import FileStore

log = logging.getLogger(__name__)

EnqueueChunk = Callable[[str, int], None]
EnqueueStart = Callable[[str], None]
NOT_RUN = (None, None)
EXPIRED = LineError("batch_expired",
                    "This request could not be executed before the completion window expired.")


# A line whose model worker died under it is run again, this many times at most: the worker's
# death is not the request's fault, but a line that kills every worker must not go on for ever.
LOST_RETRIES = 2
# Failures that say nothing about the line itself, only that its model could not take it
# just then (no live worker while one restarts, its job's message lost with a Redis restart,
# its wait given up): the line is run again, backing off, until ``batch_line_timeout`` after
# it first ran. OpenAI's batches ride out capacity problems the same way.
TRANSIENT = {ServiceUnavailable.code, JobLost.code, JobExpired.code}
# The longest pause between two runs of a line (doubling from 1 s): a restarted worker is
# seen within this much of its return.
MAX_PAUSE = 8.0


def _code(answer: Answer | None) -> str | None:
    """The error code of a failed answer (None for a success or a cancelled line)."""
    if answer is None or 200 <= answer[0] < 300 or not isinstance(answer[2], dict):
        return None
    return (answer[2].get("error") or {}).get("code")


def _record(obj: BatchObject, line: Line, status: int, request_id: str | None,
            body) -> tuple[str | None, str | None]:
    """(output record, None) for a success, (None, error record) otherwise."""
    record = response_record(obj.id, line, status, request_id, body)
    return (record, None) if 200 <= status < 300 else (None, record)


class BatchRunner:
    def __init__(self, settings: Settings):
        self.settings = settings
        redis = connect(settings.redis_url)
        self.store = BatchStore(redis, settings.batch_retention)
        self.files = FileStore(redis, settings.files_dir)
        # The request core's services: lines are its requests. They may wait in a model's
        # queue for as long as interactive requests keep coming first.
        self.ferry = services.build(settings.model_copy(
            update={"queue_timeout": settings.batch_line_timeout}))

    def _batch(self, batch_id: str) -> BatchObject:
        """The batch, whoever owns it: the runner works for every owner."""
        return self.store.get(batch_id, owner=ANY_OWNER)

    # -- validating ------------------------------------------------------------------------

    def start(self, batch_id: str, enqueue_chunk: EnqueueChunk) -> None:
        """Validate, then queue every chunk not yet written (again, if this is a rerun).
        A batch cancelled meanwhile still runs its chunks, which then skip their lines."""
        if self._batch(batch_id).status == "validating" and not self._validate(batch_id):
            return
        plan = self.store.plan(batch_id)
        if not plan:  # cancelled before it was validated
            self.store.transition(batch_id, "cancelled", "cancelling")
            return
        if self._batch(batch_id).status in FINAL:
            return
        for index in range(len(plan)):
            if not self.store.chunk_written(batch_id, index):
                enqueue_chunk(batch_id, index)

    def _validate(self, batch_id: str) -> bool:
        obj = self._batch(batch_id)
        try:
            with self.files.open(obj.input_file_id, owner=obj.owner) as f:
                chunks, invalid, total = scan(f, obj.endpoint, self.settings.batch_chunk_lines,
                                              self.settings.batch_max_lines)
        except NotFound as e:
            self.store.fail(obj.id, [{"code": "invalid_file", "message": e.message,
                                      "param": "input_file_id", "line": None}])
            return False
        except TooManyLines as e:
            self.store.fail(obj.id, [{
                "code": "too_many_requests_in_file", "param": "input_file_id", "line": e.line,
                "message": f"The input file has more than {e.limit} requests, the limit per "
                           "batch (FERRY_BATCH_MAX_LINES); reading stopped at this line."}])
            return False
        if total == len(invalid):
            errors = [line.error.to_dict(n) for n, line in sorted(invalid.items())][:1000]
            self.store.fail(obj.id, errors or [{"code": "empty_file", "param": "input_file_id",
                                                "message": "The input file has no requests.",
                                                "line": None}])
            return False
        self.store.set_plan(obj.id, total, chunks,
                            {n: invalid_to_json(line) for n, line in invalid.items()})
        self.store.transition(obj.id, "in_progress", "validating")
        return True

    # -- running ---------------------------------------------------------------------------

    def run_chunk(self, batch_id: str, index: int) -> None:
        obj = self._batch(batch_id)
        if obj.status in FINAL:
            return
        if not self.store.chunk_written(batch_id, index):
            beat = gevent.spawn(self._beat, batch_id)
            try:
                result = self._run(obj, index)
            except NotFound as e:  # the input file was deleted under the batch
                self.store.fail(batch_id, [{"code": "invalid_file", "message": e.message,
                                            "param": "input_file_id", "line": None}])
                log.warning("batch %s failed: %s", batch_id, e.message)
                return
            finally:
                beat.kill()
            if self.store.write_chunk(batch_id, index, result) is None:
                log.info("batch %s chunk %d was already written; this run is dropped",
                         batch_id, index)
        done, total = self.store.chunks_done(batch_id)
        if total and done >= total:
            self.finalize(batch_id)

    def _beat(self, batch_id: str) -> None:
        """While a chunk runs, its batch is making progress (``resume_stalled`` leaves it)."""
        while True:
            gevent.sleep(self.settings.batch_visibility_timeout / 4)
            try:
                self.store.touch(batch_id)
            except Exception as e:  # the next beat tries again
                log.warning("batch %s: could not record progress: %s", batch_id, e)

    def give_up(self, batch_id: str, index: int, error: str) -> None:
        """A chunk that failed every retry: its lines are reported as failed, so that its
        batch still ends (failed outright if even its input can no longer be read)."""
        obj = self._batch(batch_id)
        if obj.status in FINAL or self.store.chunk_written(batch_id, index):
            return
        err = LineError("batch_chunk_failed", f"This request could not be run: {error}")
        try:
            chunk = self.store.plan(batch_id)[index]
            with self.files.open(obj.input_file_id, owner=obj.owner) as f:
                lines = [parse(n, raw, obj.endpoint)
                         for n, raw in read_lines(f, chunk.start, chunk.end, chunk.first_line)]
        except (NotFound, IndexError) as e:
            self.store.fail(batch_id, [{"code": "batch_chunk_failed", "param": None,
                                        "line": None, "message": f"{error} ({e})"}])
            return
        result = ChunkResult(errors=[error_record(batch_id, line, err) for line in lines])
        self.store.write_chunk(batch_id, index, result)
        done, total = self.store.chunks_done(batch_id)
        if total and done >= total:
            self.finalize(batch_id)

    def resume_stalled(self, enqueue_start: EnqueueStart, enqueue_chunk: EnqueueChunk) -> None:
        """Queue again the unfinished work of batches with no progress for a visibility
        timeout (see the module docstring). Any number of workers may sweep: one claims
        each stalled batch."""
        before = time.time() - self.settings.batch_visibility_timeout
        for batch_id in self.store.stalled(before):
            if not self.store.claim_stalled(batch_id, before):
                continue
            try:
                obj = self._batch(batch_id)
            except NotFound:
                self.store.forget(batch_id)
                continue
            if obj.status in FINAL:
                self.store.forget(batch_id)
                continue
            plan = self.store.plan(batch_id)
            if not plan:  # not validated yet: its start task was lost
                log.warning("batch %s stalled while %s; starting it again", batch_id, obj.status)
                enqueue_start(batch_id)
                continue
            todo = [i for i in range(len(plan)) if not self.store.chunk_written(batch_id, i)]
            log.warning("batch %s made no progress for %g s; queueing %d chunks again",
                        batch_id, self.settings.batch_visibility_timeout, len(todo))
            # Every chunk written but not finalized: one chunk task finalizes it.
            for index in todo or [0]:
                enqueue_chunk(batch_id, index)

    def _run(self, obj: BatchObject, index: int) -> ChunkResult:
        chunk = self.store.plan(obj.id)[index]
        with self.files.open(obj.input_file_id, owner=obj.owner) as f:
            lines = list(read_lines(f, chunk.start, chunk.end, chunk.first_line))
        invalid = self.store.invalid(obj.id, range(lines[0][0], lines[-1][0] + 1))
        stopping = self._stop_check(obj)
        results: list[tuple[str | None, str | None]] = [NOT_RUN] * len(lines)
        todo: list[tuple[int, Line]] = []
        for k, (number, raw) in enumerate(lines):
            if number in invalid:
                line = invalid_from_json(number, invalid[number])
                results[k] = None, error_record(obj.id, line, line.error)
                continue
            stop = stopping()
            line = parse(number, raw, obj.endpoint)
            if stop == "expired":
                results[k] = None, error_record(obj.id, line, EXPIRED)
            elif stop is None:  # a cancelled batch reports what ran, nothing else
                todo.append((k, line))
        # Lines still waiting or running when the batch is cancelled are cancelled too (and
        # reported nowhere, as lines that never started).
        def abandoned() -> bool:
            return stopping() == "cancelling"

        answers = self._run_lines(obj, index, todo, abandoned, stopping)
        for k, line in todo:
            answer = answers[k]
            if answer is not None:  # None: cancelled with its batch
                results[k] = _record(obj, line, *answer)
        return ChunkResult(output=[o for o, _ in results if o], errors=[e for _, e in results if e])

    def _run_lines(self, obj: BatchObject, index: int, todo: list[tuple[int, Line]],
                   abandoned: Callable[[], bool],
                   stopping: Callable[[], str | None]) -> dict[int, Answer | None]:
        """Each line's answer, after running again those that failed for want of a worker
        (``TRANSIENT``, until ``batch_line_timeout``) or lost theirs (``LOST_RETRIES``)."""
        answers: dict[int, Answer | None] = {}
        lost: dict[int, int] = {}
        started, pause, pending = time.monotonic(), 1.0, todo
        while pending:
            for (k, _), answer in zip(pending, self._answers(obj, pending, abandoned)):
                answers[k] = answer
            again = []
            for k, line in pending:
                code = _code(answers[k])
                if code == WorkerLost.code:
                    lost[k] = lost.get(k, 0) + 1
                    if lost[k] <= LOST_RETRIES:
                        again.append((k, line))
                elif code in TRANSIENT:
                    again.append((k, line))
            late = time.monotonic() - started + pause > self.settings.batch_line_timeout
            if not again or abandoned() or stopping() is not None or late:
                break
            log.warning("batch %s chunk %d: %d lines found no worker or lost it; running them "
                        "again in %g s", obj.id, index, len(again), pause)
            gevent.sleep(pause)
            pause, pending = min(pause * 2, MAX_PAUSE), again
        return answers

    def _answers(self, obj: BatchObject, todo: list[tuple[int, Line]],
                 abandoned: Callable[[], bool]) -> list[Answer | None]:
        """Run the lines: each one's status, request id and body, as over HTTP (None for a
        line cancelled with its batch). A chunk's embedding lines run as one job (per model,
        ``run_parts``); other lines each as a request to the core, side by side."""
        if not todo:
            return []
        caller = Caller(Tenant(obj.owner), bulk=True, abandoned=abandoned)
        if obj.endpoint == "/v1/embeddings":
            reqs = [CreateEmbeddingRequest.model_validate(line.body) for _, line in todo]
            return run_parts(self.ferry, reqs, caller)

        def one(line: Line) -> Answer | None:  # None: cancelled with its batch
            return endpoints.answer(self.ferry, obj.endpoint, line.body, caller)

        return gevent.pool.Pool(len(todo)).map(one, [line for _, line in todo])

    def _stop_check(self, obj: BatchObject) -> Callable[[], str | None]:
        """Whether lines should still start: None, "cancelling" or "expired". Reads Redis
        at most once a second."""
        state = {"at": 0.0, "value": None}

        def check() -> str | None:
            now = time.time()
            if now > obj.expires_at:
                return "expired"
            if now - state["at"] >= 1:
                state["at"] = now
                cancelling = self._batch(obj.id).status == "cancelling"
                state["value"] = "cancelling" if cancelling else None
            return state["value"]

        return check

    # -- finalizing ------------------------------------------------------------------------

    def finalize(self, batch_id: str) -> None:
        if self._batch(batch_id).status in FINAL:
            return
        self.store.transition(batch_id, "finalizing", "in_progress")
        obj = self._batch(batch_id)
        output = self._write(obj, "output", lambda r: r.output) if obj.request_counts.completed else None
        errors = self._write(obj, "error", lambda r: r.errors) if obj.request_counts.failed else None
        status = ("cancelled" if obj.status == "cancelling"
                  else "expired" if time.time() > obj.expires_at else "completed")
        self.store.finish(batch_id, status, output, errors)
        log.info("batch %s %s: %s", batch_id, status, obj.request_counts)

    def _write(self, obj: BatchObject, kind: str, pick: Callable[[ChunkResult], list[str]]) -> str:
        def lines() -> Iterator[bytes]:
            for index in range(len(self.store.plan(obj.id))):
                result = self.store.chunk_result(obj.id, index)
                if result is None:
                    raise RuntimeError(f"batch {obj.id}: chunk {index} has no results")
                for record in pick(result):
                    yield record.encode() + b"\n"

        file_id = f"file-{uuid.uuid5(uuid.NAMESPACE_URL, f'{obj.id}/{kind}').hex}"
        return self.files.write(lines(), f"{obj.id}_{kind}.jsonl", "batch_output", file_id,
                                obj.owner, self.settings.file_ttl).id
