"""Classifier heads on the backbone's 64-d embeddings, behind one protocol.

A head is a scikit-learn style estimator: ``fit`` offline, ``partial_fit`` online,
``predict_proba``; learned state ends in ``_`` (``classes_``, ``n_features_in_``). A new head
type is one file here plus one line in ``HEADS``; nothing outside this package knows an
MLP's internals.
"""

from __future__ import annotations

import inspect
import sys
from typing import Protocol, runtime_checkable

import numpy as np

# Heads are stored with skops, which asks scikit-learn for all its estimators when first
# imported; scikit-learn 1.9 finds them by importing every sub-package, including its array-API
# shim for torch, which imports torch although no head ever touches a tensor. In a serving
# process that runs the backbone on ONNX Runtime that import alone cost 7 of the first head
# load's 10 s and 630 MB of the API worker's 1.2 GB (measured here). So, unless torch is already
# loaded, the shim is marked unavailable (the walk skips a package that fails to import);
# a process that needs torch still imports it as usual.
_SKLEARN_TORCH_SHIM = "sklearn.externals.array_api_compat.torch"
if "torch" not in sys.modules:
    sys.modules.setdefault(_SKLEARN_TORCH_SHIM, None)

from heads.domain import DomainMemory
from heads.feedback import FeedbackHead
from heads.mlp import MLPHead


@runtime_checkable
class Head(Protocol):
    classes_: np.ndarray
    n_features_in_: int

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "Head": ...

    def partial_fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "Head": ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


HEADS: dict[str, type] = {"feedback": FeedbackHead, "mlp": MLPHead}
DEFAULT_HEAD = "feedback"

# Which online setting (infantino.settings.OnlineSettings) sets which parameter of each head type.
ONLINE_PARAMS: dict[type, dict[str, str]] = {
    FeedbackHead: {"feedback_weight": "update_feedback_weight", "domain_priors": "update_domain_priors",
                   "domain_memory": "update_domain_memory", "domain_memory_kind": "update_domain_memory_kind",
                   "domain_memory_features": "update_domain_memory_features", "domain_memory_C": "update_domain_memory_c",
                   "replay_targets": "update_replay_targets"},
    MLPHead: {"online_learning_rate": "update_learning_rate", "online_passes": "update_passes"},
}


def configure_online(head: Head, online_settings, training_prior: np.ndarray | None = None) -> Head:
    """Set the head's online-learning parameters from the deployment's settings, and the class shares
    of its training data (``training_prior``) for a head that learns the feedback's class mix but was
    registered without them."""
    params = {param: getattr(online_settings, name) for param, name in ONLINE_PARAMS.get(type(head), {}).items()}
    if training_prior is not None and "training_prior" in head.get_params(deep=False) and head.get_params(deep=False)["training_prior"] is None:
        params["training_prior"] = tuple(float(p) for p in training_prior)
    return head.set_params(**params) if params else head


def domain_memory(online_settings) -> DomainMemory:
    """A domain memory (heads/domain.py) as the deployment's online settings make the feedback head's;
    it reads ``memory_input(rows, EMBEDDING_DIM, online_settings.update_domain_memory_features)``."""
    return DomainMemory(weight=online_settings.update_domain_memory, kind=online_settings.update_domain_memory_kind,
                        C=online_settings.update_domain_memory_c)


def create_head(kind: str = DEFAULT_HEAD, **params) -> Head:
    """A new, unfitted head of ``kind`` (like ``timm.create_model`` for backbones)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; accepted: {sorted(HEADS)}")
    return HEADS[kind](**params)


def learns_domains(head: Head) -> bool:
    """Whether ``head`` takes the domain of each item (``domains=``: heads/domain.py) in partial_fit and predict_proba."""
    return "domains" in inspect.signature(head.predict_proba).parameters


def predict_proba(head: Head, X: np.ndarray, domains=None) -> np.ndarray:
    """``head``'s probabilities, for requests from ``domains`` (one, or one per row; None: the training
    domain), which only a head that learns domains tells apart."""
    return head.predict_proba(X, domains) if domains is not None and learns_domains(head) else head.predict_proba(X)


def teach(head: Head, X: np.ndarray, y: np.ndarray, domains=None) -> Head:
    """``head.partial_fit`` with the domain each item came from, where the head learns domains."""
    return head.partial_fit(X, y, domains=domains) if learns_domains(head) else head.partial_fit(X, y)


def trusted_types() -> list[str]:
    """The types skops may load in a registered head (every head type's own, and their parts)."""
    return sorted({t for cls in HEADS.values() for t in cls.TRUSTED_TYPES})
