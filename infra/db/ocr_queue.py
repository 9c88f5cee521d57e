"""The GPU work queue on our own database: enqueue pages, claim them under a lease, answer them.

The protocol is olmOCR's work queue (claim, lease, mark done, reclaim stale locks) kept in one
table instead of flag files:

* the CPU side `enqueue`s a batch of pages under one `batch_id` and later `collect`s it;
* a GPU worker `claim_batch`es at most as many pending jobs as it has free slots. On Postgres
  the claim is `FOR UPDATE SKIP LOCKED`, so concurrent workers never take the same row and never
  wait on each other; SQLite serialises writers, which gives the same guarantee on one host;
* a worker `extend_leases` while it decodes and `complete`s or `fail`s each job. Completion is
  fenced by `claimed_by`: a worker whose lease was taken over cannot overwrite the new holder's
  answer, so every job is answered exactly once;
* `reclaim_stale` returns the jobs of a dead worker to the queue, or fails them after
  `max_attempts` claims (a page that kills its worker every time is not retried forever). A
  worker is dead when its leases expired or when it stopped heart-beating for a few heartbeat
  intervals, whichever comes first; its row is then marked stopped. Every live party runs it
  now and then: each worker's feeder and every CPU side waiting for a batch, so reclaiming
  needs no process of its own and happens as long as anyone uses the queue.

Leases and heartbeats use the clients' clocks (UTC): hosts are NTP-synchronised and the
intervals are seconds to a minute.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from infra.db.models import OcrJob, OcrJobStatus, OcrWorker, utcnow
from infra.db.session import session_scope
from infra.errors import EngineUnavailable
from infra.settings import Settings

logger = logging.getLogger(__name__)

STALE_HEARTBEATS = 4  # heartbeats a worker may miss before it counts as dead
MIN_STALE_SECONDS = 2.0  # never less: a beat can be late by a database round trip or a GC
LEASES_EXHAUSTED = "lease expired on each of"  # how a job failed by worker deaths begins


def _setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class LeasePolicy:
    """How long a claim lasts, how often workers beat, how soon silence counts as death.

    Every party to one queue should use the same policy (they read it from the same
    `OCRFLOW_QUEUE_*` settings): the reclaimer judges other workers' heartbeats by its own
    `heartbeat_seconds`.
    """

    lease_seconds: float = _setting_default("queue_lease_seconds")
    heartbeat_seconds: float = _setting_default("queue_heartbeat_seconds")
    max_attempts: int = _setting_default("queue_max_attempts")

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        return cls(
            lease_seconds=settings.queue_lease_seconds,
            heartbeat_seconds=settings.queue_heartbeat_seconds,
            max_attempts=settings.queue_max_attempts,
        )

    @property
    def stale_after_seconds(self) -> float:
        """A worker silent for longer is dead: not live, its jobs reclaimed, its row stopped."""
        return max(STALE_HEARTBEATS * self.heartbeat_seconds, MIN_STALE_SECONDS)


DEFAULT_POLICY = LeasePolicy()


@dataclass(frozen=True)
class JobSpec:
    """One page to enqueue: its encoded image and what the engine needs besides pixels."""

    request_key: str
    image: bytes
    image_format: str
    page_width: float
    page_height: float
    mode: str | None = None
    estimated_text_tokens: int | None = None
    max_new_tokens: int | None = None
    priority: float = 0.0  # lower is claimed first (then oldest first)


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds: the spec plus its id and how many times it has been claimed."""

    id: int
    attempts: int
    spec: JobSpec


@dataclass(frozen=True)
class JobOutcome:
    """A terminal job as the CPU side reads it back: a result dict or an error."""

    request_key: str
    status: str
    result: dict[str, Any] | None
    error: str | None


@dataclass
class WorkerInfo:
    """What a worker announces about itself in its heartbeat; one id per worker process."""

    device: str
    engine: str
    model_revision: str
    capacity: int
    host: str = field(default_factory=socket.gethostname)
    worker_id: str = ""

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or f"{self.host}:{os.getpid()}:{self.device}"


