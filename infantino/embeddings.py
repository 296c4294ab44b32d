"""Labelled embeddings: what travels with a head version and what the gate judges on.

A freshly trained head is registered with a replay sample of its training embeddings (mixed
into online updates against forgetting) and the validation embeddings (the gate's fixed
reference). Both are made by one backbone version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infantino import EMBEDDING_DIM


def split_rows(rows: np.ndarray, embedding_width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A served row is the embedding followed by the backbone's stage features (backbones/model.py):
    (the first ``embedding_width`` columns, the rest or None where rows hold the embedding alone)."""
    rows = np.asarray(rows, np.float32)
    return rows[:, :embedding_width], (rows[:, embedding_width:] if rows.shape[1] > embedding_width else None)


def stack_rows(*blocks: np.ndarray) -> np.ndarray:
    """Blocks of rows as one array: rows of one width stack as they are; where widths differ (items
    embedded before the backbone served stage features) every row keeps what all have in common,
    the embedding."""
    width = min(b.shape[1] for b in blocks)
    return np.concatenate([np.asarray(b, np.float32)[:, :width] for b in blocks])


@dataclass
class EmbeddingSet:
    """Embeddings with labels, made by one backbone version."""

    x: np.ndarray  # float32 (N, 64), or served rows (N, 64 + stage features: split_rows)
    y: np.ndarray  # int64 (N,)

    @classmethod
    def empty(cls, dim: int = EMBEDDING_DIM) -> "EmbeddingSet":
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def save(self, path: str | Path) -> Path:
        np.savez_compressed(path, x=self.x.astype(np.float32), y=self.y.astype(np.int64))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSet":
        with np.load(path) as npz:
            return cls(npz["x"].astype(np.float32), npz["y"].astype(np.int64))

    def sample(self, n: int, seed: int = 0) -> "EmbeddingSet":
        """A class-stratified random sample of at most n items (keeps rare classes present)."""
        if len(self.y) <= n:
            return self
        rng = np.random.default_rng(seed)
        classes = np.unique(self.y)
        per_class = max(n // len(classes), 1)
        idx = np.concatenate([rng.permutation(np.flatnonzero(self.y == c))[:per_class] for c in classes])
        rest = np.setdiff1d(np.arange(len(self.y)), idx)
        idx = np.concatenate([idx, rng.permutation(rest)[: max(n - len(idx), 0)]])
        return EmbeddingSet(self.x[idx], self.y[idx])

    @staticmethod
    def concat(*sets: "EmbeddingSet") -> "EmbeddingSet":
        sets = tuple(s for s in sets if len(s))
        if not sets:
            return EmbeddingSet.empty()
        return EmbeddingSet(np.concatenate([s.x for s in sets]), np.concatenate([s.y for s in sets]))
