"""Classifier heads on the backbone's 64-d embeddings, behind one protocol.

A head is a scikit-learn style estimator: ``fit`` offline, ``partial_fit`` online,
``predict_proba``; learned state ends in ``_`` (``classes_``, ``n_features_in_``). A new head
type is one file here plus one line in ``HEADS``; nothing outside this package knows an
MLP's internals.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from heads.mlp import MLPHead


@runtime_checkable
class Head(Protocol):
    classes_: np.ndarray
    n_features_in_: int

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "Head": ...

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "Head": ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


HEADS: dict[str, type] = {"mlp": MLPHead}


def create_head(kind: str = "mlp", **params) -> Head:
    """A new, unfitted head of ``kind`` (like ``timm.create_model`` for backbones)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; accepted: {sorted(HEADS)}")
    return HEADS[kind](**params)


def trusted_types() -> list[str]:
    """The types skops may load in a registered head (every head type's own, and their parts)."""
    return sorted({t for cls in HEADS.values() for t in cls.TRUSTED_TYPES})