def enqueue(*, session: Session, batch_id: str, jobs: Sequence[JobSpec]) -> list[int]:
    """Add a batch of pending jobs; returns their ids in the order given.

    One bulk INSERT (no ORM objects): the ingest process enqueues every page of a run, and its
    unit-of-work flush per batch was a tenth of that process's time (py-spy, `bench.e2e_gpu`).
    """
    if not jobs:
        return []
    rows = [
        {
            "batch_id": batch_id,
            "request_key": job.request_key,
            "status": OcrJobStatus.PENDING,
            "mode": job.mode,
            "page_width": job.page_width,
            "page_height": job.page_height,
            "estimated_text_tokens": job.estimated_text_tokens,
            "max_new_tokens": job.max_new_tokens,
            "priority": job.priority,
            "image": job.image,
            "image_format": job.image_format,
        }
        for job in jobs
    ]
    inserted = session.execute(
        insert(OcrJob).returning(OcrJob.id, sort_by_parameter_order=True), rows
    )
    return list(inserted.scalars())


def claim_batch(
    *,
    session: Session,
    worker_id: str,
    limit: int,
    lease_seconds: float = DEFAULT_POLICY.lease_seconds,
) -> list[ClaimedJob]:
    """Claim up to `limit` pending jobs, lowest priority value first, then oldest, under a lease
    of `lease_seconds`; returned in that order (the worker prepares and decodes them so, and an
    escalation, older priority but newer id, goes ahead of the pages queued after its page)."""
    if limit <= 0:
        return []
    now = utcnow()
    claimable = (
        select(OcrJob.id)
        .where(OcrJob.status == OcrJobStatus.PENDING)
        .order_by(OcrJob.priority, OcrJob.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = session.execute(
        update(OcrJob)
        .where(OcrJob.id.in_(claimable.scalar_subquery()))
        .values(
            status=OcrJobStatus.CLAIMED,
            claimed_by=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=OcrJob.attempts + 1,
        )
        .returning(
            OcrJob.id,
            OcrJob.priority,
            OcrJob.attempts,
            OcrJob.request_key,
            OcrJob.image_format,
            OcrJob.page_width,
            OcrJob.page_height,
            OcrJob.mode,
            OcrJob.estimated_text_tokens,
            OcrJob.max_new_tokens,
        )
    ).all()
    images = _job_images(session, [row.id for row in claimed])
    # UPDATE ... RETURNING gives rows in no particular order: put them back in claim order.
    return [
        ClaimedJob(
            id=row.id,
            attempts=row.attempts,
            spec=JobSpec(
                request_key=row.request_key,
                image=images[row.id],
                image_format=row.image_format,
                page_width=row.page_width,
                page_height=row.page_height,
                mode=row.mode,
                estimated_text_tokens=row.estimated_text_tokens,
                max_new_tokens=row.max_new_tokens,
                priority=row.priority,
            ),
        )
        for row in sorted(claimed, key=lambda row: (row.priority, row.id))
    ]


def _job_images(session: Session, job_ids: list[int]) -> dict[int, bytes]:
    """The jobs' images, read row by row; on Postgres through psycopg in binary format.

    In text format a bytea arrives hex-encoded, twice its bytes, and psycopg decodes a whole
    fetch in one call that holds the GIL: ~200 ms a 32-page claim on an H200 host, while the
    worker's decode loop, on another thread of the same process, could launch nothing (py-spy,
    docs/gpu-worker.md). Binary rows are a copy each, and the GIL is free between them.
    """
    if not job_ids:
        return {}
    connection = session.connection()
    if connection.dialect.driver != "psycopg":
        rows = session.execute(select(OcrJob.id, OcrJob.image).where(OcrJob.id.in_(job_ids)))
        return {job_id: image for job_id, image in rows}
    schema = connection.get_execution_options().get("schema_translate_map", {}).get(None)
    table = sql.Identifier(*filter(None, (schema, OcrJob.__tablename__)))
    query = sql.SQL("SELECT id, image FROM {} WHERE id = ANY(%s)").format(table)
    driver = connection.connection.driver_connection  # same transaction as the claim
    with driver.cursor(binary=True) as cursor:
        cursor.execute(query, [job_ids])
        return dict(cursor)


def extend_leases(
    *,
    session: Session,
    worker_id: str,
    job_ids: Sequence[int],
    lease_seconds: float = DEFAULT_POLICY.lease_seconds,
) -> int:
    """Push the leases of jobs this worker still holds; returns how many it pushed.

    Rows another transaction has locked (being answered, or a batch being collected) are
    skipped rather than waited for: locking hundreds of rows in the order the planner likes
    while others lock some of them deadlocked on Postgres. A skipped lease is pushed at the
    next beat; leases are sized to survive a missed one.
    """
    if not job_ids:
        return 0
    held = (
        select(OcrJob.id)
        .where(_held_by(worker_id), OcrJob.id.in_(job_ids))
        .order_by(OcrJob.id)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(OcrJob)
        .where(OcrJob.id.in_(held.scalar_subquery()))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    return result.rowcount


def complete(*, session: Session, worker_id: str, job_id: int, result: dict[str, Any]) -> bool:
    """Store a job's result; False when the worker no longer holds it (the answer is dropped)."""
    return _finish(session, worker_id, job_id, status=OcrJobStatus.DONE, result=result, error=None)


def fail(
    *,
    session: Session,
    worker_id: str,
    job_id: int,
    error: str,
    retry: bool = False,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
) -> bool:
    """Record a failed attempt: back to the queue when `retry` and attempts remain, else failed."""
    if retry:
        requeued = session.execute(
            update(OcrJob)
            .where(_held_by(worker_id), OcrJob.id == job_id, OcrJob.attempts < max_attempts)
            .values(
                status=OcrJobStatus.PENDING, claimed_by=None, lease_expires_at=None, error=error
            )
        )
        if requeued.rowcount:
            return True
    return _finish(session, worker_id, job_id, status=OcrJobStatus.FAILED, result=None, error=error)


def reclaim_stale(
    *,
    session: Session,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
    stale_after_seconds: float = DEFAULT_POLICY.stale_after_seconds,
) -> int:
    """Return the jobs of dead workers to the queue; returns how many were returned or failed.

    A job's holder is dead when its lease expired, when it signed off, or when it has not beaten
    for `stale_after_seconds` (such workers' rows are marked stopped here). Leases alone would
    leave a killed worker's pages waiting a whole lease; a heartbeat notices within a few
    beats. A job claimed `max_attempts` times is failed instead (a page that kills its worker
    every time is not retried forever). Rows another transaction holds are skipped, not waited
    for, so any number of parties may run this at once.
    """
    now = utcnow()
    _mark_silent_workers_stopped(session, now - timedelta(seconds=stale_after_seconds), now)
    dead_holders = select(OcrWorker.id).where(OcrWorker.stopped_at.is_not(None))
    is_stale = (
        OcrJob.status == OcrJobStatus.CLAIMED,
        or_(OcrJob.lease_expires_at < now, OcrJob.claimed_by.in_(dead_holders)),
    )
    stale_ids = list(
        session.scalars(select(OcrJob.id).where(*is_stale).with_for_update(skip_locked=True))
    )
    if not stale_ids:
        return 0
    # The condition again: SQLite has no row locks, a worker may have answered meanwhile.
    stale = (OcrJob.id.in_(stale_ids), *is_stale)
    exhausted = session.execute(
        update(OcrJob)
        .where(*stale, OcrJob.attempts >= max_attempts)
        .values(
            status=OcrJobStatus.FAILED,
            error=f"{LEASES_EXHAUSTED} {max_attempts} claims (worker died or stalled)",
            image=None,
            finished_at=now,
        )
    ).rowcount
    requeued = session.execute(
        update(OcrJob)
        .where(*stale)
        .values(status=OcrJobStatus.PENDING, claimed_by=None, lease_expires_at=None)
    ).rowcount
    if exhausted or requeued:
        logger.info("reclaimed %d job(s) of dead workers, failed %d", requeued, exhausted)
    return exhausted + requeued


def is_lease_exhausted(error: str | None) -> bool:
    """Whether a failed job was failed by `reclaim_stale` (its workers kept dying), not by an
    engine: a reason to try the page again later rather than to blame it."""
    return bool(error) and error.startswith(LEASES_EXHAUSTED)


def _mark_silent_workers_stopped(session: Session, silent_since: datetime, now: datetime) -> None:
    is_silent = (OcrWorker.stopped_at.is_(None), OcrWorker.last_seen_at < silent_since)
    silent_ids = list(
        session.scalars(select(OcrWorker.id).where(*is_silent).with_for_update(skip_locked=True))
    )
    if silent_ids:
        session.execute(
            update(OcrWorker).where(OcrWorker.id.in_(silent_ids), *is_silent).values(stopped_at=now)
        )
        logger.warning("GPU worker(s) stopped heart-beating, marked stopped: %s", silent_ids)


def batch_counts(*, session: Session, batch_id: str) -> dict[str, int]:
    """Jobs of a batch by status."""
    rows = session.execute(
        select(OcrJob.status, func.count())
        .where(OcrJob.batch_id == batch_id)
        .group_by(OcrJob.status)
    )
    return {status: count for status, count in rows}


def collect(*, session: Session, batch_id: str) -> list[JobOutcome] | None:
    """The outcomes of a finished batch, deleting its rows; None while any job is not terminal."""
    counts = batch_counts(session=session, batch_id=batch_id)
    if any(status not in OcrJobStatus.TERMINAL for status in counts):
        return None
    rows = session.execute(
        select(OcrJob.request_key, OcrJob.status, OcrJob.result, OcrJob.error)
        .where(OcrJob.batch_id == batch_id)
        .order_by(OcrJob.id)
    ).all()
    cancel(session=session, batch_id=batch_id)
    return [JobOutcome(row.request_key, row.status, row.result, row.error) for row in rows]


def collect_finished(
    *, session: Session, batch_ids: Collection[str]
) -> list[tuple[str, JobOutcome]]:
    """The terminal jobs of these batches as (batch id, outcome), deleting them as they are read:
    a caller that streams its pages takes each answer once, as soon as it is there, instead of
    waiting for its whole batch (`collect`)."""
    if not batch_ids:
        return []
    rows = session.execute(
        delete(OcrJob)
        .where(OcrJob.batch_id.in_(list(batch_ids)), OcrJob.status.in_(OcrJobStatus.TERMINAL))
        .returning(
            OcrJob.id,
            OcrJob.batch_id,
            OcrJob.request_key,
            OcrJob.status,
            OcrJob.result,
            OcrJob.error,
        )
    ).all()
    return [
        (row.batch_id, JobOutcome(row.request_key, row.status, row.result, row.error))
        for row in sorted(rows, key=lambda row: row.id)
    ]


def cancel(*, session: Session, batch_id: str) -> int:
    """Delete a batch's jobs (a worker still decoding one finds it gone and drops its answer)."""
    return session.execute(delete(OcrJob).where(OcrJob.batch_id == batch_id)).rowcount


def heartbeat(*, session: Session, worker: WorkerInfo, pages_done: int = 0) -> None:
    """Create or refresh this worker's row."""
    row = session.get(OcrWorker, worker.worker_id)
    if row is None:
        row = OcrWorker(
            id=worker.worker_id,
            host=worker.host,
            device=worker.device,
            engine=worker.engine,
            model_revision=worker.model_revision,
            capacity=worker.capacity,
        )
        session.add(row)
    row.last_seen_at = utcnow()
    row.capacity = worker.capacity
    row.pages_done = pages_done
    row.stopped_at = None


def sign_off(*, session: Session, worker_id: str, pages_done: int) -> None:
    """Mark a worker stopped (a clean shutdown; `reclaim_stale` marks a crashed one once its
    heartbeat is stale)."""
    session.execute(
        update(OcrWorker)
        .where(OcrWorker.id == worker_id)
        .values(stopped_at=utcnow(), pages_done=pages_done)
    )


def live_workers(
    *, session: Session, within_seconds: float = DEFAULT_POLICY.stale_after_seconds
) -> list[OcrWorker]:
    """Workers that beat within the last `within_seconds` and have not stopped."""
    since = utcnow() - timedelta(seconds=within_seconds)
    return list(
        session.scalars(
            select(OcrWorker).where(OcrWorker.last_seen_at >= since, OcrWorker.stopped_at.is_(None))
        )
    )


# Database URL -> when a batch last gave up there for want of a live worker (this process).
_abandoned_at: dict[str, datetime] = {}
_abandoned_lock = threading.Lock()


def mark_abandoned(database_url: str) -> None:
    """Remembers that work on this database gave up for want of a live worker."""
    with _abandoned_lock:
        _abandoned_at[database_url] = utcnow()


def raise_if_abandoned(database_url: str) -> None:
    """Raise `EngineUnavailable` at once when a batch of this process gave up on this database
    for want of a live worker and no worker has beaten there since.

    The grace is spent once: the next window or document of the run would only wait it again
    for the same verdict, while its pages could already be scheduled for a retry.
    """
    with _abandoned_lock:
        since = _abandoned_at.get(database_url)
    if since is None:
        return
    with session_scope(database_url) as session:
        beaten = session.scalar(
            select(func.count()).select_from(OcrWorker).where(OcrWorker.last_seen_at > since)
        )
    if beaten:
        with _abandoned_lock:
            if _abandoned_at.get(database_url) == since:
                del _abandoned_at[database_url]
        return
    raise EngineUnavailable(
        f"no GPU worker has beaten since an earlier batch gave up at {since:%H:%M:%S} UTC"
    )


def wait_for_batch(
    *,
    database_url: str,
    batch_id: str,
    worker_grace_seconds: float,
    timeout: float | None = None,
    poll_seconds: float = 0.2,
    policy: LeasePolicy = DEFAULT_POLICY,
) -> list[JobOutcome]:
    """Poll until every job of the batch is terminal, then collect it.

    Raises `EngineUnavailable`, cancelling the batch, when no live worker has been seen for
    `worker_grace_seconds` (nobody serves the queue: the caller should make its pages
    retryable now rather than wait forever), at once when an earlier batch gave up the same
    way and no worker has beaten since (`raise_if_abandoned`), or after `timeout` seconds
    overall. A long queue ahead of the batch is no reason to give up while workers are alive.
    While it waits it reclaims dead workers' jobs every heartbeat interval, so a batch whose
    worker was killed goes on with the survivors even if none of them is claiming. Database
    errors propagate as they are (after a best-effort cancel).
    """
    try:
        raise_if_abandoned(database_url)
        return _poll_batch(
            database_url, batch_id, worker_grace_seconds, timeout, poll_seconds, policy
        )
    except BaseException:
        cancel_quietly(database_url, batch_id)
        raise


def _poll_batch(
    database_url: str,
    batch_id: str,
    worker_grace_seconds: float,
    timeout: float | None,
    poll_seconds: float,
    policy: LeasePolicy,
) -> list[JobOutcome]:
    started = last_worker_seen = next_reclaim = time.monotonic()
    while True:
        if time.monotonic() >= next_reclaim:
            with session_scope(database_url) as session:
                reclaim_stale(
                    session=session,
                    max_attempts=policy.max_attempts,
                    stale_after_seconds=policy.stale_after_seconds,
                )
            next_reclaim = time.monotonic() + policy.heartbeat_seconds
        with session_scope(database_url) as session:
            outcomes = collect(session=session, batch_id=batch_id)
            if outcomes is not None:
                return outcomes
            if live_workers(session=session, within_seconds=policy.stale_after_seconds):
                last_worker_seen = time.monotonic()
        now = time.monotonic()
        if now - last_worker_seen > worker_grace_seconds:
            mark_abandoned(database_url)
            raise EngineUnavailable(
                f"OCR batch {batch_id} abandoned: no live GPU worker for "
                f"{now - last_worker_seen:.0f} s"
            )
        if timeout is not None and now - started > timeout:
            raise EngineUnavailable(
                f"OCR batch {batch_id} abandoned: not answered within {timeout:.0f} s"
            )
        time.sleep(poll_seconds)


def cancel_quietly(database_url: str, batch_id: str) -> None:
    """Delete an abandoned batch so no worker spends time on it; a database that is away
    leaves the rows (collected by nobody, they are only dead weight)."""
    try:
        with session_scope(database_url) as session:
            cancel(session=session, batch_id=batch_id)
    except Exception:
        logger.warning("could not cancel abandoned OCR batch %s", batch_id, exc_info=True)


def _held_by(worker_id: str):
    return (OcrJob.status == OcrJobStatus.CLAIMED) & (OcrJob.claimed_by == worker_id)


def _finish(
    session: Session,
    worker_id: str,
    job_id: int,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: str | None,
) -> bool:
    finished = session.execute(
        update(OcrJob)
        .where(_held_by(worker_id), OcrJob.id == job_id)
        .values(status=status, result=result, error=error, image=None, finished_at=utcnow())
    )
    return bool(finished.rowcount)


__all__ = [
    "DEFAULT_POLICY",
    "LEASES_EXHAUSTED",
    "ClaimedJob",
    "JobOutcome",
    "JobSpec",
    "LeasePolicy",
    "WorkerInfo",
    "batch_counts",
    "cancel",
    "cancel_quietly",
    "claim_batch",
    "collect",
    "collect_finished",
    "complete",
    "enqueue",
    "extend_leases",
    "fail",
    "heartbeat",
    "is_lease_exhausted",
    "live_workers",
    "mark_abandoned",
    "raise_if_abandoned",
    "reclaim_stale",
    "sign_off",
    "wait_for_batch",
]
