"""The durable feedback queue: user-corrected labels waiting for the online updater.

One class, :class:`FeedbackQueue`, over one SQLAlchemy Core schema (three tables), so the same
code runs on either backend:

- **SQLite** (the embedded default, ``sqlite:///<INFANTINO_HOME>/feedback.db``) for one host:
  WAL mode so readers never block the writer, and a 30 s ``busy_timeout`` so the serving
  workers and the updater can all write one file. Every write transaction starts with
  ``BEGIN IMMEDIATE``: it takes the write lock up front, so no two processes can read-then-write
  the same rows (the lease, the idempotency check), and the busy handler applies instead of a
  lock upgrade failing half-way with SQLITE_BUSY.
  Durability: in WAL mode a commit has been ``write()``-n to the WAL before it returns, so it
  survives a ``kill -9`` of the process with either ``synchronous`` setting; ``FULL`` also
  fsyncs it, so it survives a power cut or kernel crash, at ~1-3 ms per commit. Feedback writes
  (``add``, ``mark``, ``set_embedding``) therefore commit with ``FULL``; the high-rate,
  disposable prediction records and lease renewals commit with ``NORMAL`` (the WAL fsync of
  the next ``FULL`` commit makes them durable too).
- **Any other SQLAlchemy URL** (PostgreSQL, ``postgresql+psycopg2://...``) when several
  replicas share one queue. Lease times come from the database server's clock there, so
  replicas with skewed clocks still agree on when a lease expires.

Nothing that matters is process-local: every method is its own short transaction, ids are
uuid4, idempotency and lease exclusivity are enforced by unique keys and conditional UPDATEs in
the database, not by locks in Python. Any number of workers and replicas may call any method at
any time. Tables are created on first use; creation is serialised (Postgres advisory lock,
SQLite write lock) so processes racing to start on an empty database do not trip over each other.
There are no migrations: a later column change needs a new table prefix or a manual migration.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

QUEUED, USED, HELD_OUT = "queued", "used", "held_out"
STATUSES: tuple[str, ...] = (QUEUED, USED, HELD_OUT)

_MAX_ID, _MAX_NAME, _MAX_KEY = 64, 256, 256  # column lengths, checked before the database does
_SQLITE_BUSY_TIMEOUT_S = 30.0
_MARK_CHUNK = 500  # ids per UPDATE ... IN (...): below every backend's bound-parameter limit
# One advisory-lock key for "creating queue tables", shared by every queue on the server.
_PG_DDL_LOCK = zlib.crc32(b"infantino.online.queue.create_tables")
# Execution options read by the SQLite "begin" hook (see _tx).
_OPT_WRITE, _OPT_DURABLE = "infantino_write", "infantino_durable"


@dataclass
class FeedbackItem:
    """One user-supplied label, as stored."""

    id: str
    task: str
    label: str
    status: str  # 'queued' | 'used' | 'held_out'
    embedding: np.ndarray | None  # float32, 1-D
    backbone_version: str | None  # the backbone that produced ``embedding``
    image: bytes | None  # None when images are not kept (privacy setting) or not loaded
    prediction_id: str | None
    predicted_label: str | None
    created: float  # time.time()
    updated: float
    used_by_version: str | None  # the head version that consumed it, once 'used'


class FeedbackQueue:
    """Durable feedback store shared by all workers and replicas; see the module docstring.

    ``url``: any SQLAlchemy URL, e.g. ``sqlite:////abs/path/feedback.db`` or
    ``postgresql+psycopg2://user@host:5432/db``. ``table_prefix`` and ``schema`` (PostgreSQL
    only; created if missing) keep several queues, or test runs, apart in one database.
    """

    def __init__(self, url: str, *, table_prefix: str = "", schema: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]*", table_prefix):
            raise ValueError(f"table_prefix must be letters, digits and '_', got {table_prefix!r}")
        self.url = sa.make_url(url)
        self._sqlite = self.url.get_backend_name() == "sqlite"
        self._postgres = self.url.get_backend_name() == "postgresql"
        if schema is not None and self._sqlite:
            raise ValueError("schema is not supported on SQLite; use table_prefix or another file")
        self.schema = schema
        self.table_prefix = table_prefix
        self.metadata = sa.MetaData(schema=schema)
        self._feedback, self._predictions, self._leases = _define_tables(self.metadata, table_prefix)
        self._engine = self._make_engine()
        self._pid = os.getpid()
        self._create_tables()

    # ---- engine and transactions -----------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        # A forked child (e.g. a server worker) must not reuse the parent's pooled connections:
        # give it a fresh pool, leaving the parent's connections alone.
        if self._pid != os.getpid():
            self._engine.dispose(close=False)
            self._pid = os.getpid()
        return self._engine

    def _make_engine(self) -> Engine:
        if not self._sqlite:
            # pre_ping: a replica outlives database restarts and idle-connection reaping.
            return sa.create_engine(self.url, pool_pre_ping=True)
        database = self.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(self.url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is DEFERRED and late).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
                _retry_busy(lambda: cur.execute("PRAGMA journal_mode = WAL"))  # persistent, per file
                cur.execute("PRAGMA synchronous = FULL")
            finally:
                cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            opts = conn.get_execution_options()
            if not opts.get(_OPT_WRITE):
                conn.exec_driver_sql("BEGIN")  # a read: a consistent WAL snapshot, no lock
                return
            # synchronous applies to the commits that follow; it cannot change inside a transaction.
            sync = "FULL" if opts.get(_OPT_DURABLE, True) else "NORMAL"
            if conn.info.get("synchronous") != sync:  # Connection.info: per DBAPI connection
                conn.exec_driver_sql(f"PRAGMA synchronous = {sync}")
                conn.info["synchronous"] = sync
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    @contextmanager
    def _tx(self, *, write: bool = False, durable: bool = True) -> Iterator[Connection]:
        """One short transaction: committed on normal exit, rolled back on an exception.

        On SQLite ``write`` takes the write lock at BEGIN and ``durable`` selects
        synchronous=FULL for the commit; other backends ignore both (their own isolation and
        durability apply: READ COMMITTED and a synchronous commit by default on PostgreSQL).
        """
        with self.engine.connect() as conn:
            if self._sqlite:
                conn.execution_options(**{_OPT_WRITE: write, _OPT_DURABLE: durable})
            with conn.begin():
                yield conn

    def _create_tables(self) -> None:
        # create_all checks for each table and then creates it; two processes doing that at once
        # could both see "missing". Serialise the whole check-and-create instead.
        for attempt in range(5):
            try:
                with self._tx(write=True) as conn:
                    if self._postgres:
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_DDL_LOCK)))
                        if self.schema:
                            conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
                    self.metadata.create_all(conn, checkfirst=True)
                return
            except DBAPIError:  # another backend, lost the race: its tables now exist, look again
                if attempt == 4 or self._sqlite or self._postgres:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _now(self) -> Any:
        """"Now" for lease arithmetic: the server clock on PostgreSQL, ours elsewhere (one host)."""
        if self._postgres:
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        return sa.literal(time.time(), sa.Double)

    def close(self) -> None:
        """Close pooled connections (the queue can still be used; it reconnects on demand)."""
        self.engine.dispose()  # via the property: a forked child must not close its parent's sockets

    def __repr__(self) -> str:
        where = self.url.render_as_string(hide_password=True)
        return f"FeedbackQueue({where!r}, table_prefix={self.table_prefix!r}, schema={self.schema!r})"

    # ---- feedback ----------------------------------------------------------------------------------

    def add(
        self,
        *,
        task: str,
        label: str,
        embedding: np.ndarray | None,
        backbone_version: str | None,
        image: bytes | None = None,
        prediction_id: str | None = None,
        predicted_label: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[str, bool]:
        """Commit the item, then return ``(feedback_id, duplicate)``.

        A repeated ``idempotency_key`` (per task) returns the first item's id with
        ``duplicate=True`` and stores nothing, even if the rest of the payload differs:
        the first write wins. When this returns, the item is durable.
        """
        _check_str("task", task, _MAX_NAME)
        _check_str("label", label, _MAX_NAME)
        _check_str("backbone_version", backbone_version, _MAX_NAME, optional=True)
        _check_str("prediction_id", prediction_id, _MAX_ID, optional=True)
        _check_str("predicted_label", predicted_label, _MAX_NAME, optional=True)
        _check_str("idempotency_key", idempotency_key, _MAX_KEY, optional=True)
        if embedding is not None and backbone_version is None:
            raise ValueError("an embedding needs the backbone_version that produced it")
        blob, dim = _encode(embedding)
        now = time.time()
        row = dict(
            id=uuid.uuid4().hex, task=task, label=label, status=QUEUED, embedding=blob, embedding_dim=dim,
            backbone_version=backbone_version, image=_check_bytes("image", image), prediction_id=prediction_id,
            predicted_label=predicted_label, idempotency_key=idempotency_key, created=now, updated=now,
            used_by_version=None,
        )
        t = self._feedback
        same_key = sa.select(t.c.id).where(t.c.task == task, t.c.idempotency_key == idempotency_key)
        try:
            with self._tx(write=True) as conn:
                if idempotency_key is not None:
                    existing = conn.execute(same_key).scalar()
                    if existing is not None:
                        return existing, True
                conn.execute(t.insert().values(**row))
            return row["id"], False
        except IntegrityError:
            # PostgreSQL under READ COMMITTED: another replica inserted the same key between our
            # SELECT and INSERT. The unique key stopped the duplicate; report the winner's id.
            if idempotency_key is None:
                raise
            with self._tx() as conn:
                existing = conn.execute(same_key).scalar()
            if existing is None:
                raise
            return existing, True

    def get(self, id: str, *, include_image: bool = True) -> FeedbackItem | None:
        """One item by id, or None."""
        with self._tx() as conn:
            row = conn.execute(self._select_items(include_image).where(self._feedback.c.id == id)).first()
        return None if row is None else _item(row)

    def depth(self, task: str) -> int:
        """Number of 'queued' items of ``task``."""
        t = self._feedback
        with self._tx() as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.task == task, t.c.status == QUEUED)
            ).scalar_one())

    def counts(self, task: str) -> dict[str, int]:
        """Items of ``task`` per status; every status is present (0 if none)."""
        t = self._feedback
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(t.c.status, sa.func.count()).where(t.c.task == task).group_by(t.c.status)
            ).all()
        out = dict.fromkeys(STATUSES, 0)
        out.update({status: int(n) for status, n in rows})
        return out

    def queued(self, task: str, limit: int | None = None, *, include_images: bool = True) -> list[FeedbackItem]:
        """The 'queued' items of ``task``, oldest first, at most ``limit``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return self._items(task, QUEUED, limit, include_images)

    def items(self, task: str, status: str | None = None, *, include_images: bool = True) -> list[FeedbackItem]:
        """All items of ``task`` (optionally of one status), oldest first."""
        if status is not None:
            _check_status(status)
        return self._items(task, status, None, include_images)

    def _items(self, task: str, status: str | None, limit: int | None, include_images: bool) -> list[FeedbackItem]:
        t = self._feedback
        q = self._select_items(include_images).where(t.c.task == task).order_by(t.c.created, t.c.id)
        if status is not None:
            q = q.where(t.c.status == status)
        if limit is not None:
            q = q.limit(limit)
        with self._tx() as conn:
            return [_item(r) for r in conn.execute(q)]

    def _select_items(self, include_images: bool) -> sa.Select:
        t = self._feedback
        image = t.c.image if include_images else sa.null().label("image")
        return sa.select(
            t.c.id, t.c.task, t.c.label, t.c.status, t.c.embedding, t.c.embedding_dim, t.c.backbone_version,
            image, t.c.prediction_id, t.c.predicted_label, t.c.created, t.c.updated, t.c.used_by_version,
        )

    def oldest_queued_age(self, task: str) -> float | None:
        """Seconds since the oldest 'queued' item of ``task`` was created; None if none is queued."""
        t = self._feedback
        with self._tx() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(t.c.created)).where(t.c.task == task, t.c.status == QUEUED)
            ).scalar()
        return None if oldest is None else max(0.0, time.time() - float(oldest))

    def mark(self, ids: Sequence[str], status: str, used_by_version: str | None = None) -> None:
        """Set ``status`` (and ``used_by_version``, None clears it) on ``ids``, in one transaction.

        Unknown ids are ignored.
        """
        _check_status(status)
        _check_str("used_by_version", used_by_version, _MAX_NAME, optional=True)
        unique = list(dict.fromkeys(ids))
        if not unique:
            return
        t = self._feedback
        now = time.time()
        with self._tx(write=True) as conn:
            for i in range(0, len(unique), _MARK_CHUNK):
                conn.execute(
                    t.update().where(t.c.id.in_(unique[i:i + _MARK_CHUNK]))
                    .values(status=status, used_by_version=used_by_version, updated=now)
                )

    def set_embedding(self, id: str, embedding: np.ndarray, backbone_version: str) -> None:
        """Replace an item's embedding, e.g. re-embedding its image after a backbone change.

        Raises KeyError if there is no such item.
        """
        _check_str("backbone_version", backbone_version, _MAX_NAME)
        blob, dim = _encode(embedding)
        if blob is None:
            raise ValueError("embedding must not be None")
        t = self._feedback
        with self._tx(write=True) as conn:
            result = conn.execute(
                t.update().where(t.c.id == id)
                .values(embedding=blob, embedding_dim=dim, backbone_version=backbone_version, updated=time.time())
            )
        if result.rowcount == 0:
            raise KeyError(f"no feedback item {id!r}")

    # ---- recent predictions ----------------------------------------------------------------------------
    # /predict records what it answered so /feedback, on any worker or replica, can refer to it by id
    # (and reuse its embedding instead of recomputing it). Prune them periodically.

    def record_prediction(
        self,
        *,
        prediction_id: str,
        task: str,
        label: str,
        embedding: np.ndarray,
        backbone_version: str,
        head_version: str,
        image: bytes | None = None,
    ) -> None:
        """Store (or replace) the prediction ``prediction_id``."""
        self.record_predictions([dict(prediction_id=prediction_id, task=task, label=label, embedding=embedding,
                                      backbone_version=backbone_version, head_version=head_version, image=image)])

    def record_predictions(self, predictions: Sequence[dict]) -> None:
        """Store (or replace) several predictions in one transaction (one request's answers).

        Each dict has the keyword arguments of :meth:`record_prediction`. Ids are expected to
        be unique (uuid4); two replicas recording the same new id at the same instant on
        PostgreSQL would see an IntegrityError in one of them.
        """
        now = time.time()
        rows = []
        for p in predictions:
            for name in ("prediction_id", "task", "label", "backbone_version", "head_version"):
                _check_str(name, p[name], _MAX_ID if name == "prediction_id" else _MAX_NAME)
            blob, dim = _encode(p["embedding"])
            if blob is None:
                raise ValueError("embedding must not be None")
            rows.append(dict(
                prediction_id=p["prediction_id"], task=p["task"], label=p["label"], embedding=blob, embedding_dim=dim,
                backbone_version=p["backbone_version"], head_version=p["head_version"],
                image=_check_bytes("image", p.get("image")), created=now,
            ))
        t = self._predictions
        # Not durable=True: one fsync per request is too many, and losing the last few to a power cut is harmless.
        with self._tx(write=True, durable=False) as conn:
            # One lookup and one multi-row insert for the usual case (fresh uuids); replace the rest.
            ids = [row["prediction_id"] for row in rows]
            existing = set(conn.execute(sa.select(t.c.prediction_id).where(t.c.prediction_id.in_(ids))).scalars())
            fresh = {row["prediction_id"]: row for row in rows if row["prediction_id"] not in existing}  # last one wins
            if fresh:
                conn.execute(t.insert(), list(fresh.values()))
            for row in rows:
                if row["prediction_id"] in existing:
                    values = {k: v for k, v in row.items() if k != "prediction_id"}
                    conn.execute(t.update().where(t.c.prediction_id == row["prediction_id"]).values(**values))

    def get_prediction(self, prediction_id: str) -> dict | None:
        """``{'prediction_id','task','label','embedding','backbone_version','head_version','image','created'}`` or None."""
        t = self._predictions
        with self._tx() as conn:
            row = conn.execute(sa.select(t).where(t.c.prediction_id == prediction_id)).first()
        if row is None:
            return None
        m = row._mapping
        return {
            "prediction_id": m["prediction_id"], "task": m["task"], "label": m["label"],
            "embedding": _decode(m["embedding"], m["embedding_dim"]), "backbone_version": m["backbone_version"],
            "head_version": m["head_version"], "image": m["image"], "created": float(m["created"]),
        }

    def prune_predictions(self, older_than_s: float) -> int:
        """Delete predictions recorded more than ``older_than_s`` seconds ago; return how many."""
        t = self._predictions
        with self._tx(write=True, durable=False) as conn:
            return conn.execute(t.delete().where(t.c.created < time.time() - older_than_s)).rowcount

    # ---- lease: one updater across all workers and replicas ----------------------------------------------

    def try_acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_s`` seconds; True if ``holder`` now holds it.

        Succeeds if the lease is free, expired, or already ``holder``'s (then it is renewed).
        Atomic: of several concurrent callers at most one gets a free lease. A holder must renew
        well within ``ttl_s`` and stop working if renewal fails.
        """
        _check_str("name", name, _MAX_NAME)
        _check_str("holder", holder, _MAX_NAME)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        t = self._leases
        with self._tx(write=True, durable=False) as conn:
            now = self._now()  # after BEGIN IMMEDIATE, which may have waited for the lock
            # Take it if expired or ours. On PostgreSQL a concurrent UPDATE of the same row waits
            # for the other transaction and then re-checks the WHERE against the committed row,
            # so two takers of one expired lease cannot both match.
            taken = conn.execute(
                t.update().where(t.c.name == name, sa.or_(t.c.expires < now, t.c.holder == holder))
                .values(holder=holder, expires=now + ttl_s)
            ).rowcount
            if taken:
                return True
            # No row, or a live lease of someone else: the primary key decides who inserts first.
            try:
                with conn.begin_nested():  # a failed INSERT must not abort the whole transaction
                    conn.execute(t.insert().values(name=name, holder=holder, expires=now + ttl_s))
            except IntegrityError:
                return False
            return True

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up if ``holder`` holds it (otherwise do nothing)."""
        t = self._leases
        with self._tx(write=True, durable=False) as conn:
            conn.execute(t.delete().where(t.c.name == name, t.c.holder == holder))

    def lease_holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now, or None if it is free or expired."""
        t = self._leases
        with self._tx() as conn:
            return conn.execute(sa.select(t.c.holder).where(t.c.name == name, t.c.expires > self._now())).scalar()


# ---- schema and helpers ---------------------------------------------------------------------------------

def _define_tables(md: sa.MetaData, prefix: str) -> tuple[sa.Table, sa.Table, sa.Table]:
    feedback = sa.Table(
        f"{prefix}feedback", md,
        sa.Column("id", sa.String(_MAX_ID), primary_key=True),
        sa.Column("task", sa.String(_MAX_NAME), nullable=False),
        sa.Column("label", sa.String(_MAX_NAME), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=True),  # little-endian float32
        sa.Column("embedding_dim", sa.Integer, nullable=True),
        sa.Column("backbone_version", sa.String(_MAX_NAME), nullable=True),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("prediction_id", sa.String(_MAX_ID), nullable=True),
        sa.Column("predicted_label", sa.String(_MAX_NAME), nullable=True),
        sa.Column("idempotency_key", sa.String(_MAX_KEY), nullable=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("used_by_version", sa.String(_MAX_NAME), nullable=True),
        # NULL keys are distinct on SQLite and PostgreSQL, so items without a key never collide.
        sa.UniqueConstraint("task", "idempotency_key", name=f"{prefix}feedback_task_idem_key"),
        sa.Index(f"{prefix}feedback_task_status_created", "task", "status", "created"),
    )
    predictions = sa.Table(
        f"{prefix}predictions", md,
        sa.Column("prediction_id", sa.String(_MAX_ID), primary_key=True),
        sa.Column("task", sa.String(_MAX_NAME), nullable=False),
        sa.Column("label", sa.String(_MAX_NAME), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("embedding_dim", sa.Integer, nullable=False),
        sa.Column("backbone_version", sa.String(_MAX_NAME), nullable=False),
        sa.Column("head_version", sa.String(_MAX_NAME), nullable=False),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Index(f"{prefix}predictions_created", "created"),
    )
    leases = sa.Table(
        f"{prefix}leases", md,
        sa.Column("name", sa.String(_MAX_NAME), primary_key=True),
        sa.Column("holder", sa.String(_MAX_NAME), nullable=False),
        sa.Column("expires", sa.Double, nullable=False),  # epoch seconds (server clock on PostgreSQL)
    )
    return feedback, predictions, leases


def _encode(embedding: np.ndarray | None) -> tuple[bytes | None, int | None]:
    if embedding is None:
        return None, None
    a = np.asarray(embedding)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"embedding must be a non-empty 1-D vector, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"embedding must be numeric, got dtype {a.dtype}")
    a = a.astype("<f4", copy=False)
    if not np.isfinite(a).all():
        raise ValueError("embedding has NaN or infinite values")
    return a.tobytes(), int(a.shape[0])


def _decode(blob: bytes | None, dim: int | None) -> np.ndarray | None:
    if blob is None:
        return None
    a = np.frombuffer(blob, dtype="<f4")
    if dim is not None and a.shape[0] != dim:
        raise ValueError(f"stored embedding has {a.shape[0]} values, expected {dim}")
    return a.astype(np.float32)  # native byte order, and a writable copy


def _item(row: sa.Row) -> FeedbackItem:
    m = row._mapping
    return FeedbackItem(
        id=m["id"], task=m["task"], label=m["label"], status=m["status"],
        embedding=_decode(m["embedding"], m["embedding_dim"]), backbone_version=m["backbone_version"],
        image=m["image"], prediction_id=m["prediction_id"], predicted_label=m["predicted_label"],
        created=float(m["created"]), updated=float(m["updated"]), used_by_version=m["used_by_version"],
    )


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(map(repr, STATUSES))}; got {status!r}")


def _check_str(what: str, value: Any, max_len: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")


def _check_bytes(what: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes or None, got {type(value).__name__}")
    return bytes(value)


def _retry_busy(fn: Any, timeout_s: float = _SQLITE_BUSY_TIMEOUT_S) -> Any:
    """Retry ``fn`` while SQLite says the database is locked (switching to WAL can skip the busy handler)."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
