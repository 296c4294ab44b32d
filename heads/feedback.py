"""The feedback head: the offline-trained head, plus everything feedback has taught it.

``fit`` trains the base head (an MLP) on the training embeddings and keeps a class-stratified
replay sample of them. Each ``partial_fit`` adds its items to a memory of feedback and refits a
logistic-regression adapter on the whole memory (each item weighted ``feedback_weight``) and
the replay sample; once it has seen feedback, the adapter answers.

Feedback may name the domain it came from (``domains``, e.g. "infant"): the head then also learns
that domain's class mix against the training data's (heads/domain.py), and moves answers to
requests naming that domain toward it; requests naming none are answered as before.
With ``domain_memory`` > 0 (the deployment's default, 0.85) it also keeps each named domain's feedback rows,
and a classifier of that domain's own fitted on them answers requests naming the domain, blended in
with that weight (heads/domain.py): the part of the online loop that moves a new domain's accuracy.
The memory reads the backbone's stage features where the rows carry them (served rows: the
embedding, then the stage features; backbones/model.py, ``domain_memory_features="stages"``), else
the embedding.
A backbone adaptation's head (adaptation/backbone.py) learns only the domains' mixes and memory
(``learn_domains``): its backbone learned the feedback itself.

Why not continue the MLP with small steps: measured on the infant feedback half
(bench/online_tuning.py), gentle partial_fit steps that keep FER2013 within one point barely
move infant accuracy, while a refit on the memory and the replay moves it several points at
the same cost to FER2013. A refit is also order-free and exact: the head after N items is the
same whatever batches they came in, which is what makes the gate's cross-fitting honest.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from heads.domain import DomainMemory, DomainPriors, Domains, class_shares, per_row
from heads.mlp import MLPHead
from infantino.embeddings import EmbeddingSet, split_rows, stack_rows


class FeedbackHead(ClassifierMixin, BaseEstimator):
    TRUSTED_TYPES = ("heads.feedback.FeedbackHead", "heads.mlp.MLPHead", "heads.domain.DomainPriors", "heads.domain.DomainMemory",
                     "sklearn.neural_network._stochastic_optimizers.AdamOptimizer", "sklearn.pipeline.Pipeline",
                     "sklearn.preprocessing._data.StandardScaler")
    # Heads registered before these existed load without them, and behave as they did then.
    domain_priors, training_prior, training_prior_, domain_priors_ = False, None, None, None
    domain_memory, domain_memory_, domain_memory_kind, domain_memory_features, domain_memory_C = 0.0, None, "prototype", "embedding", 1.0
    replay_targets = "labels"

    def __init__(self, base: MLPHead | None = None, feedback_weight: float = 5.0, replay_size: int = 2000, C: float = 1.0,
                 random_state: int = 0, domain_priors: bool = False,
                 training_prior: tuple[float, ...] | None = None, domain_memory: float = 0.0, replay_targets: str = "labels",
                 domain_memory_kind: str = "logistic", domain_memory_features: str = "stages", domain_memory_C: float = 1.0):
        self.base = base
        self.feedback_weight = feedback_weight
        self.replay_size = replay_size
        self.C = C
        self.random_state = random_state
        self.domain_priors = domain_priors
        self.training_prior = training_prior  # class shares of the training data (None: fit's labels, else the replay's)
        self.domain_memory = domain_memory  # the weight of each named domain's memory in its answers (0: off)
        self.domain_memory_kind = domain_memory_kind  # how the memory answers: "logistic" or "prototype" (heads/domain.py)
        self.domain_memory_features = domain_memory_features  # what it reads: "stages" (where rows carry them) or "embedding"
        self.domain_memory_C = domain_memory_C  # the logistic memory's inverse regularisation
        # What the adapter learns on the replay sample: "labels", or "base": the base head's answers
        # (soft targets, as each item once per class weighted by the base's probability), so that with
        # no feedback the adapter answers as the base does on the training data.
        self.replay_targets = replay_targets

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
        self.feedback_domain_ = np.zeros(0, object)  # the domain each item named ("" for none)
        self.adapter_ = None
        self.domain_priors_ = None
        self.domain_memory_ = None

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "FeedbackHead":
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        # A clone: the ``base`` parameter stays the unfitted template (sklearn's convention; skops would store it twice).
        base = (clone(self.base) if self.base is not None else MLPHead(random_state=self.random_state)).fit(X, y, classes)
        self.training_prior_ = class_shares(np.searchsorted(base.classes_, y), len(base.classes_))
        self._set_base(base, EmbeddingSet(X, y).sample(self.replay_size, self.random_state))
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None,
                    domains: Domains = None) -> "FeedbackHead":
        """Remember the items (and the domain each came from), then refit the adapter on all feedback
        so far and the replay sample, and each named domain's class mix."""
        if not hasattr(self, "base_"):
            return self.fit(X, y, classes)
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        self.feedback_x_ = stack_rows(self.feedback_x_, X) if len(self.feedback_x_) else X
        self.feedback_y_ = np.concatenate([self.feedback_y_, y])
        named = np.array([d or "" for d in per_row(domains, len(y))], dtype=object)
        self.feedback_domain_ = np.concatenate([getattr(self, "feedback_domain_", np.full(len(self.feedback_y_) - len(y), "", object)), named])
        self.learn_domains(self.feedback_y_, self.feedback_domain_, self.feedback_x_)
        if len(self.feedback_y_):
            replay_x, replay_y, replay_w = self._replay_targets()
            x = np.concatenate([self.feedback_x_[:, : self.n_features_in_], replay_x])
            t = np.concatenate([self.feedback_y_, replay_y])
            weight = np.concatenate([np.full(len(self.feedback_y_), self.feedback_weight), replay_w])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                adapter = LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
                self.adapter_ = adapter.fit(x, t, sample_weight=weight)
        return self

    def _replay_targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The replay sample as the adapter's rows: each item with its label (weight 1), or with
        ``replay_targets="base"`` once per class the base head gives it over 0.1%, weighted by that probability."""
        if self.replay_targets == "labels":
            return self.replay_x_, self.replay_y_, np.ones(len(self.replay_y_))
        if self.replay_targets != "base":
            raise ValueError(f"replay_targets must be labels or base, got {self.replay_targets!r}")
        proba = self.base_.predict_proba(self.replay_x_)
        item, column = np.nonzero(proba > 1e-3)
        return self.replay_x_[item], self.classes_[column], proba[item, column]

    def learn_domains(self, y: np.ndarray, domains: Domains, X: np.ndarray | None = None) -> "FeedbackHead":
        """Learn each named domain's class mix from labelled items (all there are), and, given their
        embeddings ``X``, its memory: partial_fit's last step, and all a backbone adaptation's head
        needs to learn."""
        named = per_row(domains, len(y))
        if self.domain_priors and any(named):
            self.domain_priors_ = DomainPriors(self._training_prior()).fit(np.searchsorted(self.classes_, y), named)
        if self.domain_memory and X is not None and any(named):
            self.domain_memory_ = DomainMemory(weight=self.domain_memory, kind=self.domain_memory_kind, C=self.domain_memory_C).fit(
                self._memory_input(X), np.searchsorted(self.classes_, y), named)
        return self

    def _memory_input(self, X: np.ndarray) -> np.ndarray:
        return memory_input(X, self.n_features_in_, self.domain_memory_features)

    def _training_prior(self) -> np.ndarray:
        for prior in (self.training_prior, self.training_prior_):
            if prior is not None:
                return np.asarray(prior, np.float64)
        # Only the replay sample is known: class-stratified, so flatter than the training data.
        return class_shares(np.searchsorted(self.classes_, self.replay_y_), len(self.classes_))

    @property
    def feedback_seen_(self) -> int:
        return len(self.feedback_y_)

    def predict_proba(self, X: np.ndarray, domains: Domains = None) -> np.ndarray:
        """Probabilities per row; rows whose domain (one for all, or one per row) taught this head
        its class mix are moved to it."""
        X = np.asarray(X, np.float32)
        embedding = split_rows(X, self.n_features_in_)[0]
        if self.adapter_ is None:
            out = self.base_.predict_proba(embedding)
        else:
            # The adapter knows only the classes it has seen; place its columns in the full label set.
            out = np.zeros((len(X), len(self.classes_)), np.float64)
            out[:, np.searchsorted(self.classes_, self.adapter_.classes_)] = self.adapter_.predict_proba(embedding)
        if domains is None:
            return out
        if self.domain_priors_ is not None:
            out = self.domain_priors_.adjust(out, domains)
        return out if self.domain_memory_ is None else self.domain_memory_.blend(out, self._memory_input(X), domains)

    def predict(self, X: np.ndarray, domains: Domains = None) -> np.ndarray:
        return self.classes_[self.predict_proba(X, domains).argmax(1)]


def memory_input(rows: np.ndarray, embedding_width: int, features: str) -> np.ndarray:
    """What a domain memory reads of served ``rows``: with ``features="stages"`` their stage features,
    where they carry them; else the embedding."""
    embedding, stages = split_rows(rows, embedding_width)
    return stages if stages is not None and features == "stages" else embedding
