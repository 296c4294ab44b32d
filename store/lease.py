"""A lease: one holder at a time across every worker and replica (one online update per task).

A holder takes the lease for ``ttl_s`` seconds and must renew it well within that; a holder
that dies simply stops renewing, and the lease frees itself when it expires.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from infantino.periodic import Periodic
from store.db import Database
from store.schema import MAX_NAME
from store.values import check_str


class Lease:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = db.tables.leases

    def try_acquire(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_s`` seconds; True if ``holder`` now holds it.

        Succeeds if the lease is free, expired, or already ``holder``'s (then it is renewed).
        Atomic: of several concurrent callers at most one gets a free lease.
        """
        check_str("name", name, MAX_NAME)
        check_str("holder", holder, MAX_NAME)
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        t = self.t
        with self.db.tx(write=True, durable=False) as conn:
            now = self.db.now()  # after BEGIN IMMEDIATE, which may have waited for the lock
            # Take it if expired or ours. On PostgreSQL a concurrent UPDATE of the same row waits
            # for the other transaction and then re-checks the WHERE against the committed row,
            # so two takers of one expired lease cannot both match.
            taken = conn.execute(t.update().where(t.c.name == name, sa.or_(t.c.expires < now, t.c.holder == holder))
                                 .values(holder=holder, expires=now + ttl_s)).rowcount
            if taken:
                return True
            # No row, or a live lease of someone else: the primary key decides who inserts first.
            try:
                with conn.begin_nested():  # a failed INSERT must not abort the whole transaction
                    conn.execute(t.insert().values(name=name, holder=holder, expires=now + ttl_s))
            except IntegrityError:
                return False
            return True

    @contextmanager
    def kept(self, name: str, holder: str, ttl_s: float) -> Iterator[None]:
        """For a lease ``holder`` has just acquired: renew it every quarter of ``ttl_s`` during the
        with-block, release it after. The TTL can then be short: a holder that dies (no more
        renewals) frees the lease within one TTL, however long its work was meant to take."""
        renewal = Periodic(lambda: self.try_acquire(name, holder, ttl_s), ttl_s / 4, f"lease-{name}").start()
        try:
            yield
        finally:
            renewal.stop()
            self.release(name, holder)

    def release(self, name: str, holder: str) -> None:
        """Give the lease up if ``holder`` holds it (otherwise do nothing)."""
        with self.db.tx(write=True, durable=False) as conn:
            conn.execute(self.t.delete().where(self.t.c.name == name, self.t.c.holder == holder))

    def holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now, or None if it is free or expired."""
        with self.db.tx() as conn:
            return conn.execute(sa.select(self.t.c.holder).where(self.t.c.name == name, self.t.c.expires > self.db.now())).scalar()
