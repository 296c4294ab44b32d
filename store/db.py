"""The database under the stores: engine, short transactions, and table creation.

- **SQLite** (the embedded default, ``sqlite:///<INFANTINO_HOME>/feedback.db``) for one host:
  WAL mode so readers never block the writer, and a 30 s ``busy_timeout`` so the serving
  workers and the updater can all write one file. Every write transaction starts with
  ``BEGIN IMMEDIATE``: it takes the write lock up front, so no two processes can read-then-write
  the same rows (the lease, the idempotency check), and the busy handler applies instead of a
  lock upgrade failing half-way with SQLITE_BUSY.
  Durability: in WAL mode a commit has been ``write()``-n to the WAL before it returns, so it
  survives a ``kill -9`` of the process with either ``synchronous`` setting; ``FULL`` also
  fsyncs it, so it survives a power cut or kernel crash, at ~1-3 ms per commit. Feedback writes
  therefore commit with ``durable=True`` (FULL); the high-rate, disposable prediction records
  and lease renewals with ``durable=False`` (NORMAL; the WAL fsync of the next FULL commit
  makes them durable too).
- **PostgreSQL** (``postgresql://user@host:5432/db``, psycopg 3) or any other SQLAlchemy URL
  when several replicas share the state. Time for leases comes from the server's clock there,
  so replicas with skewed clocks still agree on when a lease expires.

Nothing that matters is process-local: every store method is its own short transaction, ids
are uuid4, idempotency and lease exclusivity are enforced by unique keys and conditional
UPDATEs in the database, not by locks in Python. Tables are created on first use; creation is
serialised (PostgreSQL advisory lock, SQLite write lock) so processes racing to start on an
empty database do not trip over each other.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

from infantino.settings import has_secret, protect_logs, redact
from store.schema import define_tables

_SQLITE_BUSY_TIMEOUT_S = 30.0
# One advisory-lock key for "creating InfantinO tables", shared by every database on the server.
_PG_DDL_LOCK = zlib.crc32(b"infantino.store.create_tables")
# Execution options read by the SQLite "begin" hook (see tx).
_OPT_WRITE, _OPT_DURABLE = "infantino_write", "infantino_durable"


class Database:
    """One SQLAlchemy engine with InfantinO's transaction rules; see the module docstring.

    ``table_prefix`` and ``schema`` (PostgreSQL only; created if missing) keep several
    deployments, or test runs, apart in one database.
    """

    def __init__(self, url: str, *, table_prefix: str = "", schema: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]*", table_prefix):
            raise ValueError(f"table_prefix must be letters, digits and '_', got {table_prefix!r}")
        if has_secret(url):
            protect_logs()  # driver errors and tracebacks may quote the URL
        self.url = sa.make_url(url)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        self.postgres = self.url.get_backend_name() == "postgresql"
        if schema is not None and self.sqlite:
            raise ValueError("schema is not supported on SQLite; use table_prefix or another file")
        self.schema = schema
        self.table_prefix = table_prefix
        self.metadata = sa.MetaData(schema=schema)
        self.tables = define_tables(self.metadata, table_prefix)
        self._engine = self._make_engine()
        self._pid = os.getpid()
        self._create_tables()

    @property
    def engine(self) -> Engine:
        # A forked child (e.g. a server worker) must not reuse the parent's pooled connections:
        # give it a fresh pool, leaving the parent's connections alone.
        if self._pid != os.getpid():
            self._engine.dispose(close=False)
            self._pid = os.getpid()
        return self._engine

    def _make_engine(self) -> Engine:
        if not self.sqlite:
            # pre_ping: a replica outlives database restarts and idle-connection reaping;
            # connect_timeout: an unreachable server fails a request in seconds, not minutes.
            connect_args = {"connect_timeout": 5} if self.postgres else {}
            return sa.create_engine(self.url, pool_pre_ping=True, connect_args=connect_args)
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
    def tx(self, *, write: bool = False, durable: bool = True) -> Iterator[Connection]:
        """One short transaction: committed on normal exit, rolled back on an exception.

        On SQLite ``write`` takes the write lock at BEGIN and ``durable`` selects
        synchronous=FULL for the commit; other backends ignore both (their own isolation and
        durability apply: READ COMMITTED and a synchronous commit by default on PostgreSQL).
        """
        with self.engine.connect() as conn:
            if self.sqlite:
                conn.execution_options(**{_OPT_WRITE: write, _OPT_DURABLE: durable})
            with conn.begin():
                yield conn

    def _create_tables(self) -> None:
        # create_all checks for each table and then creates it; two processes doing that at once
        # could both see "missing". Serialise the whole check-and-create instead.
        for attempt in range(5):
            try:
                with self.tx(write=True) as conn:
                    if self.postgres:
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_DDL_LOCK)))
                        if self.schema:
                            conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
                    self.metadata.create_all(conn, checkfirst=True)
                    self._add_new_columns(conn)
                return
            except DBAPIError:  # another backend, lost the race: its tables now exist, look again
                if attempt == 4 or self.sqlite or self.postgres:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _add_new_columns(self, conn) -> None:
        """Tables made before a nullable column was added to the schema get it (store/schema.py)."""
        inspector = sa.inspect(conn)
        for table in self.metadata.tables.values():
            present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    name = table.name if table.schema is None else f"{table.schema}.{table.name}"
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.execute(sa.text(f'ALTER TABLE {name} ADD COLUMN "{column.name}" {kind}'))
                    log.info("added column %s.%s (%s)", name, column.name, kind)

    def now(self) -> Any:
        """"Now" for lease arithmetic: the server clock on PostgreSQL, ours elsewhere (one host)."""
        if self.postgres:
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        return sa.literal(time.time(), sa.Double)

    def ping(self) -> None:
        """Raise if the database cannot be reached (for readiness checks)."""
        with self.tx() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        """Close pooled connections (the database can still be used; it reconnects on demand)."""
        self.engine.dispose()  # via the property: a forked child must not close its parent's sockets

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r}, table_prefix={self.table_prefix!r}, schema={self.schema!r})"


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
