"""Heads behind one protocol: the MLP head and the feedback head (fit, partial_fit, predict_proba)."""

from __future__ import annotations

import numpy as np
import pytest
import skops.io

from heads import HEADS, Head, configure_online, create_head, trusted_types
from heads.feedback import FeedbackHead
from heads.mlp import MLPHead
from infantino.embeddings import EmbeddingSet
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


def test_the_mlp_head_can_stop_on_a_share_of_its_own_training_data_and_still_learns_online():
    x, _ = blobs(400)  # a tenth of each class is 40 items: enough to stop on
    noise = np.random.default_rng(0).integers(0, 3, len(x))  # nothing to learn: only memorising would fit it
    converged = create_head("mlp").fit(x, noise)
    stopped = create_head("mlp", validation_fraction=0.1).fit(x, noise)
    assert converged.mlp_.n_iter_ == 200 and stopped.mlp_.n_iter_ < 50 and len(stopped.mlp_.validation_scores_) == stopped.mlp_.n_iter_
    assert stopped.predict_proba(x).max(1).mean() < converged.predict_proba(x).max(1).mean()  # less overconfident
    stopped.partial_fit(x[:10], noise[:10])  # online updates continue the early-stopped MLP
    few = create_head("mlp", validation_fraction=0.1).fit(*blobs(5))  # too few to hold any out: fitted as before
    assert few.mlp_.validation_scores_ is None


def test_an_mlp_head_made_from_a_linear_classifier_answers_as_it_and_learns_online(tmp_path):
    x, y = blobs(40)
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((3, 64)), rng.standard_normal(3)
    scores = x @ weight.T + bias
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    head = MLPHead.from_linear(weight, bias)
    assert isinstance(head, Head) and list(head.classes_) == [0, 1, 2]
    np.testing.assert_allclose(head.predict_proba(x), expected, atol=1e-5)
    head.partial_fit(x, y)  # online learning moves it from there, toward the labels
    assert np.mean(head.predict(x) == y) > np.mean(expected.argmax(1) == y)
    skops.io.dump(head, tmp_path / "head.skops")
    loaded = skops.io.load(tmp_path / "head.skops", trusted=trusted_types())
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x))
    with pytest.raises(ValueError, match="at least 6 units"):
        MLPHead.from_linear(weight, bias, hidden_layer_sizes=(4,))


def test_the_adapter_learns_the_replay_from_its_labels_or_from_the_base_heads_answers():
    x, _ = blobs(100)
    rng = np.random.default_rng(1)
    base = MLPHead.from_linear(rng.standard_normal((3, 64)), np.zeros(3))  # a base that disagrees with the labels
    labels = rng.integers(0, 3, len(x))
    agreement = {}
    for targets in ("labels", "base"):
        head = FeedbackHead.around(base, EmbeddingSet(x, labels), replay_targets=targets, replay_size=len(x))
        head.partial_fit(x[:1], labels[:1])  # one correction: the adapter now answers
        agreement[targets] = np.mean(head.predict(x) == base.predict(x))
    assert agreement["base"] > 0.9 > agreement["labels"] + 0.3
    with pytest.raises(ValueError, match="replay_targets must be labels or base"):
        FeedbackHead.around(base, EmbeddingSet(x, labels), replay_targets="soft").partial_fit(x[:1], labels[:1])


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


