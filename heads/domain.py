"""What each named domain's feedback teaches, for requests from that domain only: its class mix, its own classifier.

Feedback from a new domain (infants, for a model trained on FER2013) brings a class mix of its
own: FER2013 has 1.5% disgust, the infant photos 13%. Moving a head's probabilities from the
training prior to the domain's (``p * domain_prior / training_prior``, renormalised) is the
classic correction for such a label shift. Applied to every request it also moves the training
domain's answers (FER2013 -6 points, bench/feature_adaptation.py), and learned from the
embeddings the domain is told apart too poorly to help (AUC 0.85: +0.5 points at -1.0 on
FER2013, same bench). So the client names the domain (``domain`` on /predict and /feedback):
feedback so named teaches its domain's mix, and only requests naming it are moved.

``DomainMemory`` keeps, for each named domain, its feedback's embeddings, and a classifier of the
domain's own fitted on them (a logistic regression; or class prototypes, each class's mean
direction) answers requests naming it, blended with the head's answer (issue 11's "memory of
feedback embeddings blended with the head"). It is what lets the online loop learn a new domain:
on the infant feedback half (4-fold CV, the shipped model at its framing) the logistic memory on
the backbone's stage features (served after the embedding, backbones/model.py) lifts the model as
it is from 51.9% to 62.3%, on the embedding to 59.8% (bench/domain_memory_features.py;
bench/feature_adaptation.py compares prototypes and neighbours); README "Infant adaptation" has
the held-out half. FER2013 requests name no domain.

Sklearn-style estimators (``fit``; learned state ends in ``_``); they know nothing of heads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

Domains = str | Sequence[str | None] | None  # one domain for every row, or one per row; None: the training domain


def class_shares(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's share of ``labels`` (class indices): a class mix, such as the training data's."""
    return np.bincount(np.asarray(labels, np.int64), minlength=n_classes)[:n_classes] / max(len(labels), 1)


