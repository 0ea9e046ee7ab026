"""The adapter registry: which adapter each user of a fleet has, whether it shipped, which base it is bound to, and
the state of the job that trains them. The registry *is* the job's state, so a killed driver or worker loses nothing
and running the same command again resumes.

One database through SQLAlchemy 2: a SQLite file by default (no server; WAL, so readers never wait for the writer;
foreign keys enforced), or PostgreSQL by URL (``postgresql+psycopg://user@host/db``), with the same SQL on both.
Tables are prefixed ``lowra_`` so the registry can live in a database an app already uses.

Each adapter version of a user moves through these states (the ``status`` column, with a ``reason``)::

    queued -> training -> trained -> active | gated_out
                 |                    active -> retired  (a newer version ships, or its base is retired)
                 +-> failed           retry(user) and retire_base(fingerprint) queue a new version

Work is claimed, never assigned: :meth:`Registry.claim_next` takes the oldest queued version (or one whose worker's
lease ran out, i.e. a killed worker's) in one transaction and records an attempt with a lease. Only the version's
current attempt can :meth:`~Registry.complete` or :meth:`~Registry.fail` it, so a worker presumed dead that comes back
later can never register a second adapter. A blob is registered only once it is on disk under its final name (the
worker writes it with :func:`~lowra.device_runtime._files.atomic_write_bytes`) and its sha256 matches the file, so a
half-written blob is never registered; each attempt writes under its own name (:attr:`Claim.blob_name`), so a late
writer cannot replace a registered blob either.

On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock first, so two processes cannot
both read "queued" and both take the user); on PostgreSQL the rows are locked with ``FOR UPDATE SKIP LOCKED``.
Open one :class:`Registry` per process (an engine's connections must not cross a fork).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (JSON, BigInteger, CheckConstraint, DateTime, Engine, ForeignKey, String, Text, TypeDecorator,
                        Select, UniqueConstraint, create_engine, event, func, inspect, select)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lowra.device_runtime._files import file_sha256
from lowra.sdk.errors import ConfigError, DatasetError, LowraError
from lowra.sdk.fleet.gate import GateDecision

SCHEMA_VERSION = 1
STATUSES = ("queued", "training", "trained", "gated_out", "active", "retired", "failed")
IN_FLIGHT = ("queued", "training")
BOUND_TO_BASE = ("trained", "active", "gated_out")  # what retiring a base retires
DEFAULT_MAX_ATTEMPTS = 3
BLOB_SUFFIX = ".lowra"
# A user id names folders and blob files: one path component, no hidden files, no traversal.
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
DATASET_FILES = ("train.jsonl", "heldout.jsonl", "user.json")
SQLITE_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another's transaction; ours last milliseconds


class RegistryError(LowraError, ValueError):
    """The registry refuses a request: unknown user, wrong state, or a database it cannot use."""


class RegistrySchemaError(RegistryError):
    """The database holds a registry of another schema version (or lowra tables without one)."""


class StaleAttemptError(RegistryError):
    """An attempt that is no longer its version's current one (its lease ran out and the user was reclaimed, or it
    already finished) tried to complete, fail or renew: its result must be dropped."""


class BlobMismatchError(RegistryError):
    """The blob to register is missing, or its bytes do not have the sha256 the worker reported."""


# ------------------------------------------------------------------------------------------------ schema
class _UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the column: SQLite stores no time zone, and one convention on
    every database keeps lease comparisons exact."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ConfigError(f"registry times must be timezone-aware (UTC); got naive {value.isoformat()}")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class _Model(DeclarativeBase):
    type_annotation_map = {datetime: _UTCDateTime(), dict[str, Any]: JSON}


class SchemaVersion(_Model):
    __tablename__ = "lowra_schema"
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class User(_Model):
    __tablename__ = "lowra_users"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created: Mapped[datetime]


class BaseModelRecord(_Model):
    """A base fingerprint adapters are bound to; ``retired`` once :meth:`Registry.retire_base` replaced it."""

    __tablename__ = "lowra_bases"
    fingerprint: Mapped[str] = mapped_column(String(128), primary_key=True)
    created: Mapped[datetime]
    retired: Mapped[datetime | None]


class AdapterVersion(_Model):
    __tablename__ = "lowra_adapter_versions"
    __table_args__ = (
        UniqueConstraint("user_id", "version"),
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")", name="known_status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("lowra_users.id"), index=True)
    version: Mapped[int]  # 1, 2, ... per user, never reused
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    dataset_path: Mapped[str] = mapped_column(Text)
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    blob_path: Mapped[str | None] = mapped_column(Text)
    blob_sha256: Mapped[str | None] = mapped_column(String(64))
    base_fingerprint: Mapped[str | None] = mapped_column(ForeignKey("lowra_bases.fingerprint"), index=True)
    bits: Mapped[float | None]  # effective bits per parameter, every byte of the blob counted
    bytes: Mapped[int | None] = mapped_column(BigInteger)  # the blob file's size
    card: Mapped[dict[str, Any]] = mapped_column(default=dict)  # data summary, held-out losses, gate decision
    created: Mapped[datetime]
    updated: Mapped[datetime]


class Attempt(_Model):
    """One worker's try at one version; ``outcome`` stays null while it holds the lease."""

    __tablename__ = "lowra_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("lowra_adapter_versions.id"), index=True)
    worker_id: Mapped[str] = mapped_column(String(256))
    started: Mapped[datetime]
    lease_expires: Mapped[datetime] = mapped_column(index=True)
    finished: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))  # completed, failed or expired
    reason: Mapped[str] = mapped_column(Text, default="")


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Claim:
    """A version a worker now trains, until ``lease_expires`` (extend it with :meth:`Registry.renew`)."""

    attempt_id: int
    user_id: str
    version: int
    dataset_path: Path
    lease_expires: datetime

    @property
    def blob_name(self) -> str:
        """Where this attempt writes its blob, relative to the fleet's blob folder: unique per attempt, so a worker
        presumed dead that still writes can never replace the blob a later attempt registered."""
        return f"{self.user_id}/v{self.version}-attempt{self.attempt_id}{BLOB_SUFFIX}"