def test_feedback_naming_a_domain_moves_only_that_domains_answers(tmp_path):
    """A domain's feedback with its own class mix (class 0 rare in training, common there) teaches
    the head that mix for requests naming the domain; requests naming none are answered as before."""
    x, y = blobs(100, seed=1)
    keep = (y != 0) | (np.arange(len(y)) % 10 == 0)  # class 0 is 10% as common in the training data
    head = create_head("feedback", replay_size=150, domain_priors=True).fit(x[keep], y[keep])
    new_x = np.random.default_rng(2).standard_normal((120, 64)).astype(np.float32)  # between the classes: unsure answers
    new_y = np.zeros(len(new_x), int)  # the new domain: mostly class 0
    new_y[::4] = 1
    base = head.predict_proba(new_x)
    head.learn_domains(new_y[:60], "infant")  # the domain's mix alone, as after a backbone adaptation
    np.testing.assert_allclose(head.predict_proba(new_x), base)  # no domain named: unchanged
    assert np.mean(head.predict_proba(new_x, "infant").argmax(1) == 0) > np.mean(base.argmax(1) == 0) + 0.2
    head.partial_fit(new_x[:60], new_y[:60], domains="infant")  # the items too: the adapter learns them as well
    before, shifted = head.predict_proba(new_x), head.predict_proba(new_x, "infant")
    np.testing.assert_allclose(head.predict_proba(new_x, "nicu"), before)  # a domain it was not taught: unchanged
    assert np.mean(shifted.argmax(1) == 0) > np.mean(before.argmax(1) == 0) + 0.05 and np.allclose(shifted.sum(1), 1)
    per_row = head.predict_proba(new_x[:4], ["infant", None, "infant", None])
    # A 4-row batch and a 60-row one may round differently in float32 (BLAS blocks by batch size).
    np.testing.assert_allclose(per_row[1::2], before[1:4:2], atol=1e-6)
    np.testing.assert_allclose(per_row[::2], shifted[:4:2], atol=1e-6)
    skops.io.dump(head, tmp_path / "head.skops")
    loaded = skops.io.load(tmp_path / "head.skops", trusted=trusted_types())
    np.testing.assert_allclose(loaded.predict_proba(new_x, "infant"), shifted)
    # The mix needs enough items to be learned: a domain named by few is left alone.
    head.partial_fit(new_x[60:63], new_y[60:63], domains="few")
    np.testing.assert_allclose(head.predict_proba(new_x, "few"), head.predict_proba(new_x))
    # The deployment's switch (INFANTINO_UPDATE_DOMAIN_PRIORS, off by default): domains are remembered, not used
    # (the domain memory, on by default, off here too).
    off = configure_online(create_head("feedback", replay_size=150, domain_priors=True).fit(x, y), OnlineSettings(update_domain_memory=0))
    off.partial_fit(new_x[:60], new_y[:60], domains="infant")
    np.testing.assert_allclose(off.predict_proba(new_x, "infant"), off.predict_proba(new_x))


def test_a_domains_own_classifier_beats_the_head_there_and_handles_a_domain_of_one_class():
    """The logistic memory (the default) answers a domain the base never saw better than the head does,
    gives no probability to a class the domain never named, and a domain whose feedback names one
    class answers it; a memory stored before kinds existed (no ``kind``) answers by prototypes."""
    from heads.domain import DomainMemory

    x, y = blobs(100, seed=1)
    new_x, new_y = blobs(30, domain=0, seed=2)
    new_y = (new_y + 1) % 3  # where the training data's class k lies, this domain's class k+1 does: the replay outvotes it
    head = configure_online(create_head("feedback", replay_size=150).fit(x, y), OnlineSettings())
    assert (head.domain_memory, head.domain_memory_kind, head.domain_memory_features) == (0.85, "logistic", "stages")  # the defaults
    head.partial_fit(new_x[::2], new_y[::2], domains="infant")
    held, truth = new_x[1::2], new_y[1::2]
    assert np.mean(head.predict(held, "infant") == truth) > np.mean(head.predict(held) == truth) + 0.2
    memory = DomainMemory(weight=1.0).fit(new_x[new_y != 0], new_y[new_y != 0], "ward")
    answer = memory.blend(np.full((5, 4), 0.25), new_x[:5], "ward")
    assert np.allclose(answer.sum(1), 1) and np.all(answer[:, 0] == 0)
    single = DomainMemory(weight=1.0).fit(new_x[new_y == 2], new_y[new_y == 2], "ward")
    np.testing.assert_allclose(single.blend(np.full((3, 4), 0.25), new_x[:3], "ward")[:, 2], 1.0)
    old = DomainMemory(weight=1.0, kind="prototype").fit(new_x, new_y, "ward")
    del old.__dict__["kind"], old.__dict__["classifiers_"]  # as a memory registered on 2026-12-05 loads
    np.testing.assert_allclose(old.blend(np.full((4, 4), 0.25), new_x[:4], "ward"),
                               DomainMemory(weight=1.0, kind="prototype").fit(new_x, new_y, "ward").blend(np.full((4, 4), 0.25), new_x[:4], "ward"))


