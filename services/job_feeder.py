"""The GPU worker's CPU side, on its own thread: claim jobs ahead, prepare them, answer them.

The decode loop (the engine's `serve`, on the worker's main thread) polls this feeder between
decode steps for prepared pages and reports each finished page back. Everything that touches
Postgres or does CPU work per page runs here instead: claiming (so the decode loop never waits on
the database), image decoding and the engine's `prepare` (views, prompt ids; on
`PREPARE_THREADS` threads, while this thread goes on answering and claiming), building the
result (`result`: text, grounding), and writing each answer as soon as its page finishes.

The feeder keeps at most `max_batch + prefetch` jobs claimed and unanswered: enough that a freed
slot finds a prepared page waiting, few enough that the rest of the queue stays with other
workers. `close` (SIGTERM) stops claiming; the pages already held are still decoded and
answered, then the feed reports itself closed and the decode loop returns.

Every heartbeat interval, busy or not, the feeder also returns dead workers' pages to the queue
(`ocr_queue.reclaim_stale`): a worker whose slots are full claims nothing for minutes, and the
pages of a killed neighbour must not wait for its next claim.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

from infra.db import ocr_queue
from infra.db.ocr_queue import ClaimedJob, LeasePolicy
from infra.db.session import session_scope
from models.engine import OcrResult
from models.queue_engine import job_to_request, result_to_dict
from models.streaming import StreamingEngine, is_out_of_memory

logger = logging.getLogger(__name__)

# Jobs per claim: the feeder claims its room in chunks, answering the pages that finished in
# between, so a large room (hundreds of slots on an H200) neither holds every claimed image
# (MBs each) in memory at once nor keeps finished pages unanswered while it prepares them all.
CLAIM_CHUNK_JOBS = 32
# Threads that prepare a claimed chunk (image decoding and the views, in Pillow and torch, which
# release the GIL): one thread prepared ~20-40 ms per page, about the rate an H200 finishes
# pages, while competing with the decode loop; `bench.e2e_replay` prepares with 8.
PREPARE_THREADS = 4


class FeederSettings(Protocol):
    """What the feeder reads of the worker's configuration (`gpu_worker.WorkerConfig`)."""

    database_url: str
    max_batch: int
    policy: LeasePolicy
    poll_seconds: float
    once: bool

    @property
    def in_flight_limit(self) -> int: ...


class LeaseHolder(Protocol):
    """The heartbeat thread's view of the jobs held (`gpu_worker.LeaseKeeper`)."""

    pages_done: int

    def hold(self, job_ids: list[int]) -> None: ...

    def release(self, job_ids: list[int]) -> None: ...


@dataclass(frozen=True)
class _Answer:
    """A job's outcome: a result, or the error that ended it."""

    job: ClaimedJob
    result: OcrResult | None = None
    error: str | None = None
    out_of_memory: bool = False


