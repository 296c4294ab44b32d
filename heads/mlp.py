"""The MLP head: a scikit-learn MLPClassifier on 64-d embeddings, continued online with partial_fit.

Fitted once offline (``fit``: to convergence) and continued online (``partial_fit``: a few
gentle passes at ``online_learning_rate``), which is why it is an MLP with the Adam solver.
Everything about the MLP's internals stays in this file.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

from infantino.embeddings import split_rows


class MLPHead(ClassifierMixin, BaseEstimator):
    """An sklearn-style classifier (fit, partial_fit, predict_proba; learned state ends in ``_``).

    ``classes`` given to ``fit`` (default: the labels seen) fixes the label set once, so online
    updates may later bring any class, even one absent from the first fit.
    """

    # skops loads only types it is told to trust: ours and the MLP's optimizer.
    TRUSTED_TYPES = ("heads.mlp.MLPHead", "sklearn.neural_network._stochastic_optimizers.AdamOptimizer")
    # Heads saved before the parameter existed load without it and fitted to convergence.
    validation_fraction = 0.0
    # Below this many held-out items in some class, accuracy on them moves in steps too coarse to stop
    # on (one item is over 3 points of that class), so the fit runs to convergence as before. FER2013's
    # rarest class (disgust) has 35 in a tenth of the training split.
    MIN_HELD_OUT_PER_CLASS = 30

    def __init__(self, hidden_layer_sizes: tuple[int, ...] = (128,), alpha: float = 1e-3, learning_rate_init: float = 1e-3,
                 max_iter: int = 200, random_state: int = 0, online_learning_rate: float = 3e-4, online_passes: int = 5,
                 validation_fraction: float = 0.0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.online_learning_rate = online_learning_rate
        self.online_passes = online_passes
        # > 0: the offline fit holds out this fraction of its own training embeddings (when that is at
        # least MIN_HELD_OUT_PER_CLASS of every class) and stops when accuracy there stops improving
        # (sklearn's early stopping). A backbone separates the faces it was trained on far better than
        # new ones (84-89% against 63-64% on FER2013), so a head fitted to convergence on them is
        # overconfident. Online partial_fit is unaffected.
        self.validation_fraction = validation_fraction

    @classmethod
    def from_mlp(cls, mlp: MLPClassifier) -> "MLPHead":
        """Wrap an already fitted MLPClassifier."""
        head = cls(hidden_layer_sizes=mlp.hidden_layer_sizes, alpha=mlp.alpha, learning_rate_init=mlp.learning_rate_init,
                   max_iter=mlp.max_iter, random_state=mlp.random_state if isinstance(mlp.random_state, int) else 0)
        head.mlp_, head.classes_, head.n_features_in_, head.online_updates_ = mlp, mlp.classes_, mlp.n_features_in_, 0
        return head

    @classmethod
    def from_linear(cls, weight: np.ndarray, bias: np.ndarray, **params) -> MLPHead:
        """An MLP head that answers exactly as a linear classifier (``weight``: classes x features), with
        the rest of its hidden units free for online learning.

        For a backbone's own training classifier: trained with the backbone on augmented faces and
        soft targets, it is calibrated on faces it never saw (ECE 0.03-0.05 on FER2013 validation),
        where an MLP refitted on the training faces' embeddings, which the backbone has learnt, is
        overconfident (0.06-0.18) and about as accurate (0.2 points more on average over six networks: bench/head_init.py). Two ReLU units a class
        carry its score z: relu(z) - relu(-z) = z; the other hidden units keep their random input
        weights and start with zero output weights.
        """
        weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        n_classes, n_features = weight.shape
        head = cls(**params)
        if head.hidden_layer_sizes[0] < 2 * n_classes or len(head.hidden_layer_sizes) != 1:
            raise ValueError(f"a linear classifier of {n_classes} classes needs one hidden layer of at least "
                             f"{2 * n_classes} units, got {head.hidden_layer_sizes}")
        mlp = MLPClassifier(hidden_layer_sizes=head.hidden_layer_sizes, alpha=head.alpha,
                            learning_rate_init=head.learning_rate_init, max_iter=head.max_iter, random_state=head.random_state)
        # One step on zeros builds the layers for the whole label set; every weight is then set below.
        mlp.partial_fit(np.zeros((n_classes, n_features), np.float32), np.arange(n_classes), classes=np.arange(n_classes))
        units = np.arange(n_classes)
        mlp.coefs_[0][:, units], mlp.coefs_[0][:, n_classes + units] = weight.T, -weight.T
        mlp.intercepts_[0][units], mlp.intercepts_[0][n_classes + units] = bias, -bias
        mlp.coefs_[1][:] = 0.0
        mlp.coefs_[1][units, units], mlp.coefs_[1][n_classes + units, units] = 1.0, -1.0
        mlp.intercepts_[1][:] = 0.0
        # A fresh Adam state for these weights (the one step on zeros left its moments behind).
        mlp._optimizer = AdamOptimizer(mlp.coefs_ + mlp.intercepts_, head.learning_rate_init, mlp.beta_1, mlp.beta_2, mlp.epsilon)
        head.mlp_, head.classes_, head.n_features_in_, head.online_updates_ = mlp, mlp.classes_, n_features, 0
        return head

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "MLPHead":
        X, y = np.asarray(X, np.float32), np.asarray(y)
        self.mlp_ = MLPClassifier(hidden_layer_sizes=self.hidden_layer_sizes, alpha=self.alpha,
                                  learning_rate_init=self.learning_rate_init, max_iter=self.max_iter,
                                  early_stopping=False, random_state=self.random_state)
        classes = np.unique(y) if classes is None else np.asarray(classes)
        all_present = np.array_equal(np.unique(y), classes)
        held_out_per_class = np.bincount(np.searchsorted(classes, y)).min() * self.validation_fraction if all_present else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if held_out_per_class >= self.MIN_HELD_OUT_PER_CLASS:
                # A plain fit fixes the label set and stops when the held-out share stops improving.
                self.mlp_.set_params(early_stopping=True, validation_fraction=self.validation_fraction)
                self.mlp_.fit(X, y)
                # partial_fit refuses early stopping, and compares against the loss record it leaves unset.
                self.mlp_.set_params(early_stopping=False)
                self.mlp_.best_loss_ = np.inf
                return self._fitted(X)
            # A first partial_fit fixes the whole label set; fit then trains to convergence keeping it
            # (sklearn's warm start needs every class present; otherwise epochs of partial_fit do).
            self.mlp_.partial_fit(X[:1], y[:1], classes=classes)
            if all_present:
                self.mlp_.set_params(warm_start=True)
                self.mlp_.fit(X, y)
                self.mlp_.set_params(warm_start=False)
            else:
                rng = np.random.default_rng(self.random_state)
                for _ in range(self.max_iter):
                    order = rng.permutation(len(y))
                    self.mlp_.partial_fit(X[order], y[order])
        return self._fitted(X)

    def _fitted(self, X: np.ndarray) -> MLPHead:
        self.classes_, self.n_features_in_, self.online_updates_ = self.mlp_.classes_, X.shape[1], 0
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "MLPHead":
        """Continue training: ``online_passes`` shuffled passes at ``online_learning_rate``."""
        X, y = np.asarray(X, np.float32), np.asarray(y)
        if not hasattr(self, "mlp_"):
            return self.fit(X, y, classes)
        X = split_rows(X, self.n_features_in_)[0]  # served rows: the embedding part
        # partial_fit continues the head's own Adam state, whose step size was fixed at the first
        # fit; sklearn reads it from the optimizer, so set both.
        self.mlp_.set_params(learning_rate_init=self.online_learning_rate)
        self.mlp_._optimizer.learning_rate_init = self.online_learning_rate
        rng = np.random.default_rng(self.random_state + self.online_updates_)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(self.online_passes if len(y) else 0):
                order = rng.permutation(len(y))
                self.mlp_.partial_fit(X[order], y[order])
        self.online_updates_ += 1
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.mlp_.predict_proba(split_rows(X, self.n_features_in_)[0])  # served rows: the embedding part

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
