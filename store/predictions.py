"""The prediction log: what /predict answered, so /feedback can name a prediction from any
worker or replica (and reuse its embedding and image instead of recomputing them).

Records expire: :meth:`PredictionLog.prune` deletes those older than the retention period, and
the service runs it periodically, so the log (and the photos in it) does not grow forever.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa

from store.db import Database
from store.schema import MAX_ID, MAX_NAME
from store.values import check_bytes, check_str, decode_embedding, encode_embedding


class PredictionLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = db.tables.predictions

    def record(self, predictions: Sequence[dict]) -> None:
        """Store (or replace) several predictions in one transaction.

        Each dict has ``prediction_id, task, label, embedding, backbone_version, head_version``
        and optionally ``image``, ``confidence``, ``margin``, ``domain``. Ids are expected to be unique (uuid4).
        """
        now = time.time()
        rows = []
        for p in predictions:
            for name in ("prediction_id", "task", "label", "backbone_version", "head_version"):
                check_str(name, p[name], MAX_ID if name == "prediction_id" else MAX_NAME)
            blob, dim = encode_embedding(p["embedding"])
            if blob is None:
                raise ValueError("embedding must not be None")
            rows.append(dict(
                prediction_id=p["prediction_id"], task=p["task"], label=p["label"], embedding=blob, embedding_dim=dim,
                confidence=p.get("confidence"), margin=p.get("margin"), backbone_version=p["backbone_version"],
                head_version=p["head_version"], image=check_bytes("image", p.get("image")), created=now,
                domain=p.get("domain"),
            ))
        if not rows:
            return
        # Not durable: one fsync per request is too many, and losing the last few to a power cut is harmless.
        with self.db.tx(write=True, durable=False) as conn:
            # One lookup and one multi-row insert for the usual case (fresh uuids); replace the rest.
            ids = [row["prediction_id"] for row in rows]
            existing = set(conn.execute(sa.select(self.t.c.prediction_id).where(self.t.c.prediction_id.in_(ids))).scalars())
            fresh = {row["prediction_id"]: row for row in rows if row["prediction_id"] not in existing}  # last one wins
            if fresh:
                conn.execute(self.t.insert(), list(fresh.values()))
            for row in rows:
                if row["prediction_id"] in existing:
                    values = {k: v for k, v in row.items() if k != "prediction_id"}
                    conn.execute(self.t.update().where(self.t.c.prediction_id == row["prediction_id"]).values(**values))

    def get(self, prediction_id: str, *, include_image: bool = True) -> dict | None:
        """``{'prediction_id','task','label','confidence','margin','embedding','backbone_version','head_version','image','created'}`` or None."""
        t = self.t
        image = t.c.image if include_image else sa.null().label("image")
        with self.db.tx() as conn:
            row = conn.execute(sa.select(t.c.prediction_id, t.c.task, t.c.label, t.c.confidence, t.c.margin, t.c.embedding,
                                         t.c.embedding_dim, t.c.backbone_version, t.c.head_version, image, t.c.created)
                               .where(t.c.prediction_id == prediction_id)).first()
        if row is None:
            return None
        m = dict(row._mapping)
        m["embedding"] = decode_embedding(m.pop("embedding"), m.pop("embedding_dim"))
        m["created"] = float(m["created"])
        return m

    def task_of(self, prediction_id: str) -> str | None:
        """The task a prediction answered (a cheap lookup: no blobs read)."""
        with self.db.tx() as conn:
            return conn.execute(sa.select(self.t.c.task).where(self.t.c.prediction_id == prediction_id)).scalar()

    def answered(self, prediction_id: str, with_embedding: bool = False) -> dict | None:
        """``{'task', 'label', 'head_version', 'backbone_version'}`` of a prediction (what it answered, by
        which models), or None; no blobs read unless ``with_embedding`` (then also ``'embedding'``)."""
        t = self.t
        columns = [t.c.task, t.c.label, t.c.head_version, t.c.backbone_version]
        if with_embedding:
            columns += [t.c.embedding, t.c.embedding_dim]
        with self.db.tx() as conn:
            row = conn.execute(sa.select(*columns).where(t.c.prediction_id == prediction_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        if with_embedding:
            out["embedding"] = decode_embedding(out.pop("embedding"), out.pop("embedding_dim"))
        return out

    def least_sure(self, task: str, *, limit: int = 24, since: float | None = None, order: str = "margin") -> list[dict]:
        """The predictions of ``task`` the model was least sure of that no feedback names yet: for
        a person to label first (active learning).

        Smallest ``margin`` (top minus second probability) or ``confidence`` first, the most
        recent first among equals; only those made at or after ``since`` (epoch seconds) when
        given. Rows carry ``prediction_id, task, label, confidence, margin, backbone_version,
        head_version, created, has_image``: no embedding or image bytes (see :meth:`images`).
        """
        if order not in ("margin", "confidence"):
            raise ValueError(f"order must be 'margin' or 'confidence'; got {order!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        t, f = self.t, self.db.tables.feedback
        key = t.c[order]
        labelled = sa.exists().where(f.c.prediction_id == t.c.prediction_id)
        q = (sa.select(t.c.prediction_id, t.c.task, t.c.label, t.c.confidence, t.c.margin, t.c.backbone_version,
                       t.c.head_version, t.c.created, t.c.image.is_not(None).label("has_image"))
             .where(t.c.task == task, key.is_not(None), ~labelled)
             .order_by(key.asc(), t.c.created.desc(), t.c.prediction_id).limit(limit))
        if since is not None:
            q = q.where(t.c.created >= since)
        with self.db.tx() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for row in rows:
            row["created"], row["has_image"] = float(row["created"]), bool(row["has_image"])
        return rows

    def images(self, prediction_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored image of each of ``prediction_ids`` that has one (missing ids are left out)."""
        ids = list(dict.fromkeys(prediction_ids))
        if not ids:
            return {}
        with self.db.tx() as conn:
            rows = conn.execute(sa.select(self.t.c.prediction_id, self.t.c.image)
                                .where(self.t.c.prediction_id.in_(ids), self.t.c.image.is_not(None))).all()
        return {pid: bytes(image) for pid, image in rows}

    def prune(self, older_than_s: float) -> int:
        """Delete predictions recorded more than ``older_than_s`` seconds ago; return how many."""
        with self.db.tx(write=True, durable=False) as conn:
            return conn.execute(self.t.delete().where(self.t.c.created < time.time() - older_than_s)).rowcount

    def delete(self, prediction_id: str) -> bool:
        with self.db.tx(write=True) as conn:
            return conn.execute(self.t.delete().where(self.t.c.prediction_id == prediction_id)).rowcount > 0

    def count(self) -> int:
        with self.db.tx() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.t)).scalar_one())

