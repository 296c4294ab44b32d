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
        and optionally ``image``, ``confidence``, ``margin``. Ids are expected to be unique (uuid4).
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

