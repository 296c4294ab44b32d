"""Feedback items: user-corrected labels, durable from the moment they are acknowledged.

An item is ``queued`` until an online update uses it (``used``) or keeps it as the gate's
evidence (``held_out``). A retried request with the same idempotency key is acknowledged
once; the same key with a different content is an :class:`IdempotencyConflict`, never a
silent duplicate. Feedback that names a prediction copies the prediction's embedding and
image inside the database (one INSERT ... SELECT), without a round trip through Python.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from store.db import Database
from store.schema import MAX_DOMAIN, MAX_ID, MAX_KEY, MAX_NAME, QUEUED, STATUSES
from store.values import check_bytes, check_str, decode_embedding, encode_embedding

_MARK_CHUNK = 500  # ids per UPDATE ... IN (...): below every backend's bound-parameter limit


class UnknownPrediction(KeyError):
    """No (recent) prediction with that id: it never existed, expired, or belongs to another task."""


class IdempotencyConflict(ValueError):
    """An idempotency key reused for different feedback."""

    def __init__(self, feedback_id: str, stored_label: str):
        super().__init__(f"the idempotency key was used for other feedback (item {feedback_id}, label {stored_label!r})")
        self.feedback_id, self.stored_label = feedback_id, stored_label


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
    client: str | None = None
    domain: str | None = None  # where it came from, as the client named it (heads/domain.py)


def fingerprint(task: str, label: str, subject: str) -> str:
    """What an item says: its task, label and what it is about (a prediction id or an image digest)."""
    return hashlib.sha256(f"{task}\0{label}\0{subject}".encode()).hexdigest()[:MAX_ID]


def image_digest(image: bytes) -> str:
    return "image:" + hashlib.sha256(image).hexdigest()


class FeedbackStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = db.tables.feedback

    # ---- writes ----------------------------------------------------------------------------------

    def add(
        self, *, task: str, label: str, embedding: np.ndarray | None, backbone_version: str | None,
        image: bytes | None = None, subject: str | None = None, prediction_id: str | None = None,
        predicted_label: str | None = None, idempotency_key: str | None = None, client: str | None = None,
        domain: str | None = None,
    ) -> tuple[str, bool]:
        """Commit the item, then return ``(feedback_id, duplicate)``.

        ``subject`` says what the item is about when the image is not stored (default: the
        image's digest, else the prediction id); a repeated ``idempotency_key`` (per task) with
        the same task, label and subject returns the first item's id with ``duplicate=True``;
        with anything else it raises :class:`IdempotencyConflict`. When this returns, the item is durable.
        """
        for name, value, limit in (("task", task, MAX_NAME), ("label", label, MAX_NAME)):
            check_str(name, value, limit)
        for name, value, limit in (("backbone_version", backbone_version, MAX_NAME), ("prediction_id", prediction_id, MAX_ID),
                                   ("predicted_label", predicted_label, MAX_NAME), ("idempotency_key", idempotency_key, MAX_KEY),
                                   ("client", client, MAX_NAME), ("domain", domain, MAX_DOMAIN)):
            check_str(name, value, limit, optional=True)
        if embedding is not None and backbone_version is None:
            raise ValueError("an embedding needs the backbone_version that produced it")
        blob, dim = encode_embedding(embedding)
        image = check_bytes("image", image)
        subject = subject or (image_digest(image) if image is not None else f"prediction:{prediction_id}")
        now = time.time()
        row = dict(
            id=uuid.uuid4().hex, task=task, label=label, status=QUEUED, embedding=blob, embedding_dim=dim,
            backbone_version=backbone_version, image=image, prediction_id=prediction_id, predicted_label=predicted_label,
            idempotency_key=idempotency_key, fingerprint=fingerprint(task, label, subject), client=client,
            created=now, updated=now, used_by_version=None, domain=domain,
        )
        return self._insert(task, idempotency_key, row["fingerprint"], lambda conn: conn.execute(self.t.insert().values(**row)), row["id"])

    def add_from_prediction(
        self, prediction_id: str, *, label: str, task: str, keep_image: bool = True,
        idempotency_key: str | None = None, client: str | None = None, domain: str | None = None,
    ) -> tuple[str, bool]:
        """Feedback on a recorded prediction of ``task``: its embedding, image and domain (unless
        ``domain`` names one) are copied inside the database. Raises :class:`UnknownPrediction`
        if there is no such prediction."""
        check_str("prediction_id", prediction_id, MAX_ID)
        check_str("label", label, MAX_NAME)
        check_str("idempotency_key", idempotency_key, MAX_KEY, optional=True)
        check_str("client", client, MAX_NAME, optional=True)
        check_str("domain", domain, MAX_DOMAIN, optional=True)
        p, now, new_id = self.db.tables.predictions, time.time(), uuid.uuid4().hex
        fp = fingerprint(task, label, f"prediction:{prediction_id}")
        columns = ["id", "task", "label", "status", "embedding", "embedding_dim", "backbone_version", "image",
                   "prediction_id", "predicted_label", "idempotency_key", "fingerprint", "client", "created", "updated", "domain"]
        select = sa.select(
            sa.literal(new_id, sa.String), p.c.task, sa.literal(label, sa.String), sa.literal(QUEUED, sa.String),
            p.c.embedding, p.c.embedding_dim, p.c.backbone_version, p.c.image if keep_image else sa.null(),
            p.c.prediction_id, p.c.label, sa.literal(idempotency_key, sa.String), sa.literal(fp, sa.String),
            sa.literal(client, sa.String), sa.literal(now, sa.Double), sa.literal(now, sa.Double),
            p.c.domain if domain is None else sa.literal(domain, sa.String),
        ).where(p.c.prediction_id == prediction_id, p.c.task == task)

        def insert(conn) -> None:
            # RETURNING, not rowcount: psycopg reports -1 rows for INSERT ... SELECT.
            if conn.execute(self.t.insert().from_select(columns, select).returning(self.t.c.id)).first() is None:
                raise UnknownPrediction(prediction_id)

        return self._insert(task, idempotency_key, fp, insert, new_id)

    def _insert(self, task: str, key: str | None, fp: str, insert, new_id: str) -> tuple[str, bool]:
        same_key = sa.select(self.t.c.id, self.t.c.fingerprint, self.t.c.label).where(self.t.c.task == task, self.t.c.idempotency_key == key)

        def replay(existing) -> tuple[str, bool]:
            if existing.fingerprint is not None and existing.fingerprint != fp:
                raise IdempotencyConflict(existing.id, existing.label)
            return existing.id, True

        try:
            with self.db.tx(write=True) as conn:
                if key is not None:
                    existing = conn.execute(same_key).first()
                    if existing is not None:
                        return replay(existing)
                insert(conn)
            return new_id, False
        except IntegrityError:
            # PostgreSQL under READ COMMITTED: another replica inserted the same key between our
            # SELECT and INSERT. The unique key stopped the duplicate; answer as for a retry.
            if key is None:
                raise
            with self.db.tx() as conn:
                existing = conn.execute(same_key).first()
            if existing is None:
                raise
            return replay(existing)

    def mark(self, ids: Sequence[str], status: str, used_by_version: str | None = None) -> None:
        """Set ``status`` (and ``used_by_version``, None clears it) on ``ids``, in one transaction.

        Unknown ids are ignored.
        """
        _check_status(status)
        check_str("used_by_version", used_by_version, MAX_NAME, optional=True)
        unique = list(dict.fromkeys(ids))
        if not unique:
            return
        now = time.time()
        with self.db.tx(write=True) as conn:
            for i in range(0, len(unique), _MARK_CHUNK):
                conn.execute(self.t.update().where(self.t.c.id.in_(unique[i:i + _MARK_CHUNK]))
                             .values(status=status, used_by_version=used_by_version, updated=now))

    def set_embedding(self, id: str, embedding: np.ndarray, backbone_version: str) -> None:
        """Replace an item's embedding, e.g. re-embedding its image after a backbone change.

        Raises KeyError if there is no such item.
        """
        check_str("backbone_version", backbone_version, MAX_NAME)
        blob, dim = encode_embedding(embedding)
        if blob is None:
            raise ValueError("embedding must not be None")
        with self.db.tx(write=True) as conn:
            result = conn.execute(self.t.update().where(self.t.c.id == id).values(
                embedding=blob, embedding_dim=dim, backbone_version=backbone_version, updated=time.time()))
        if result.rowcount == 0:
            raise KeyError(f"no feedback item {id!r}")

    def delete(self, id: str) -> bool:
        """Remove an item and its image; True if it existed."""
        with self.db.tx(write=True) as conn:
            return conn.execute(self.t.delete().where(self.t.c.id == id)).rowcount > 0

    def delete_for_prediction(self, prediction_id: str) -> int:
        """Remove every item that names ``prediction_id``; returns how many."""
        with self.db.tx(write=True) as conn:
            return conn.execute(self.t.delete().where(self.t.c.prediction_id == prediction_id)).rowcount

    # ---- reads -----------------------------------------------------------------------------------

    def get(self, id: str, *, include_image: bool = True) -> FeedbackItem | None:
        """One item by id, or None."""
        with self.db.tx() as conn:
            row = conn.execute(self._select(include_image).where(self.t.c.id == id)).first()
        return None if row is None else _item(row)

    def depth(self, task: str) -> int:
        """Number of 'queued' items of ``task``."""
        with self.db.tx() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.t)
                                    .where(self.t.c.task == task, self.t.c.status == QUEUED)).scalar_one())

    def counts(self, task: str) -> dict[str, int]:
        """Items of ``task`` per status; every status is present (0 if none)."""
        with self.db.tx() as conn:
            rows = conn.execute(sa.select(self.t.c.status, sa.func.count()).where(self.t.c.task == task)
                                .group_by(self.t.c.status)).all()
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

    def oldest_queued_age(self, task: str) -> float | None:
        """Seconds since the oldest 'queued' item of ``task`` was created; None if none is queued."""
        with self.db.tx() as conn:
            oldest = conn.execute(sa.select(sa.func.min(self.t.c.created))
                                  .where(self.t.c.task == task, self.t.c.status == QUEUED)).scalar()
        return None if oldest is None else max(0.0, time.time() - float(oldest))

    def _items(self, task: str, status: str | None, limit: int | None, include_images: bool) -> list[FeedbackItem]:
        q = self._select(include_images).where(self.t.c.task == task).order_by(self.t.c.created, self.t.c.id)
        if status is not None:
            q = q.where(self.t.c.status == status)
        if limit is not None:
            q = q.limit(limit)
        with self.db.tx() as conn:
            return [_item(r) for r in conn.execute(q)]

    def _select(self, include_images: bool) -> sa.Select:
        t = self.t
        image = t.c.image if include_images else sa.null().label("image")
        return sa.select(t.c.id, t.c.task, t.c.label, t.c.status, t.c.embedding, t.c.embedding_dim, t.c.backbone_version,
                         image, t.c.prediction_id, t.c.predicted_label, t.c.created, t.c.updated, t.c.used_by_version, t.c.client,
                         t.c.domain)


def _item(row: sa.Row) -> FeedbackItem:
    m = row._mapping
    return FeedbackItem(
        id=m["id"], task=m["task"], label=m["label"], status=m["status"],
        embedding=decode_embedding(m["embedding"], m["embedding_dim"]), backbone_version=m["backbone_version"],
        image=m["image"], prediction_id=m["prediction_id"], predicted_label=m["predicted_label"],
        created=float(m["created"]), updated=float(m["updated"]), used_by_version=m["used_by_version"], client=m["client"],
        domain=m["domain"],
    )


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(map(repr, STATUSES))}; got {status!r}")