@dataclass(frozen=True)
class AdapterResult:
    """What a worker registers for its attempt: the blob on disk and what was measured about it."""

    blob_path: Path
    blob_sha256: str
    base_fingerprint: str
    bits: float
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.blob_sha256):
            raise ConfigError(f"blob_sha256 must be 64 lowercase hex digits, got {self.blob_sha256!r}")
        if not isinstance(self.base_fingerprint, str) or not self.base_fingerprint:
            raise ConfigError(f"base_fingerprint must be a non-empty string, got {self.base_fingerprint!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not (
                math.isfinite(self.bits) and self.bits > 0):
            raise ConfigError(f"bits (effective bits per parameter) must be a finite number > 0, got {self.bits!r}")


@dataclass(frozen=True)
class VersionInfo:
    """One adapter version as the registry holds it (a user's history is a list of these)."""

    user_id: str
    version: int
    status: str
    reason: str
    dataset_path: str
    dataset_sha256: str
    blob_path: str | None
    blob_sha256: str | None
    base_fingerprint: str | None
    bits: float | None
    bytes: int | None
    card: dict[str, Any]
    created: datetime
    updated: datetime
    attempts: int


@dataclass(frozen=True)
class InputReport:
    """What :meth:`Registry.register_inputs` did with each user of a folder or manifest."""

    queued: tuple[str, ...]
    failed: dict[str, str]  # user id -> reason, as recorded in the registry
    unchanged: tuple[str, ...]  # same data as the user's newest version, or a version already queued/training


@dataclass(frozen=True)
class FleetStatus:
    users: int
    latest: dict[str, int]  # status -> how many users' newest version is in it (every status present)
    serving: int  # users with an active adapter (possibly while a newer version is queued or training)


@dataclass
class _Input:
    user_id: str
    folder: Path
    digest: str
    card: dict[str, Any]
    error: str


# ------------------------------------------------------------------------------------------------ helpers
def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def registry_url(target: str | os.PathLike[str]) -> str:
    """A database URL as given (``sqlite:///...``, ``postgresql+psycopg://...``), or a file path as a SQLite URL."""
    text = os.fspath(target)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def dataset_digest(folder: Path) -> str:
    """sha256 over the sha256 of each file a user dataset consists of (a missing one counts as missing): unchanged
    data is recognised as already registered when a job is rerun, and new data queues a new version."""
    digest = hashlib.sha256()
    for name in DATASET_FILES:
        path = folder / name
        digest.update(f"{name}:{file_sha256(path) if path.is_file() else '-'}\n".encode())
    return digest.hexdigest()


