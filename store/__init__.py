"""Durable state shared by every worker and replica, one store per concern, over one database.

``db`` (engine, transactions, schema creation) and ``schema`` (the tables) under
``feedback`` (user-corrected labels waiting for the updater), ``predictions`` (what /predict
answered, so /feedback can name it; expires) and ``lease`` (one updater at a time). SQLite by
default, PostgreSQL (or any SQLAlchemy URL) to share it between replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.db import Database
from store.feedback import FeedbackItem, FeedbackStore, IdempotencyConflict, UnknownPrediction
from store.lease import Lease
from store.predictions import PredictionLog


@dataclass
class Stores:
    """The three stores over one database."""

    db: Database
    feedback: FeedbackStore
    predictions: PredictionLog
    lease: Lease

    @classmethod
    def open(cls, url: str, **db_options) -> "Stores":
        db = Database(url, **db_options)
        return cls(db, FeedbackStore(db), PredictionLog(db), Lease(db))


__all__ = ["Database", "FeedbackItem", "FeedbackStore", "IdempotencyConflict", "Lease", "PredictionLog", "Stores",
           "UnknownPrediction"]
