"""The tables, as one SQLAlchemy Core schema that runs on SQLite and PostgreSQL alike.

There are no migrations beyond one rule: a nullable column added here is added to existing tables
when the store opens (store/db.py). Any other change needs a new table prefix or a manual migration.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

MAX_ID, MAX_NAME, MAX_KEY, MAX_DOMAIN = 64, 256, 256, 64  # column lengths, checked before the database does
DOMAIN_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"  # a domain's name: lower-case letters, digits, '_', '.', '-' 
QUEUED, USED, HELD_OUT = "queued", "used", "held_out"
STATUSES: tuple[str, ...] = (QUEUED, USED, HELD_OUT)


@dataclass(frozen=True)
class Tables:
    feedback: sa.Table
    predictions: sa.Table
    leases: sa.Table


def define_tables(md: sa.MetaData, prefix: str) -> Tables:
    feedback = sa.Table(
        f"{prefix}feedback", md,
        sa.Column("id", sa.String(MAX_ID), primary_key=True),
        sa.Column("task", sa.String(MAX_NAME), nullable=False),
        sa.Column("label", sa.String(MAX_NAME), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=True),  # little-endian float32
        sa.Column("embedding_dim", sa.Integer, nullable=True),
        sa.Column("backbone_version", sa.String(MAX_NAME), nullable=True),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("prediction_id", sa.String(MAX_ID), nullable=True),
        sa.Column("predicted_label", sa.String(MAX_NAME), nullable=True),
        sa.Column("idempotency_key", sa.String(MAX_KEY), nullable=True),
        # What the item says (label + what it is about): a reused key must say the same thing.
        sa.Column("fingerprint", sa.String(MAX_ID), nullable=True),
        sa.Column("client", sa.String(MAX_NAME), nullable=True),  # who sent it (a hashed address or token name)
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("used_by_version", sa.String(MAX_NAME), nullable=True),
        sa.Column("domain", sa.String(MAX_DOMAIN), nullable=True),  # where the item came from, as the client named it
        # NULL keys are distinct on SQLite and PostgreSQL, so items without a key never collide.
        sa.UniqueConstraint("task", "idempotency_key", name=f"{prefix}feedback_task_idem_key"),
        sa.Index(f"{prefix}feedback_task_status_created", "task", "status", "created"),
        sa.Index(f"{prefix}feedback_prediction_id", "prediction_id"),
    )
    predictions = sa.Table(
        f"{prefix}predictions", md,
        sa.Column("prediction_id", sa.String(MAX_ID), primary_key=True),
        sa.Column("task", sa.String(MAX_NAME), nullable=False),
        sa.Column("label", sa.String(MAX_NAME), nullable=False),
        sa.Column("confidence", sa.Float, nullable=True),  # top probability
        sa.Column("margin", sa.Float, nullable=True),  # top minus second probability: small = unsure
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("embedding_dim", sa.Integer, nullable=False),
        sa.Column("backbone_version", sa.String(MAX_NAME), nullable=False),
        sa.Column("head_version", sa.String(MAX_NAME), nullable=False),
        sa.Column("image", sa.LargeBinary, nullable=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("domain", sa.String(MAX_DOMAIN), nullable=True),  # the domain the request named (feedback on it inherits it)
        sa.Index(f"{prefix}predictions_created", "created"),
    )
    leases = sa.Table(
        f"{prefix}leases", md,
        sa.Column("name", sa.String(MAX_NAME), primary_key=True),
        sa.Column("holder", sa.String(MAX_NAME), nullable=False),
        sa.Column("expires", sa.Double, nullable=False),  # epoch seconds (server clock on PostgreSQL)
    )
    return Tables(feedback, predictions, leases)