class JobFeeder(threading.Thread):
    """A `PageFeed` for the worker's engine, filled from the queue by this thread."""

    def __init__(
        self,
        stream: StreamingEngine[Any, Any],
        worker_id: str,
        config: FeederSettings,
        keeper: LeaseHolder,
    ) -> None:
        super().__init__(name="job-feeder", daemon=True)
        self.stream, self.worker_id, self.config, self.keeper = stream, worker_id, config, keeper
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._ready: deque[Any] = deque()  # prepared pages the decode loop has not taken
        self._held: dict[int, tuple[Any, ClaimedJob]] = {}  # id(page) -> page, job
        self._unprepared = 0  # claimed, not yet in `_ready` (or failed to prepare)
        self._unanswered = 0  # claimed and not yet answered, prepared or not
        self._finished: list[tuple[Any, Any]] = []  # (page, output or error) to answer
        self._unpreparable: list[_Answer] = []  # claimed pages that could not be prepared
        self._claimed_count = 0  # jobs claimed so far: the claim order of the next one
        self._next_to_feed = 0  # claim order of the next page to join `_ready`
        self._prepared_early: dict[int, tuple[ClaimedJob, Any]] = {}  # order -> job, page
        self._closing = threading.Event()  # no more claims
        self._serving_ended = False
        self._stopped = False  # the thread has ended: nothing joins the feed any more
        self._preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")

    # The decode loop's side.

    def take(self, limit: int, *, wait: bool) -> list[Any] | None:
        with self._changed:
            while wait and not self._ready and not self._drained():
                self._changed.wait(self.config.poll_seconds)  # the timeout notices `close`
            if not self._ready:
                return None if self._drained() else []
            return [self._ready.popleft() for _ in range(min(limit, len(self._ready)))]

    def on_finished(self, page: Any, outcome: Any) -> None:
        with self._changed:
            self._finished.append((page, outcome))
            self._changed.notify_all()

    # The worker's side.

    def close(self) -> None:
        """Stop claiming; the pages held are still decoded and answered. Only sets an event,
        so a signal handler may call it whatever the threads hold."""
        self._closing.set()

    def serving_ended(self) -> None:
        """The decode loop has returned: answer what it reported, then end the thread (pages it
        never reported, after a crash, keep their leases until they expire)."""
        self._closing.set()
        with self._changed:
            self._serving_ended = True
            self._changed.notify_all()

    # The thread.

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            self.error = error
            logger.exception("%s: the job feeder stopped", self.worker_id)
        finally:
            self._preparing.shutdown(wait=False, cancel_futures=True)
            self._closing.set()
            with self._changed:
                self._stopped = True  # pages still being prepared are dropped (leases expire)
                self._unprepared = 0  # the decode loop finishes what it holds and returns
                self._changed.notify_all()

    def _drained(self) -> bool:
        """No page will be added to the feed any more (call with `_changed` held)."""
        return self._closing.is_set() and not self._unprepared

    def _serve(self) -> None:
        next_claim = 0.0  # monotonic time of the next claim; later after an empty queue
        next_reclaim = 0.0  # monotonic time of the next look for dead workers' jobs
        while True:
            with self._changed:
                finished, self._finished = self._finished, []
                unpreparable, self._unpreparable = self._unpreparable, []
                held = [self._held.pop(id(page)) for page, _ in finished]
                room = self.config.in_flight_limit - self._unanswered + len(finished)
                claiming = not self._closing.is_set() and room > 0
                now = time.monotonic()
                claim_due = claiming and now >= next_claim
                reclaim_due = now >= next_reclaim
                if not finished and not unpreparable and not claim_due and not reclaim_due:
                    if self._serving_ended or (self._closing.is_set() and not self._unanswered):
                        return
                    # Not claiming: look again soon anyway, `close` only sets an event.
                    wake = next_claim if claiming else now + self.config.poll_seconds
                    wake = min(wake, next_reclaim)
                    self._changed.wait(max(0.001, min(wake - now, 1.0)))
                    continue
            self._answer(
                unpreparable
                + [
                    self._answer_for(page, job, outcome)
                    for (page, job), (_, outcome) in zip(held, finished, strict=True)
                ]
            )
            if reclaim_due:
                self._reclaim()
                next_reclaim = time.monotonic() + self.config.policy.heartbeat_seconds
            if claim_due:
                claimed = self._claim(min(room, CLAIM_CHUNK_JOBS))
                next_claim = 0.0 if claimed else time.monotonic() + self.config.poll_seconds
                if not claimed and self.config.once and not self._unanswered:
                    self._closing.set()  # the queue is drained and nothing is held

    def _reclaim(self) -> None:
        """Return dead workers' jobs to the queue. Housekeeping: a database blip is logged
        and the next interval tries again, the worker goes on."""
        policy = self.config.policy
        try:
            with session_scope(self.config.database_url) as session:
                ocr_queue.reclaim_stale(
                    session=session,
                    max_attempts=policy.max_attempts,
                    stale_after_seconds=policy.stale_after_seconds,
                )
        except Exception:
            logger.warning("%s: reclaiming stale jobs failed", self.worker_id, exc_info=True)

    def _claim(self, limit: int) -> int:
        """Claim up to `limit` jobs and start preparing each; returns how many. This thread does
        not wait for them: it goes on answering finished pages and claiming up to the limit
        (waiting here kept a worker's slots a third empty while pages queued up, on a busy
        host: `bench/results/e2e_gpu_2000_queue.json`)."""
        with session_scope(self.config.database_url) as session:
            jobs = ocr_queue.claim_batch(
                session=session,
                worker_id=self.worker_id,
                limit=limit,
                lease_seconds=self.config.policy.lease_seconds,
            )
        self.keeper.hold([job.id for job in jobs])
        with self._changed:
            self._unanswered += len(jobs)
            self._unprepared += len(jobs)
        for job in jobs:
            # Held until answered: without its image (MBs), which is decoded into the request.
            held = replace(job, spec=replace(job.spec, image=b""))
            future = self._preparing.submit(self._prepare, job)
            future.add_done_callback(partial(self._prepared, self._claimed_count, held))
            self._claimed_count += 1
        return len(jobs)

    def _prepared(self, order: int, job: ClaimedJob, future: Future[Any]) -> None:
        """A preparing thread's page joins the feed in claim order, as soon as it and those
        claimed before it are prepared; one that could not be prepared is answered failed by
        the feeder thread (an undecodable image: this page fails, not the worker)."""
        if future.cancelled():  # the feeder is stopping
            return
        with self._changed:
            if self._stopped:
                return
            self._prepared_early[order] = (job, future.result())
            while self._next_to_feed in self._prepared_early:
                job, page = self._prepared_early.pop(self._next_to_feed)
                self._next_to_feed += 1
                self._unprepared -= 1
                if isinstance(page, Exception):
                    self._unpreparable.append(_Answer(job, error=f"{type(page).__name__}: {page}"))
                else:
                    self._held[id(page)] = (page, job)
                    self._ready.append(page)
            self._changed.notify_all()

    def _prepare(self, claimed: ClaimedJob) -> Any:
        """The engine's page for a job, or the error that kept it from one."""
        try:
            return self.stream.prepare(job_to_request(claimed))
        except Exception as error:
            logger.exception("%s: page job %d could not be prepared", self.worker_id, claimed.id)
            return error

    def _answer_for(self, page: Any, job: ClaimedJob, outcome: Any) -> _Answer:
        if isinstance(outcome, Exception):
            logger.error("%s: page job %d failed: %r", self.worker_id, job.id, outcome)
            reason = f"{self.stream.name} failed: {type(outcome).__name__}: {outcome}"
            return _Answer(job, error=reason, out_of_memory=is_out_of_memory(outcome))
        try:
            return _Answer(job, result=self.stream.result(page, outcome))
        except Exception as error:
            logger.exception("%s: page job %d has no result", self.worker_id, job.id)
            return _Answer(job, error=f"{self.stream.name} failed: {type(error).__name__}: {error}")

    def _answer(self, answers: list[_Answer]) -> None:
        if not answers:
            return
        accepted = 0
        with session_scope(self.config.database_url) as session:
            for answer in answers:
                if answer.result is not None:
                    accepted += ocr_queue.complete(
                        session=session,
                        worker_id=self.worker_id,
                        job_id=answer.job.id,
                        result=result_to_dict(answer.result),
                    )
                else:
                    # Out of memory alone may pass on a card with more room: let another try.
                    ocr_queue.fail(
                        session=session,
                        worker_id=self.worker_id,
                        job_id=answer.job.id,
                        error=answer.error or "unknown error",
                        retry=answer.out_of_memory,
                        max_attempts=self.config.policy.max_attempts,
                    )
        self.keeper.release([answer.job.id for answer in answers])
        self.keeper.pages_done += accepted  # answers to leases lost to another worker: dropped
        with self._changed:
            self._unanswered -= len(answers)


__all__ = ["FeederSettings", "JobFeeder", "LeaseHolder"]