def _declared_user_id(folder: Path) -> str:
    """The id a dataset that failed to load would have had: its card's ``id`` if readable, else the folder name
    (the rule of :func:`lowra.sdk.training.data.load_user_dataset`)."""
    try:
        card = json.loads((folder / "user.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return folder.name
    user_id = card.get("id") if isinstance(card, dict) else None
    return user_id if isinstance(user_id, str) and user_id else folder.name


def _dataset_folders(source: Path) -> list[Path]:
    """The user folders of a folder of user folders, or of a JSONL manifest (``{"path": FOLDER}`` per line, relative
    paths against the manifest's folder). A broken manifest is refused whole, before anything is registered."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not source.is_file():
        raise DatasetError(f"{source} does not exist; expected a folder of user folders or a JSONL manifest")
    folders = []
    from lowra.sdk.training.data import jsonl_objects  # lazily: the registry itself imports no torch

    for lineno, entry in jsonl_objects(source, 'each line is {"path": FOLDER}'):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DatasetError(f"{source}:{lineno}: expected {{\"path\": FOLDER}} with a non-empty string path")
        folders.append((source.parent / Path(entry["path"]).expanduser()).resolve())
    return folders


# ------------------------------------------------------------------------------------------------ registry
class Registry:
    """The fleet's adapter registry on one database (see the module docstring)."""

    def __init__(self, target: str | os.PathLike[str], *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        """Open (creating it when empty) the registry at ``target``: a file path (SQLite) or a database URL.

        ``max_attempts``: attempts whose lease runs out before a version is failed (a user that kills its worker
        every time must not stall the fleet). ``clock`` returns aware UTC datetimes (tests move it forward).
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        self.max_attempts = max_attempts
        self._clock = clock
        self._engine = _create_engine(registry_url(target))
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._open_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ConfigError("the registry clock must return timezone-aware UTC datetimes")
        return now

    def _open_schema(self) -> None:
        with self._transaction() as session:
            tables = set(inspect(session.connection()).get_table_names())
            ours = set(_Model.metadata.tables)
            if SchemaVersion.__tablename__ not in tables:
                if tables & ours:
                    raise RegistrySchemaError(
                        f"{self.url} has lowra registry tables ({', '.join(sorted(tables & ours))}) but no "
                        f"{SchemaVersion.__tablename__} table; not a lowra registry: use another database"
                    )
                _Model.metadata.create_all(session.connection())
                session.add(SchemaVersion(version=SCHEMA_VERSION))
                return
            found = session.scalars(select(SchemaVersion.version)).all()
        if found == [SCHEMA_VERSION]:
            return
        if found and max(found) > SCHEMA_VERSION:
            raise RegistrySchemaError(
                f"{self.url} is a registry of schema version {max(found)}, newer than this lowra reads "
                f"({SCHEMA_VERSION}); upgrade lowra to use it"
            )
        raise RegistrySchemaError(
            f"{self.url} records schema version(s) {found or 'none'}; this lowra reads exactly {SCHEMA_VERSION}"
        )

    # -------------------------------------------------------------------------------------------- inputs
    def register_inputs(self, source: str | os.PathLike[str], *, tokenizer: Any = None,
                        max_len: int | None = None) -> InputReport:
        """Queue every user of a folder of user folders or a JSONL manifest; record a bad one as ``failed``.

        Each dataset is validated with :func:`~lowra.sdk.training.data.load_user_dataset`; with a ``tokenizer``,
        every example is also encoded as training will (``max_len`` defaults to ``TrainConfig().max_len``), so a
        prompt too long to leave room for its response fails its user now rather than in a worker. An id given by
        two datasets fails that user (neither dataset is trained). A user whose newest version was made from the same
        data (same :func:`dataset_digest`), or who is queued or training, is left as it is: rerunning a job over the
        same inputs adds nothing, and new data for a user queues a new version.
        """
        # Imported here: the data module imports torch, and the registry's other uses (status, retry, the workers'
        # claims) must stay torch-free and fast.
        from lowra.sdk.training.config import TrainConfig
        from lowra.sdk.training.data import encode_example, load_user_dataset

        max_len = TrainConfig().max_len if max_len is None else max_len
        by_user: dict[str, list[_Input]] = {}
        for folder in _dataset_folders(Path(source).expanduser()):
            item = _Input(_declared_user_id(folder), folder, dataset_digest(folder), {}, "")
            try:
                dataset = load_user_dataset(folder)
                if tokenizer is not None:
                    for example in dataset.train + dataset.heldout:
                        encode_example(tokenizer, example, max_len)
                item.user_id = dataset.user_id
                item.card = {"task": dataset.card.get("task", ""),
                             "data": {"user": dataset.user_id, "n_train": len(dataset.train),
                                      "n_heldout": len(dataset.heldout)}}
            except DatasetError as exc:
                item.error = str(exc)
            if not item.error and not USER_ID.match(item.user_id):
                item.error = (f"user id {item.user_id!r} (from {folder}) is not a valid id; expected 1-128 letters, "
                              "digits or . _ @ + - starting with a letter or digit")
            by_user.setdefault(item.user_id, []).append(item)

        queued: list[str] = []
        failed: dict[str, str] = {}
        unchanged: list[str] = []
        with self._transaction() as session:
            now = self._now()
            for user_id in sorted(by_user):
                item = _merge_duplicates(user_id, by_user[user_id])
                if session.get(User, user_id) is None:
                    session.add(User(id=user_id, created=now))
                    session.flush()
                latest = _latest(session, user_id)
                if latest is not None and (latest.status in IN_FLIGHT or latest.dataset_sha256 == item.digest):
                    unchanged.append(user_id)
                    continue
                _queue(session, user_id, str(item.folder), item.digest, item.card, now,
                       status="failed" if item.error else "queued", reason=item.error)
                if item.error:
                    failed[user_id] = item.error
                else:
                    queued.append(user_id)
        return InputReport(tuple(queued), failed, tuple(unchanged))

    # -------------------------------------------------------------------------------------------- work
    def claim_next(self, worker_id: str, lease_seconds: float) -> Claim | None:
        """Take the next user to train, or None when there is none: first a version whose attempt's lease ran out
        (its worker was killed), else the oldest queued one. Atomic: two workers never get the same version."""
        if not isinstance(worker_id, str) or not worker_id:
            raise ConfigError(f"worker_id must be a non-empty string, got {worker_id!r}")
        _check_lease(lease_seconds)
        with self._transaction() as session:
            now = self._now()
            while True:
                expired = session.scalars(
                    select(Attempt).where(Attempt.outcome.is_(None), Attempt.lease_expires <= now)
                    .order_by(Attempt.lease_expires, Attempt.id).limit(1).with_for_update(skip_locked=True)
                ).first()
                if expired is None:
                    break
                _finish(expired, "expired", now, f"lease ran out at {expired.lease_expires.isoformat()}")
                version = session.get_one(AdapterVersion, expired.version_id, with_for_update=True)
                tries = session.scalar(select(func.count(Attempt.id)).where(Attempt.version_id == version.id)) or 0
                if tries < self.max_attempts:
                    return _start(session, version, worker_id, now, lease_seconds)
                _set_status(version, "failed", now, f"{tries} attempts ran past their lease without completing "
                                                    f"(last worker {expired.worker_id!r}); fix the cause, then retry")
            version = session.scalars(
                select(AdapterVersion).where(AdapterVersion.status == "queued")
                .order_by(AdapterVersion.id).limit(1).with_for_update(skip_locked=True)
            ).first()
            return None if version is None else _start(session, version, worker_id, now, lease_seconds)

    def renew(self, attempt_id: int, lease_seconds: float) -> datetime:
        """Extend a running attempt's lease (a heartbeat for long trainings); returns the new expiry."""
        _check_lease(lease_seconds)
        with self._transaction() as session:
            attempt, _ = _current(session, attempt_id)
            attempt.lease_expires = self._now() + timedelta(seconds=lease_seconds)
            return attempt.lease_expires

    def complete(self, attempt_id: int, result: AdapterResult, decision: GateDecision | None = None) -> VersionInfo:
        """Register the attempt's blob: ``trained``, or ``active`` / ``gated_out`` when the gate's decision is given.

        Refused with :class:`StaleAttemptError` unless the attempt is its version's current one (exactly-once), and
        with :class:`BlobMismatchError` unless ``result.blob_path`` is a file with ``result.blob_sha256``. A version
        that trained against a base retired meanwhile is registered as ``retired`` and its user queued again.
        """
        path = Path(result.blob_path).expanduser().resolve()
        # Hashed before the transaction: the write lock is never held for file IO.
        if not path.is_file():
            raise BlobMismatchError(f"blob {path} does not exist; write it (atomically) before registering it")
        actual = file_sha256(path)
        if actual != result.blob_sha256:
            raise BlobMismatchError(f"blob {path} has sha256 {actual}, not the reported {result.blob_sha256}; "
                                    "it changed or was not fully written, so it is not registered")
        size = path.stat().st_size
        with self._transaction() as session:
            now = self._now()
            attempt, version = _current(session, attempt_id)
            base = _base(session, result.base_fingerprint, now)
            _finish(attempt, "completed", now, "")
            version.blob_path, version.blob_sha256, version.bytes = str(path), actual, size
            version.base_fingerprint, version.bits = result.base_fingerprint, float(result.bits)
            version.card = {**version.card, **result.card}
            if base.retired is not None:
                _set_status(version, "retired", now, f"trained against base {base.fingerprint}, retired at "
                                                     f"{base.retired.isoformat()} while it trained")
                _queue(session, version.user_id, version.dataset_path, version.dataset_sha256, _data_card(version),
                       now, reason=f"retrain: base {base.fingerprint} was retired")
            elif decision is None:
                _set_status(version, "trained", now, "")
            else:
                _apply_decision(session, version, decision, now)
            return _info(session, version)

    def fail(self, attempt_id: int, reason: str) -> None:
        """Record that the attempt's user cannot be trained (bad data, an error): the version is ``failed``."""
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError("a failure needs a reason saying what went wrong")
        with self._transaction() as session:
            now = self._now()
            attempt, version = _current(session, attempt_id)
            _finish(attempt, "failed", now, reason)
            _set_status(version, "failed", now, reason)

    def apply_gate(self, user_id: str, version: int, decision: GateDecision) -> VersionInfo:
        """Ship (``active``) or gate out a ``trained`` version registered without a decision."""
        with self._transaction() as session:
            row = session.scalars(select(AdapterVersion).where(
                AdapterVersion.user_id == user_id, AdapterVersion.version == version).with_for_update()).first()
            if row is None:
                raise RegistryError(f"user {user_id!r} has no version {version}; see its history")
            if row.status != "trained":
                raise RegistryError(f"user {user_id!r} version {version} is {row.status}; only a trained version "
                                    "is gated")
            _apply_decision(session, row, decision, self._now())
            return _info(session, row)

    def retry(self, user_id: str) -> int:
        """Queue a failed, gated-out or retired user again (its dataset re-read from the same folder); returns the
        version that will train. A user already queued or training is left as it is (its version is returned)."""
        with self._transaction() as session:
            latest = _latest(session, user_id, lock_user=True)
            if latest is None:
                raise RegistryError(f"no user {user_id!r} in the registry at {self.url}; register its dataset first")
            if latest.status in IN_FLIGHT:
                return latest.version
            if not USER_ID.match(user_id):  # its blobs could not be named; its failure reason says so
                raise RegistryError(f"user id {user_id!r} is not a valid id and cannot be trained; give its dataset "
                                    "a valid id (user.json 'id' or its folder name) and register it again")
            if latest.status in ("trained", "active"):
                raise RegistryError(f"user {user_id!r} version {latest.version} is {latest.status}; retry queues "
                                    "failed, gated-out or retired users (new data queues a new version by itself)")
            digest = dataset_digest(Path(latest.dataset_path))
            return _queue(session, user_id, latest.dataset_path, digest, _data_card(latest), self._now(),
                          reason=f"retry of version {latest.version} ({latest.status})").version

    def retire_base(self, old_fingerprint: str) -> list[str]:
        """Retire every adapter bound to base ``old_fingerprint`` and queue its users for retraining (with the data
        of their newest version); returns the users queued. Adapters still training on it are retired when they
        complete. Running it again is harmless."""
        if not isinstance(old_fingerprint, str) or not old_fingerprint:
            raise ConfigError(f"a base fingerprint is a non-empty string, got {old_fingerprint!r}")
        with self._transaction() as session:
            now = self._now()
            base = _base(session, old_fingerprint, now)
            base.retired = base.retired or now
            bound = session.scalars(select(AdapterVersion).where(
                AdapterVersion.base_fingerprint == old_fingerprint, AdapterVersion.status.in_(BOUND_TO_BASE))
                .with_for_update()).all()
            for version in bound:
                _set_status(version, "retired", now, f"base {old_fingerprint} retired")
            requeued = []
            for user_id in sorted({version.user_id for version in bound}):
                latest = _latest(session, user_id, lock_user=True)
                if latest is None or latest.status in IN_FLIGHT:
                    continue
                _queue(session, user_id, latest.dataset_path, latest.dataset_sha256, _data_card(latest), now,
                       reason=f"retrain: base {old_fingerprint} retired")
                requeued.append(user_id)
            return requeued

    # -------------------------------------------------------------------------------------------- views
    def status(self) -> FleetStatus:
        """How many users there are, by the status of their newest version, and how many have an active adapter."""
        with self._transaction() as session:
            rows = session.execute(_newest(select(AdapterVersion.status, func.count()))
                                   .group_by(AdapterVersion.status)).all()
            users = session.scalar(select(func.count()).select_from(User)) or 0
            serving = session.scalar(select(func.count(AdapterVersion.user_id.distinct()))
                                     .where(AdapterVersion.status == "active")) or 0
        latest = dict.fromkeys(STATUSES, 0)
        latest.update({status: count for status, count in rows})
        return FleetStatus(users=users, latest=latest, serving=serving)

    def newest(self, statuses: tuple[str, ...] | None = None) -> list[VersionInfo]:
        """Every user's newest version (only those in ``statuses`` when given), by user id, in one query."""
        query = _newest(select(AdapterVersion)).order_by(AdapterVersion.user_id)
        if statuses is not None:
            query = query.where(AdapterVersion.status.in_(statuses))
        with self._transaction() as session:
            return [_info(session, version) for version in session.scalars(query).all()]

    def history(self, user_id: str) -> list[VersionInfo]:
        """Every version of a user, oldest first."""
        with self._transaction() as session:
            if session.get(User, user_id) is None:
                raise RegistryError(f"no user {user_id!r} in the registry at {self.url}")
            versions = session.scalars(select(AdapterVersion).where(AdapterVersion.user_id == user_id)
                                       .order_by(AdapterVersion.version)).all()
            return [_info(session, version) for version in versions]


# ------------------------------------------------------------------------------------------------ internals
def _newest(query: Select) -> Select:
    """``query`` restricted to each user's newest version."""
    newest = (select(AdapterVersion.user_id, func.max(AdapterVersion.version).label("version"))
              .group_by(AdapterVersion.user_id).subquery())
    return query.join(newest, (AdapterVersion.user_id == newest.c.user_id) & (AdapterVersion.version == newest.c.version))


def _create_engine(url: str) -> Engine:
    try:
        if not url.startswith("sqlite"):
            return create_engine(url, pool_pre_ping=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise RegistryError(f"cannot open registry {url!r} ({exc}); expected a file path or a database URL such as "
                            "sqlite:///fleet.db or postgresql+psycopg://user@host/db") from None

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 must not open transactions itself; _on_begin does
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _check_lease(lease_seconds: float) -> None:
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) or not (
            math.isfinite(lease_seconds) and lease_seconds > 0):
        raise ConfigError(f"lease_seconds must be a finite number > 0, got {lease_seconds!r}")


def _merge_duplicates(user_id: str, items: list[_Input]) -> _Input:
    """One input per user id; an id given by several datasets fails, its digest covering them all (so a rerun over
    the same inputs records nothing new)."""
    if len(items) == 1:
        return items[0]
    folders = ", ".join(str(item.folder) for item in items)
    digest = hashlib.sha256("".join(sorted(item.digest for item in items)).encode()).hexdigest()
    return _Input(user_id, items[0].folder, digest, {}, f"user id {user_id!r} is given by {len(items)} datasets "
                  f"({folders}); each user needs exactly one dataset: rename one (user.json 'id' or its folder)")


def _latest(session: Session, user_id: str, lock_user: bool = False) -> AdapterVersion | None:
    if lock_user:  # serializes per-user changes on PostgreSQL (SQLite's BEGIN IMMEDIATE already does)
        session.get(User, user_id, with_for_update=True)
    return session.scalars(select(AdapterVersion).where(AdapterVersion.user_id == user_id)
                           .order_by(AdapterVersion.version.desc()).limit(1)).first()


def _queue(session: Session, user_id: str, dataset_path: str, dataset_sha256: str, card: dict[str, Any],
           now: datetime, status: str = "queued", reason: str = "") -> AdapterVersion:
    """Add the user's next version (numbers grow by one per user and are never reused)."""
    session.get(User, user_id, with_for_update=True)
    last = session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.user_id == user_id)) or 0
    version = AdapterVersion(user_id=user_id, version=last + 1, status=status, reason=reason,
                             dataset_path=dataset_path, dataset_sha256=dataset_sha256, card=card,
                             created=now, updated=now)
    session.add(version)
    session.flush()
    return version


def _data_card(version: AdapterVersion) -> dict[str, Any]:
    """The part of a card that describes the data, carried to the version that retrains it."""
    return {key: version.card[key] for key in ("task", "data") if key in version.card}


def _start(session: Session, version: AdapterVersion, worker_id: str, now: datetime,
           lease_seconds: float) -> Claim:
    _set_status(version, "training", now, "")
    attempt = Attempt(version_id=version.id, worker_id=worker_id, started=now,
                      lease_expires=now + timedelta(seconds=lease_seconds))
    session.add(attempt)
    session.flush()
    return Claim(attempt.id, version.user_id, version.version, Path(version.dataset_path), attempt.lease_expires)


def _current(session: Session, attempt_id: int) -> tuple[Attempt, AdapterVersion]:
    """The attempt and its version, if the attempt still holds the version; else StaleAttemptError."""
    attempt = session.get(Attempt, attempt_id, with_for_update=True)
    if attempt is None:
        raise StaleAttemptError(f"attempt {attempt_id} is not in this registry; it cannot complete anything")
    version = session.get_one(AdapterVersion, attempt.version_id, with_for_update=True)
    if attempt.outcome is not None:
        raise StaleAttemptError(
            f"attempt {attempt_id} (worker {attempt.worker_id!r}) of user {version.user_id!r} version "
            f"{version.version} already ended ({attempt.outcome}: {attempt.reason or 'done'}); drop its result"
        )
    return attempt, version


def _finish(attempt: Attempt, outcome: str, now: datetime, reason: str) -> None:
    attempt.outcome, attempt.finished, attempt.reason = outcome, now, reason


def _set_status(version: AdapterVersion, status: str, now: datetime, reason: str) -> None:
    version.status, version.reason, version.updated = status, reason, now


def _base(session: Session, fingerprint: str, now: datetime) -> BaseModelRecord:
    """The base's row, locked (so retiring a base and registering an adapter on it serialize), created if new."""
    base = session.get(BaseModelRecord, fingerprint, with_for_update=True)
    if base is None:
        base = BaseModelRecord(fingerprint=fingerprint, created=now)
        session.add(base)
        session.flush()
    return base


def _apply_decision(session: Session, version: AdapterVersion, decision: GateDecision, now: datetime) -> None:
    version.card = {**version.card, "gate": decision.as_card()}
    if not decision.ships:
        _set_status(version, "gated_out", now, decision.reason)
        return
    previous = session.scalars(select(AdapterVersion).where(
        AdapterVersion.user_id == version.user_id, AdapterVersion.status == "active",
        AdapterVersion.id != version.id).with_for_update()).all()
    for old in previous:
        _set_status(old, "retired", now, f"superseded by version {version.version}")
    _set_status(version, "active", now, decision.reason)


def _info(session: Session, version: AdapterVersion) -> VersionInfo:
    attempts = session.scalar(select(func.count(Attempt.id)).where(Attempt.version_id == version.id)) or 0
    return VersionInfo(
        user_id=version.user_id, version=version.version, status=version.status, reason=version.reason,
        dataset_path=version.dataset_path, dataset_sha256=version.dataset_sha256, blob_path=version.blob_path,
        blob_sha256=version.blob_sha256, base_fingerprint=version.base_fingerprint, bits=version.bits,
        bytes=version.bytes, card=dict(version.card), created=version.created, updated=version.updated,
        attempts=attempts,
    )
