"""Each named domain's class mix: a correction for requests from the domain the feedback came from.

Feedback from a new domain (infants, for a model trained on FER2013) brings a class mix of its
own: FER2013 has 1.5% disgust, the infant photos 13%. Moving a head's probabilities from the
training prior to the domain's (``p * domain_prior / training_prior``, renormalised) is the
classic correction for such a label shift. Applied to every request it also moves the training
domain's answers (FER2013 -6 points, bench/feature_adaptation.py), and learned from the
embeddings the domain is told apart too poorly to help (AUC 0.85: +0.5 points at -1.0 on
FER2013, same bench). So the client names the domain (``domain`` on /predict and /feedback):
feedback so named teaches its domain's mix, and only requests naming it are moved.

An sklearn-style estimator (``fit``; learned state ends in ``_``); it knows nothing of heads.
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
