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
* `reclaim_stale` returns the jobs of a crashed worker (expired leases) to the queue, or fails
  them after `max_attempts` claims (a page that kills its worker every time is not retried
  forever).

Leases use the clients' clocks (UTC): hosts are NTP-synchronised and leases last minutes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from infra.db.models import OcrJob, OcrJobStatus, OcrWorker, utcnow
from infra.db.session import session_scope

DEFAULT_LEASE_SECONDS = 600.0
DEFAULT_MAX_ATTEMPTS = 3
HEARTBEAT_SECONDS = 5.0  # how often a worker refreshes its row and its leases
LIVE_WORKER_SECONDS = 6 * HEARTBEAT_SECONDS  # a worker silent for longer counts as gone


class QueueTimeoutError(TimeoutError):
    """A batch was not answered in time (no live worker, or jobs left unclaimed too long)."""


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
    """Add a batch of pending jobs; returns their ids in the order given."""
    rows = [
        OcrJob(
            batch_id=batch_id,
            request_key=job.request_key,
            status=OcrJobStatus.PENDING,
            mode=job.mode,
            page_width=job.page_width,
            page_height=job.page_height,
            estimated_text_tokens=job.estimated_text_tokens,
            max_new_tokens=job.max_new_tokens,
            image=job.image,
            image_format=job.image_format,
        )
        for job in jobs
    ]
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def claim_batch(
    *, session: Session, worker_id: str, limit: int, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> list[ClaimedJob]:
    """Claim up to `limit` pending jobs, oldest first, under a lease of `lease_seconds`."""
    if limit <= 0:
        return []
    now = utcnow()
    claimable = (
        select(OcrJob.id)
        .where(OcrJob.status == OcrJobStatus.PENDING)
        .order_by(OcrJob.id)
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
            OcrJob.attempts,
            OcrJob.request_key,
            OcrJob.image,
            OcrJob.image_format,
            OcrJob.page_width,
            OcrJob.page_height,
            OcrJob.mode,
            OcrJob.estimated_text_tokens,
            OcrJob.max_new_tokens,
        )
    ).all()
    jobs = [
        ClaimedJob(
            id=row.id,
            attempts=row.attempts,
            spec=JobSpec(
                request_key=row.request_key,
                image=row.image,
                image_format=row.image_format,
                page_width=row.page_width,
                page_height=row.page_height,
                mode=row.mode,
                estimated_text_tokens=row.estimated_text_tokens,
                max_new_tokens=row.max_new_tokens,
            ),
        )
        for row in claimed
    ]
    return sorted(jobs, key=lambda job: job.id)


def extend_leases(
    *,
    session: Session,
    worker_id: str,
    job_ids: Sequence[int],
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> int:
    """Push the leases of jobs this worker still holds; returns how many it still holds."""
    if not job_ids:
        return 0
    result = session.execute(
        update(OcrJob)
        .where(_held_by(worker_id), OcrJob.id.in_(job_ids))
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
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
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


def reclaim_stale(*, session: Session, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
    """Return jobs whose lease expired to the queue (failed after `max_attempts` claims)."""
    now = utcnow()
    expired = (OcrJob.status == OcrJobStatus.CLAIMED, OcrJob.lease_expires_at < now)
    exhausted = session.execute(
        update(OcrJob)
        .where(*expired, OcrJob.attempts >= max_attempts)
        .values(
            status=OcrJobStatus.FAILED,
            error=f"lease expired on each of {max_attempts} claims (worker crashed or stalled)",
            image=None,
            finished_at=now,
        )
    ).rowcount
    requeued = session.execute(
        update(OcrJob)
        .where(*expired)
        .values(status=OcrJobStatus.PENDING, claimed_by=None, lease_expires_at=None)
    ).rowcount
    return exhausted + requeued


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
    """Mark a worker stopped (a clean shutdown; a crashed one just stops beating)."""
    session.execute(
        update(OcrWorker)
        .where(OcrWorker.id == worker_id)
        .values(stopped_at=utcnow(), pages_done=pages_done)
    )


def live_workers(*, session: Session, within_seconds: float) -> list[OcrWorker]:
    """Workers that beat within the last `within_seconds` and have not signed off."""
    since = utcnow() - timedelta(seconds=within_seconds)
    return list(
        session.scalars(
            select(OcrWorker).where(OcrWorker.last_seen_at >= since, OcrWorker.stopped_at.is_(None))
        )
    )


def wait_for_batch(
    *,
    database_url: str,
    batch_id: str,
    worker_grace_seconds: float,
    timeout: float | None = None,
    poll_seconds: float = 0.2,
) -> list[JobOutcome]:
    """Poll until every job of the batch is terminal, then collect it.

    Gives up, cancelling the batch, when no live worker has been seen for
    `worker_grace_seconds` (nobody serves the queue: the caller should fail its pages now rather
    than wait forever) or after `timeout` seconds overall. A long queue ahead of the batch is no
    reason to give up while workers are alive.
    """
    started = last_worker_seen = time.monotonic()
    while True:
        with session_scope(database_url) as session:
            outcomes = collect(session=session, batch_id=batch_id)
            if outcomes is not None:
                return outcomes
            if live_workers(session=session, within_seconds=LIVE_WORKER_SECONDS):
                last_worker_seen = time.monotonic()
        now = time.monotonic()
        reason = None
        if now - last_worker_seen > worker_grace_seconds:
            reason = f"no live GPU worker for {now - last_worker_seen:.0f} s"
        elif timeout is not None and now - started > timeout:
            reason = f"not answered within {timeout:.0f} s"
        if reason:
            with session_scope(database_url) as session:
                cancel(session=session, batch_id=batch_id)
            raise QueueTimeoutError(f"OCR batch {batch_id} abandoned: {reason}")
        time.sleep(poll_seconds)


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
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_MAX_ATTEMPTS",
    "HEARTBEAT_SECONDS",
    "LIVE_WORKER_SECONDS",
    "ClaimedJob",
    "JobOutcome",
    "JobSpec",
    "QueueTimeoutError",
    "WorkerInfo",
    "batch_counts",
    "cancel",
    "claim_batch",
    "collect",
    "complete",
    "enqueue",
    "extend_leases",
    "fail",
    "heartbeat",
    "live_workers",
    "reclaim_stale",
    "sign_off",
    "wait_for_batch",
]
