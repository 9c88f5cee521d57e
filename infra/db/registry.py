"""The S3 object registry: which content versions exist, which are deleted, who processes what.

Keyword-only data functions, each one transaction's worth of work inside the caller's session.
The database decides every race: the unique (bucket, key, etag) decides registration
(`INSERT ... ON CONFLICT DO NOTHING`), and a claim is taken with `FOR UPDATE SKIP LOCKED` on
Postgres or a compare-and-set `UPDATE` on SQLite, so duplicate and out-of-order events and
concurrent sweeps yield one processing per content version.

A claim is a lease: its holder renews it (`renew_claim`) while it works, so a run killed with
SIGKILL lets go within one lease and the next run retakes the version, while a long document
is never taken over by a second run. A version whose claims expired `max_attempts` times ends
`failed` with the reason instead of staying `claimed` forever.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import String, and_, case, cast, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from infra.db.models import SourceObject, SourceObjectStatus, WatchedPrefix, utcnow
from infra.s3 import S3Location, S3Object

Status = SourceObjectStatus


@dataclass(frozen=True)
class ClaimedObject:
    """A content version one worker holds. `attempt` fences its outcome against a lost lease."""

    id: int
    bucket: str
    key: str
    etag: str
    version_id: str | None
    worker: str
    attempt: int

    @property
    def uri(self) -> str:
        return S3Location(self.bucket, self.key).uri


@dataclass(frozen=True)
class SweepPass:
    """One listing pass over a watched prefix; `start_after` resumes an interrupted one."""

    bucket: str
    prefix: str
    start_after: str | None
    started_at: datetime


# Registration ---------------------------------------------------------------------------


def register_versions(
    *, session: Session, objects: Sequence[S3Object], seen_at: datetime, by_event: bool = False
) -> int:
    """Records the versions a listing or HEAD found; returns how many were new.

    Known versions are marked seen; one that had been marked deleted is current again (the same
    bytes are back under the key) and, if never processed, pending again. One upsert in key
    order: concurrent sweeps lock rows in the same order and cannot deadlock.
    """
    unique = {(o.bucket, o.key, o.etag): o for o in objects}
    if not unique:
        return 0
    insert = _dialect_insert(session)(SourceObject).values(
        [_new_row(o, seen_at, by_event) for _, o in sorted(unique.items())]
    )
    seen = {
        "last_seen_at": insert.excluded.last_seen_at,
        "deleted_at": None,
        "status": case(
            (SourceObject.status == Status.GONE, Status.PENDING), else_=SourceObject.status
        ),
        "version_id": func.coalesce(insert.excluded.version_id, SourceObject.version_id),
    }
    if by_event:
        seen["last_event_at"] = insert.excluded.last_event_at
    upsert = insert.on_conflict_do_update(index_elements=["bucket", "key", "etag"], set_=seen)
    first_seen = session.scalars(upsert.returning(SourceObject.first_seen_at)).all()
    # A row this statement inserted carries our timestamp; a known one keeps its own.
    return sum(1 for moment in first_seen if _aware(moment) == seen_at)


def mark_versions_deleted(
    *, session: Session, bucket: str, key: str, keep_etag: str | None, at: datetime
) -> int:
    """Marks every version of a key except `keep_etag` (the current one, if any) as deleted."""
    condition = [
        SourceObject.bucket == bucket,
        SourceObject.key == key,
        SourceObject.deleted_at.is_(None),
    ]
    if keep_etag is not None:
        condition.append(SourceObject.etag != keep_etag)
    return _mark_deleted(session, and_(*condition), at)


def mark_unseen_deleted(
    *, session: Session, bucket: str, prefix: str, seen_since: datetime, at: datetime
) -> int:
    """Marks versions under a prefix that a complete listing pass did not see as deleted."""
    condition = and_(
        SourceObject.bucket == bucket,
        SourceObject.key.startswith(prefix, autoescape=True),
        SourceObject.deleted_at.is_(None),
        SourceObject.last_seen_at < seen_since,
    )
    return _mark_deleted(session, condition, at)


def _mark_deleted(session: Session, condition, at: datetime) -> int:
    # A version deleted before anyone processed it will never be: it is gone. Results of
    # processed versions stay, only the mark changes.
    gone_if_pending = case(
        (SourceObject.status == Status.PENDING, Status.GONE), else_=SourceObject.status
    )
    result = session.execute(
        update(SourceObject)
        .where(condition)
        .values(deleted_at=at, status=gone_if_pending)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def _new_row(obj: S3Object, seen_at: datetime, by_event: bool) -> dict:
    last_modified = obj.last_modified.astimezone(UTC) if obj.last_modified else None
    return {
        "bucket": obj.bucket,
        "key": obj.key,
        "etag": obj.etag,
        "version_id": obj.version_id,
        "size_bytes": obj.size,
        "last_modified": last_modified,
        "status": Status.PENDING,
        "attempts": 0,
        "first_seen_at": seen_at,
        "last_seen_at": seen_at,
        "last_event_at": seen_at if by_event else None,
        "created_at": seen_at,
        "updated_at": seen_at,
    }


def _dialect_insert(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"the registry supports Postgres and SQLite, not {dialect}")


# Claims -----------------------------------------------------------------------------------


def claim_next(
    *,
    session: Session,
    worker: str,
    lease: timedelta,
    max_attempts: int,
    bucket: str | None = None,
    exclude: Collection[int] = (),
) -> ClaimedObject | None:
    """Takes one version nobody holds (pending, or claimed under a lease that ran out).

    Versions with no attempt left are marked failed first (`fail_exhausted`). `exclude`: ids
    not to take again (a run skips what it just returned for a retry, so it cannot spend every
    attempt of a version within seconds).
    """
    now = utcnow()
    fail_exhausted(session=session, lease=lease, max_attempts=max_attempts, bucket=bucket, now=now)
    scope = [SourceObject.bucket == bucket] if bucket else []
    if exclude:
        scope.append(SourceObject.id.not_in(list(exclude)))
    candidates = (
        select(SourceObject)
        .where(
            *scope,
            or_(
                SourceObject.status == Status.PENDING,
                and_(
                    SourceObject.status == Status.CLAIMED,
                    SourceObject.claimed_at < now - lease,
                ),
            ),
            SourceObject.attempts < max_attempts,
        )
        .order_by(SourceObject.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        row = session.scalars(candidates.with_for_update(skip_locked=True)).first()
        return _take(session, row, worker, now) if row else None
    # SQLite has no row locks: re-check in the UPDATE itself and retry if another worker won.
    while (row := session.scalars(candidates).first()) is not None:
        claimed = _take(session, row, worker, now)
        if claimed is not None:
            return claimed
    return None


def _take(session: Session, row: SourceObject, worker: str, now: datetime) -> ClaimedObject | None:
    """Claims `row` if its attempt count is still what we read (compare-and-set)."""
    result = session.execute(
        update(SourceObject)
        .where(SourceObject.id == row.id, SourceObject.attempts == row.attempts)
        .values(
            status=Status.CLAIMED,
            claimed_by=worker,
            claimed_at=now,
            attempts=row.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.expire(row)
        return None
    return ClaimedObject(
        id=row.id,
        bucket=row.bucket,
        key=row.key,
        etag=row.etag,
        version_id=row.version_id,
        worker=worker,
        attempt=row.attempts + 1,
    )


def fail_exhausted(
    *,
    session: Session,
    lease: timedelta,
    max_attempts: int,
    bucket: str | None = None,
    now: datetime | None = None,
) -> int:
    """Marks failed the versions that can never be claimed again: claimed under an expired lease
    with every attempt used (each run holding it died), or pending with none left (the limit
    was lowered). Returns how many; their `error` says why."""
    now = now or utcnow()
    scope = [SourceObject.bucket == bucket] if bucket else []
    attempts = cast(SourceObject.attempts, String)
    expired = and_(SourceObject.status == Status.CLAIMED, SourceObject.claimed_at < now - lease)
    reason = case(
        (
            and_(expired, SourceObject.error.is_(None)),
            "claim expired on each of " + attempts + " attempts (the runs holding it died or "
            "were killed); last holder: " + func.coalesce(SourceObject.claimed_by, "?"),
        ),
        (
            expired,
            "claim expired on attempt "
            + attempts
            + " of "
            + attempts
            + "; before that: "
            + SourceObject.error,
        ),
        else_="no attempt left: "
        + attempts
        + " used; before that: "
        + func.coalesce(SourceObject.error, "?"),
    )
    result = session.execute(
        update(SourceObject)
        .where(
            *scope,
            SourceObject.attempts >= max_attempts,
            or_(SourceObject.status == Status.PENDING, expired),
        )
        .values(status=Status.FAILED, error=reason, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def renew_claim(*, session: Session, claim: ClaimedObject) -> bool:
    """Extends a held claim's lease from now; False if the claim was lost meanwhile."""
    now = utcnow()
    result = session.execute(
        update(SourceObject)
        .where(*_held(claim))
        .values(claimed_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_claim(
    *,
    session: Session,
    claim: ClaimedObject,
    status: str,
    document_id: int | None = None,
    error: str | None = None,
    refund: bool = False,
) -> bool:
    """Records a claim's outcome; False if the claim was lost (its lease ran out and moved on).

    `refund` gives the attempt back: the failure was an outage (S3 or the database away), which
    says nothing about the version and must not use up its attempts.
    """
    values: dict[str, object] = {"status": status, "document_id": document_id, "error": error}
    if refund:
        values["attempts"] = SourceObject.attempts - 1
    result = session.execute(
        update(SourceObject)
        .where(*_held(claim))
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _held(claim: ClaimedObject) -> list:
    """The fence: the row is still claimed by this worker, at this attempt."""
    return [
        SourceObject.id == claim.id,
        SourceObject.status == Status.CLAIMED,
        SourceObject.claimed_by == claim.worker,
        SourceObject.attempts == claim.attempt,
    ]


def status_counts(*, session: Session, bucket: str | None = None) -> dict[str, int]:
    """Versions per status, plus `deleted` (versions no longer in the bucket)."""
    scope = [SourceObject.bucket == bucket] if bucket else []
    by_status = session.execute(
        select(SourceObject.status, func.count()).where(*scope).group_by(SourceObject.status)
    ).all()
    counts = {status: count for status, count in by_status}
    counts["deleted"] = session.scalar(
        select(func.count()).where(SourceObject.deleted_at.is_not(None), *scope)
    )
    return counts


# Watched prefixes -------------------------------------------------------------------------


def begin_pass(*, session: Session, bucket: str, prefix: str) -> SweepPass:
    """Watches the prefix from now on; resumes its interrupted pass, or starts a new one."""
    now = utcnow()
    session.execute(
        _dialect_insert(session)(WatchedPrefix)
        .values(bucket=bucket, prefix=prefix, objects_listed=0, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["bucket", "prefix"])
    )
    watched = session.scalars(
        select(WatchedPrefix).where(WatchedPrefix.bucket == bucket, WatchedPrefix.prefix == prefix)
    ).one()
    if watched.cursor is None or watched.pass_started_at is None:
        watched.pass_started_at = now
        watched.cursor = None
        watched.objects_listed = 0
    return SweepPass(bucket, prefix, watched.cursor, _aware(watched.pass_started_at))


def save_cursor(*, session: Session, sweep: SweepPass, cursor: str, listed: int) -> None:
    """Records a committed listing page, so an interrupted pass resumes after it."""
    session.execute(
        update(WatchedPrefix)
        .where(WatchedPrefix.bucket == sweep.bucket, WatchedPrefix.prefix == sweep.prefix)
        .values(cursor=cursor, objects_listed=WatchedPrefix.objects_listed + listed)
        .execution_options(synchronize_session=False)
    )


def finish_pass(*, session: Session, sweep: SweepPass) -> int:
    """Closes a complete pass: versions it did not see are deleted. Returns how many."""
    now = utcnow()
    deleted = mark_unseen_deleted(
        session=session,
        bucket=sweep.bucket,
        prefix=sweep.prefix,
        seen_since=sweep.started_at,
        at=now,
    )
    session.execute(
        update(WatchedPrefix)
        .where(WatchedPrefix.bucket == sweep.bucket, WatchedPrefix.prefix == sweep.prefix)
        .values(cursor=None, pass_started_at=None, last_swept_at=now)
        .execution_options(synchronize_session=False)
    )
    return deleted


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
