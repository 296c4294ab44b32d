"""Each named domain's class mix: a correction for requests from the domain the feedback came from.

Feedback from a new domain (infants, for a model trained on FER2013) brings a class mix of its
own: FER2013 has 1.5% disgust, the infant photos 13%. Moving a head's probabilities from the
training prior to the domain's (``p * domain_prior / training_prior``, renormalised) is the
classic correction for such a label shift. Applied to every request it also moves the training
domain's answers (FER2013 -6 points, bench/feature_adaptation.py), and learned from the
embeddings the domain is told apart too poorly to help (AUC 0.85: +0.5 points at -1.0 on
FER2013, same bench). So the client names the domain (``domain`` on /predict and /feedback):
feedback so named teaches its domain's mix, and only requests naming it are moved.

``DomainMemory`` keeps, for each named domain, its feedback's embeddings as class prototypes (each
class's mean direction) and blends the prototypes' answer with the head's for requests naming it
(issue 11's "memory of feedback embeddings blended with the head"). On the infant feedback half
(bench/feature_adaptation.py, ``memory`` rows, 4-fold CV) it added +3.9 points to the adapted
backbone's classifier (interpolated 0.7: 54.0% -> 57.9%) at no FER2013 cost, since FER2013 requests
name no domain; on the plain shipped model -1.3 to +0.4.

Sklearn-style estimators (``fit``; learned state ends in ``_``); they know nothing of heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator

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
    """Each named domain's labelled embeddings (``min_items`` at least), whose class prototypes
    answer that domain's requests, blended in with ``weight`` (0: the head alone; 1: prototypes alone)."""

    def __init__(self, weight: float = 0.5, temperature: float = 0.1, min_items: int = 10):
        self.weight = weight
        self.temperature = temperature
        self.min_items = min_items

    def fit(self, X: np.ndarray, y: np.ndarray, domains: Domains) -> DomainMemory:
        """``X``: embeddings of the feedback; ``y``: their class indices; ``domains``: each item's domain."""
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        named = np.array(per_row(domains, len(y)), dtype=object)
        self.memory_ = {d: (X[named == d], y[named == d]) for d in sorted({d for d in named if d})
                        if np.sum(named == d) >= self.min_items}
        return self

    def blend(self, proba: np.ndarray, X: np.ndarray, domains: Domains) -> np.ndarray:
        """``proba`` with each row of a remembered domain blended with its prototypes' answer; other rows unchanged."""
        rows = np.array(per_row(domains, len(proba)), dtype=object)
        out = np.array(proba, np.float64)
        for domain, (memory_x, memory_y) in self.memory_.items():
            mine = rows == domain
            if mine.any():
                recalled = prototype_proba(memory_x, memory_y, np.asarray(X)[mine], out.shape[1], self.temperature)
                out[mine] = (1 - self.weight) * out[mine] + self.weight * recalled
        return out


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
