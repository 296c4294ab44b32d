"""The scikit-learn head: an MLPClassifier on 64-d embeddings.

It is fitted once offline (``fit_head``) and continued online with ``partial_fit``, which is
why it is an MLP with the adam solver. ``EmbeddingSet`` is what travels with a head version:
a replay sample of training embeddings and the validation embeddings the gate judges on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.neural_network import MLPClassifier

# skops refuses to load types it does not know; the head's optimizer is one of them.
TRUSTED_TYPES = ["sklearn.neural_network._stochastic_optimizers.AdamOptimizer"]


def new_head(seed: int = 0, hidden: tuple[int, ...] = (128,), max_iter: int = 200) -> MLPClassifier:
    return MLPClassifier(
        hidden_layer_sizes=hidden, alpha=1e-3, learning_rate_init=1e-3, batch_size="auto",
        max_iter=max_iter, early_stopping=False, random_state=seed,
    )


def fit_head(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0, max_iter: int = 200) -> MLPClassifier:
    """Fit a fresh head; every class index 0..n_classes-1 is known to it even if rare."""
    head = new_head(seed, max_iter=max_iter)
    # A first partial_fit fixes the full label set (classes_), then fit trains to convergence
    # while keeping it, so partial_fit can later continue with any class.
    head.partial_fit(embeddings[:1], labels[:1], classes=np.arange(n_classes))
    head.set_params(warm_start=True)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        head.fit(embeddings, labels)
    head.set_params(warm_start=False)
    return head


@dataclass
class EmbeddingSet:
    """Embeddings with labels, made by one backbone version."""

    x: np.ndarray  # float32 (N, 64)
    y: np.ndarray  # int64 (N,)

    def save(self, path: str | Path) -> Path:
        np.savez_compressed(path, x=self.x.astype(np.float32), y=self.y.astype(np.int64))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSet":
        with np.load(path) as npz:
            return cls(npz["x"], npz["y"])

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
