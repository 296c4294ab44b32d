"""The feedback head: the offline-trained head, plus everything feedback has taught it.

``fit`` trains the base head (an MLP) on the training embeddings and keeps a class-stratified
replay sample of them. Each ``partial_fit`` adds its items to a memory of feedback and refits a
logistic-regression adapter on the whole memory (each item weighted ``feedback_weight``) and
the replay sample; once it has seen feedback, the adapter answers.

Why not continue the MLP with small steps: measured on the infant feedback half
(bench/online_tuning.py), gentle partial_fit steps that keep FER2013 within one point barely
move infant accuracy, while a refit on the memory and the replay moves it several points at
the same cost to FER2013. A refit is also order-free and exact: the head after N items is the
same whatever batches they came in, which is what makes the gate's cross-fitting honest.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from heads.mlp import MLPHead
from infantino.embeddings import EmbeddingSet


class FeedbackHead(ClassifierMixin, BaseEstimator):
    TRUSTED_TYPES = ("heads.feedback.FeedbackHead", "heads.mlp.MLPHead",
                     "sklearn.neural_network._stochastic_optimizers.AdamOptimizer")

    def __init__(self, base: MLPHead | None = None, feedback_weight: float = 5.0, replay_size: int = 2000, C: float = 1.0,
                 random_state: int = 0):
        self.base = base
        self.feedback_weight = feedback_weight
        self.replay_size = replay_size
        self.C = C
        self.random_state = random_state

    @classmethod
    def around(cls, base, replay: EmbeddingSet, **params) -> "FeedbackHead":
        """Wrap an already fitted head with its training replay sample."""
        head = cls(base=base, **params)
        head._set_base(base, replay.sample(head.replay_size, head.random_state))
        return head

    def _set_base(self, base, replay: EmbeddingSet) -> None:
        self.base_ = base
        self.classes_, self.n_features_in_ = base.classes_, base.n_features_in_
        self.replay_x_, self.replay_y_ = replay.x.astype(np.float32), replay.y.astype(np.int64)
        self.feedback_x_ = np.zeros((0, self.n_features_in_), np.float32)
        self.feedback_y_ = np.zeros(0, np.int64)
        self.adapter_ = None

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "FeedbackHead":
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        base = (self.base or MLPHead(random_state=self.random_state)).fit(X, y, classes)
        self._set_base(base, EmbeddingSet(X, y).sample(self.replay_size, self.random_state))
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "FeedbackHead":
        """Remember the items, then refit the adapter on all feedback so far and the replay sample."""
        if not hasattr(self, "base_"):
            return self.fit(X, y, classes)
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        self.feedback_x_ = np.concatenate([self.feedback_x_, X])
        self.feedback_y_ = np.concatenate([self.feedback_y_, y])
        if len(self.feedback_y_):
            x = np.concatenate([self.feedback_x_, self.replay_x_])
            t = np.concatenate([self.feedback_y_, self.replay_y_])
            weight = np.concatenate([np.full(len(self.feedback_y_), self.feedback_weight), np.ones(len(self.replay_y_))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                adapter = LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
                self.adapter_ = adapter.fit(x, t, sample_weight=weight)
        return self

    @property
    def feedback_seen_(self) -> int:
        return len(self.feedback_y_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if self.adapter_ is None:
            return self.base_.predict_proba(X)
        # The adapter knows only the classes it has seen; place its columns in the full label set.
        out = np.zeros((len(X), len(self.classes_)), np.float64)
        out[:, np.searchsorted(self.classes_, self.adapter_.classes_)] = self.adapter_.predict_proba(X)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