def per_row(domains: Domains, n: int) -> list[str | None]:
    return [domains] * n if domains is None or isinstance(domains, str) else list(domains)


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero): cosine similarity is then a dot product."""
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def prototype_proba(embeddings: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_classes: int,
                    temperature: float = 0.1) -> np.ndarray:
    """Class probabilities of ``queries``: a softmax over the cosine similarity to each class's mean
    direction among ``embeddings`` (labelled with class indices ``labels``), divided by
    ``temperature``. A class absent from ``labels`` gets no probability."""
    embeddings, queries, labels = unit_rows(embeddings), unit_rows(queries), np.asarray(labels)
    present = np.array([np.any(labels == c) for c in range(n_classes)])
    centres = unit_rows(np.stack([embeddings[labels == c].mean(0) if present[c] else np.zeros(embeddings.shape[1])
                             for c in range(n_classes)]))
    logits = np.where(present, queries @ centres.T / temperature, -np.inf)
    scores = np.exp(logits - logits.max(1, keepdims=True))
    return scores / scores.sum(1, keepdims=True)


class DomainMemory(BaseEstimator):
    """Each named domain's labelled embeddings (``min_items`` at least), which answer that domain's
    requests, blended in with ``weight`` (0: the head alone; 1: the memory alone).

    How the memory answers is its ``kind``: ``"logistic"``, a logistic regression (L2, ``C``) fitted
    on the domain's items alone, each feature standardised on them first (so that one ``C`` suits
    the 64-d embedding and the backbone's wider stage features alike); or ``"prototype"``, a softmax over the cosine similarity to each
    class's mean direction (``temperature``). A domain's own classifier is free of the training
    domain: the head that answers every request must keep FER2013 (its adapter refits on the
    feedback beside a replay of the training data, ten times as many items), this one answers only
    requests naming its domain.
    """

    KINDS = ("logistic", "prototype")
    kind, C = "prototype", 1.0  # a memory registered before kinds existed answered by prototypes

    def __init__(self, weight: float = 0.5, temperature: float = 0.1, min_items: int = 10, kind: str = "logistic", C: float = 1.0):
        self.weight = weight
        self.temperature = temperature
        self.min_items = min_items
        self.kind = kind
        self.C = C

    def fit(self, X: np.ndarray, y: np.ndarray, domains: Domains) -> DomainMemory:
        """``X``: embeddings of the feedback; ``y``: their class indices; ``domains``: each item's domain."""
        if self.kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {self.kind!r}")
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        named = np.array(per_row(domains, len(y)), dtype=object)
        self.memory_ = {d: (X[named == d], y[named == d]) for d in sorted({d for d in named if d})
                        if np.sum(named == d) >= self.min_items}
        self.n_features_in_ = X.shape[1]
        self.classifiers_ = {d: self._classifier(*xy) for d, xy in self.memory_.items()} if self.kind == "logistic" else {}
        return self

    def _classifier(self, X: np.ndarray, y: np.ndarray) -> Pipeline | int:
        """The domain's logistic regression, or its one class where its items name only one."""
        if len(np.unique(y)) < 2:
            return int(y[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=2000)).fit(X, y)

    def recall(self, domain: str, X: np.ndarray, n_classes: int) -> np.ndarray:
        """The memory's own answer for ``X`` from ``domain`` (a remembered one): probabilities over ``n_classes``."""
        if self.kind == "prototype":  # also every memory registered before kinds existed (the class attribute)
            memory_x, memory_y = self.memory_[domain]
            return prototype_proba(memory_x, memory_y, X, n_classes, self.temperature)
        classifier, out = self.classifiers_[domain], np.zeros((len(X), n_classes))
        if isinstance(classifier, int):
            out[:, classifier] = 1.0
        else:  # a class the domain's items never named gets no probability
            out[:, classifier.classes_] = classifier.predict_proba(np.asarray(X, np.float32))
        return out

    def blend(self, proba: np.ndarray, X: np.ndarray, domains: Domains) -> np.ndarray:
        """``proba`` with each row of a remembered domain blended with the memory's answer; other rows
        unchanged, as are all where ``X`` is not what the memory learned from (rows of another width)."""
        rows = np.array(per_row(domains, len(proba)), dtype=object)
        out = np.array(proba, np.float64)
        if np.shape(X)[1] != getattr(self, "n_features_in_", np.shape(X)[1]):
            return out
        for domain in self.memory_:
            mine = rows == domain
            if mine.any():
                out[mine] = self._mix(out[mine], self.recall(domain, np.asarray(X)[mine], out.shape[1]))
        return out

    def _mix(self, proba: np.ndarray, memory: np.ndarray) -> np.ndarray:
        """The head's answer ``proba`` mixed with the memory's ``memory`` (rows of one domain): linearly, at ``weight``."""
        return (1 - self.weight) * proba + self.weight * memory


class DomainPriors(BaseEstimator):
    """``min_items`` labelled items name a domain before its mix is used (add-one smoothed)."""

    def __init__(self, training_prior: Sequence[float] | None = None, min_items: int = 10):
        self.training_prior = training_prior
        self.min_items = min_items

    def fit(self, y: np.ndarray, domains: Domains) -> DomainPriors:
        """``y``: class indices of the feedback; ``domains``: the domain each item came from."""
        prior = np.asarray(self.training_prior, np.float64)
        k, y, named = len(prior), np.asarray(y, np.int64), np.array(per_row(domains, len(y)), dtype=object)
        self.ratios_ = {}
        for domain in sorted({d for d in named if d}):
            counts = np.bincount(y[named == domain], minlength=k)[:k]
            if counts.sum() >= self.min_items:
                self.ratios_[domain] = (counts + 1) / (counts.sum() + k) / np.maximum(prior, 1e-6)
        return self

    def adjust(self, proba: np.ndarray, domains: Domains) -> np.ndarray:
        """``proba`` with each row of a learned domain moved to that domain's class mix; other rows unchanged."""
        rows = per_row(domains, len(proba))
        if not any(d in self.ratios_ for d in rows):
            return proba
        out = np.array(proba, np.float64)
        for i, d in enumerate(rows):
            if d in self.ratios_:
                out[i] *= self.ratios_[d]
                out[i] /= out[i].sum()
        return out
