"""Heads behind one protocol: the MLP head and the feedback head (fit, partial_fit, predict_proba)."""

from __future__ import annotations

import numpy as np
import pytest
import skops.io

from heads import HEADS, Head, configure_online, create_head, trusted_types
from infantino.settings import OnlineSettings


def blobs(n_per_class: int, domain: int = 0, seed: int = 0, dim: int = 64):
    """Three Gaussian classes in 64-d; each ``domain`` puts the classes somewhere else."""
    centres = np.random.default_rng(100 + domain).standard_normal((3, dim)) * 3
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.standard_normal((n_per_class, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(3), n_per_class)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_type_keeps_the_protocol_and_round_trips_through_skops(kind, tmp_path):
    x, y = blobs(40)
    head = create_head(kind).fit(x, y, classes=np.arange(4))  # a class never seen is still known
    assert isinstance(head, Head) and list(head.classes_) == [0, 1, 2, 3] and head.n_features_in_ == 64
    assert head.predict_proba(x[:5]).shape == (5, 4) and np.mean(head.predict(x) == y) > 0.9
    head.partial_fit(x[:10], y[:10])
    skops.io.dump(head, tmp_path / "head.skops")
    loaded = skops.io.load(tmp_path / "head.skops", trusted=trusted_types())
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x))


def test_the_feedback_head_learns_a_new_domain_and_is_order_free():
    x, y = blobs(100, seed=1)
    head = create_head("feedback", replay_size=150).fit(x, y)
    new_x, new_y = blobs(30, domain=1, seed=2)  # the same classes, moved: a domain the base never saw
    before = np.mean(head.predict(new_x) == new_y)
    taught = configure_online(create_head("feedback", replay_size=150).fit(x, y), OnlineSettings(update_feedback_weight=5.0))
    taught.partial_fit(new_x[::2], new_y[::2])
    after = np.mean(taught.predict(new_x[1::2]) == new_y[1::2])
    assert taught.feedback_seen_ == 45 and taught.feedback_weight == 5.0
    assert after > before + 0.2, (before, after)
    assert np.mean(taught.predict(x) == y) > 0.9  # the old domain is kept (replay)
    # In two batches, in another order: the same head.
    other = create_head("feedback", replay_size=150).fit(x, y)
    other.partial_fit(new_x[::2][20:], new_y[::2][20:]).partial_fit(new_x[::2][:20], new_y[::2][:20])
    np.testing.assert_allclose(np.sort(other.feedback_y_), np.sort(taught.feedback_y_))
    np.testing.assert_allclose(other.predict_proba(new_x), taught.predict_proba(new_x), atol=1e-4)


def test_unknown_head_type():
    with pytest.raises(ValueError, match="accepted"):
        create_head("forest")