@pytest.mark.parametrize("kind", ["logistic", "prototype"])
def test_feedback_naming_a_domain_is_remembered_and_recalled_only_for_that_domain(tmp_path, kind):
    """Each named domain's feedback embeddings answer that domain's requests (by a logistic regression
    of the domain's own, or as class prototypes), blended with the head (INFANTINO_UPDATE_DOMAIN_MEMORY,
    _KIND); other requests are answered by the head alone, and 0 turns it off."""
    x, y = blobs(100, seed=1)
    new_x, new_y = blobs(30, domain=1, seed=2)  # the same classes elsewhere: a domain the base never saw
    head = configure_online(create_head("feedback", replay_size=150).fit(x, y),
                            OnlineSettings(update_domain_memory=0.5, update_domain_memory_kind=kind, update_domain_memory_c=1.0))
    assert head.domain_memory == 0.5 and head.domain_memory_kind == kind
    base = head.predict_proba(new_x)
    head.learn_domains(new_y[::2], "infant", new_x[::2])  # the domain's memory alone, as after a backbone adaptation
    np.testing.assert_allclose(head.predict_proba(new_x), base)  # no domain named: unchanged
    np.testing.assert_allclose(head.predict_proba(new_x, "nicu"), base)  # a domain it was not taught: unchanged
    recalled = head.predict_proba(new_x[1::2], "infant")
    assert np.allclose(recalled.sum(1), 1)
    assert np.mean(recalled.argmax(1) == new_y[1::2]) > np.mean(base[1::2].argmax(1) == new_y[1::2]) + 0.2
    per_row = head.predict_proba(new_x[:4], ["infant", None, "infant", None])
    np.testing.assert_allclose(per_row[1::2], base[1:4:2], atol=1e-6)  # float32: batch sizes round differently
    np.testing.assert_allclose(per_row[::2], head.predict_proba(new_x[:4:2], "infant"), atol=1e-6)
    # Taught online, the memory is every item of the domain so far; it round-trips with the head.
    head.partial_fit(new_x[:20], new_y[:20], domains="infant").partial_fit(new_x[20:40], new_y[20:40], domains="infant")
    remembered, labels = head.domain_memory_.memory_["infant"]
    assert len(remembered) == 40 and sorted(labels) == sorted(new_y[:40])
    assert head.domain_memory_.kind == kind and (kind == "prototype") == (not head.domain_memory_.classifiers_)
    skops.io.dump(head, tmp_path / "head.skops")
    loaded = skops.io.load(tmp_path / "head.skops", trusted=trusted_types())
    np.testing.assert_allclose(loaded.predict_proba(new_x, "infant"), head.predict_proba(new_x, "infant"))
    # A domain named by too few items is not remembered; weight 0 remembers nothing.
    head.partial_fit(new_x[40:43], new_y[40:43], domains="few")
    np.testing.assert_allclose(head.predict_proba(new_x, "few"), head.predict_proba(new_x))
    off = configure_online(create_head("feedback", replay_size=150).fit(x, y), OnlineSettings(update_domain_memory=0))
    off.partial_fit(new_x[:40], new_y[:40], domains="infant")
    assert off.domain_memory_ is None
    np.testing.assert_allclose(off.predict_proba(new_x, "infant"), off.predict_proba(new_x))


def test_the_domain_memory_reads_the_stage_features_that_follow_the_embedding(tmp_path):
    """Served rows are the embedding, then the backbone's stage features (backbones/model.py). The head's
    classifier reads the embedding alone; a domain's memory reads the stage features (the default), so
    a domain told apart only there is learned there, and not from the embedding (``embedding``).
    Rows without stage features get the head's answer; every head type reads served rows."""
    x, y = blobs(100, seed=1)
    noise = np.random.default_rng(3).standard_normal((90, 64)).astype(np.float32)  # the embedding says nothing of the domain's classes
    stage_x, stage_y = blobs(30, domain=2, seed=4, dim=32)  # the stage features do
    rows = np.hstack([noise, stage_x])
    settings = OnlineSettings(update_domain_memory=1.0, update_domain_memory_c=1.0)
    head = configure_online(create_head("feedback", replay_size=150).fit(x, y), settings)
    assert head.domain_memory_features == "stages"
    head.partial_fit(rows[::2], stage_y[::2], domains="infant")
    held, truth = rows[1::2], stage_y[1::2]
    assert np.mean(head.predict(held, "infant") == truth) > 0.9
    np.testing.assert_allclose(head.predict_proba(held), head.predict_proba(held[:, :64]))  # no domain: the embedding alone
    np.testing.assert_allclose(head.predict_proba(held[:, :64], "infant"), head.predict_proba(held[:, :64]))  # no stage features: the head
    skops.io.dump(head, tmp_path / "head.skops")
    loaded = skops.io.load(tmp_path / "head.skops", trusted=trusted_types())
    np.testing.assert_allclose(loaded.predict_proba(held, "infant"), head.predict_proba(held, "infant"))
    on_embedding = configure_online(create_head("feedback", replay_size=150).fit(x, y),
                                    settings.model_copy(update={"update_domain_memory_features": "embedding"}))
    on_embedding.partial_fit(rows[::2], stage_y[::2], domains="infant")
    assert np.mean(on_embedding.predict(held, "infant") == truth) < 0.6
    mlp = create_head("mlp").fit(x, y)
    np.testing.assert_allclose(mlp.predict_proba(np.hstack([x[:5], stage_x[:5]])), mlp.predict_proba(x[:5]))
