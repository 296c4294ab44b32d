"""Backbone adaptation from stored feedback images: gated, registered as a pair with lineage, rolled back as one."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adaptation.backbone import (
    AdaptationError,
    adapt_from_feedback,
    choose_interpolation,
)
from backbones.inference import embed_images
from backbones.model import create_backbone
from cli.main import main as cli
from infantino.images import Preprocessing, open_image, to_model_array
from infantino.settings import Settings
from registry.store import CHALLENGER, CHAMPION
from store import Stores
from testkit.faces import TINY_CLASSES, faces
from testkit.registry import train_tiny_registry
from training.adapt import (
    AdaptConfig,
    average_weights,
    classifier_proba,
    fine_tune,
    interpolate,
)
from training.data import load_dataset

QUICK = AdaptConfig(part="all", epochs=2, replay_size=24, batch_size=8)


def test_interpolation_runs_from_the_original_to_the_fine_tune_and_the_largest_safe_weight_is_chosen():
    torch.manual_seed(0)
    original, tuned = create_backbone("resnet10t", n_classes=3), create_backbone("resnet10t", n_classes=3)
    x = torch.rand(2, 3, 48, 48)
    for model in (original, tuned):
        model.eval()
    with torch.no_grad():
        assert torch.allclose(interpolate(original, tuned, 1.0)(x), tuned(x), atol=1e-5)
        assert torch.allclose(interpolate(original, tuned, 1e-9)(x), original(x), atol=1e-4)
        half = interpolate(original, tuned, 0.5).state_dict()
        key = "classifier.weight"
        assert torch.allclose(half[key], (original.state_dict()[key] + tuned.state_dict()[key]) / 2)
        # a soup of two is their midpoint, statistics included
        soup = average_weights([original, tuned])
        assert torch.allclose(soup(x), interpolate(original, tuned, 0.5)(x), atol=1e-5)
    assert not torch.equal(original.state_dict()[key], half[key])  # the original is not changed

    # An old-domain accuracy that falls as the weight moves toward the fine-tune: of 10,000 faces
    # the reference gets the first 8,000 right, a weight-w model loses the last 400 * w of them.
    reference = np.arange(10_000) < 8_000

    def right_of(model):
        w = float((model.state_dict()[key] - original.state_dict()[key]).norm()
                  / (tuned.state_dict()[key] - original.state_dict()[key]).norm())
        return np.arange(10_000) < 8_000 - round(400 * w)

    quiet = lambda *a, **k: None
    point = AdaptConfig(interpolation_grid=(0.25, 1.0, 0.5, 0.75), choice_z=0)  # drops 1, 2, 3, 4 points
    assert choose_interpolation(original, tuned, point, reference, 0.021, right_of, quiet) == 0.5
    assert choose_interpolation(original, tuned, point, reference, 0.05, right_of, quiet) == 1.0
    assert choose_interpolation(original, tuned, point, reference, 0.001, right_of, quiet) == 0.25  # none safe: the least
    # With confidence: weight 0.5's drop (2 points, standard error 0.14) is within 2.1 at z=0 but
    # not at z=1.645; 0.25's (1 point, 0.10) is.
    assert choose_interpolation(original, tuned, AdaptConfig(interpolation_grid=(0.25, 1.0, 0.5, 0.75)), reference, 0.021,
                                right_of, quiet) == 0.25
    with pytest.raises(ValueError, match="choice_z"):
        AdaptConfig(choice_z=-1)
    with pytest.raises(ValueError, match="interpolation_grid"):
        AdaptConfig(interpolation_grid=(0.0, 1.0))
    with pytest.raises(ValueError, match="soup"):
        AdaptConfig(soup=0)


def test_the_fine_tune_moves_batchnorm_statistics_unless_they_are_kept_as_trained():
    torch.manual_seed(0)
    model, prep = create_backbone("resnet10t", n_classes=3), Preprocessing(input_size=32)
    rng = np.random.default_rng(0)
    x, replay_x = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (8, 8))
    y, replay_y = rng.integers(0, 3, 8), rng.integers(0, 3, 8)
    stats = lambda m: torch.cat([b for name, b in m.state_dict().items() if name.endswith("running_mean")])
    weights = lambda m: torch.cat([p.flatten() for name, p in m.state_dict().items() if name.endswith("conv1.weight")])
    cfg = AdaptConfig(part="all", epochs=2, lr=1e-2, batch_size=8)
    moved, kept = (fine_tune(model, x, y, replay_x, replay_y, prep, replace(cfg, freeze_norm_stats=f)) for f in (False, True))
    assert not torch.allclose(stats(moved), stats(model))
    assert torch.equal(stats(kept), stats(model))
    assert not torch.allclose(weights(kept), weights(model))  # the weights learn either way


def store_feedback(registry, database_url: str, n_per_class: int, domain: str | None = None):
    stores = Stores.open(database_url)
    old = registry.load_backbone("1")
    prep = old.preprocessing
    for img, label in faces(n_per_class, seed=9, shifted=True):
        x = to_model_array(open_image(img), prep.input_size, prep.grayscale)[None]
        stores.feedback.add(task="expression", label=label, embedding=embed_images(old.model, x, prep)[0], backbone_version="1", image=img,
                            domain=domain)
    return stores


def training_data(registry):
    prep = registry.load_backbone("1").preprocessing
    return load_dataset(registry.version_info("backbone", "1").tags["data"], prep.input_size, prep.grayscale, list(TINY_CLASSES))


@pytest.mark.slow
def test_a_passed_adaptation_is_a_new_backbone_and_head_champion_and_rollback_restores_both(infantino_home):
    registry = train_tiny_registry(infantino_home, epochs=3)
    settings = Settings(home=infantino_home, gate_min_items=6, gate_alpha=1.0, gate_worse_alpha=1e-9, gate_max_val_drop=1.0)
    stores = store_feedback(registry, settings.storage.database_url, 4, domain="ward")

    report = adapt_from_feedback(registry, stores.feedback, settings.online, training_data(registry), QUICK, val_fraction=0.25)

    assert report.promoted, report.verdict
    head = registry.load_head(CHAMPION)
    assert (head.version, head.backbone_version) == (report.head_version, report.backbone_version) == ("2", "2")
    assert registry.champion_version("backbone") == "2"
    assert head.tags["origin"] == "feedback_adaptation" and head.tags["parent_version"] == "1"
    assert head.tags["parent_backbone_version"] == "1" and head.tags["feedback_items"] == "12"
    backbone = registry.load_backbone("2")
    assert backbone.tags["origin"] == "feedback_adaptation" and backbone.preprocessing == registry.load_backbone("1").preprocessing
    # The served pair answers with the fine-tuned classifier: the registered head on the new backbone's embedding.
    img = faces(1, seed=3)[0][0]
    x = to_model_array(open_image(img), backbone.preprocessing.input_size, backbone.preprocessing.grayscale)[None]
    emb = embed_images(backbone.model, x, backbone.preprocessing)
    expected = classifier_proba(backbone.model, emb)
    np.testing.assert_allclose(head.model.predict_proba(emb), expected, atol=1e-5)
    # The ward's feedback is remembered in the new backbone's stage features (heads/domain.py, on by default): its
    # requests are blended with the ward's own classifier; requests naming no domain are the classifier's alone.
    stored = np.stack([to_model_array(open_image(i.image), backbone.preprocessing.input_size, backbone.preprocessing.grayscale)
                       for i in stores.feedback.items("expression")])
    remembered, _ = head.model.domain_memory_.memory_["ward"]
    stage_features = embed_images(backbone.model, stored, backbone.preprocessing, stage_features=True)[:, 64:]  # what the memory reads
    np.testing.assert_allclose(np.sort(remembered, 0), np.sort(stage_features, 0), atol=1e-4)
    served = embed_images(backbone.model, x, backbone.preprocessing, stage_features=True)  # a request's served row
    np.testing.assert_allclose(head.model.predict_proba(served), expected, atol=1e-5)
    assert not np.allclose(head.model.predict_proba(served, "ward"), expected, atol=1e-3)
    np.testing.assert_allclose(head.model.predict_proba(emb, "ward"), expected, atol=1e-5)  # a row without stage features: the head alone
    # The gate's old-domain check is stored with the head, in the new embedding, for later online updates.
    _, validation = registry.load_embeddings(head)
    assert validation.x.shape[1] == 64 and len(validation) > 0

    assert registry.rollback("head") == "1"
    assert registry.champion_version("backbone") == "1"


@pytest.mark.slow
def test_a_refused_adaptation_is_a_challenger_with_its_reason_and_the_champion_stays(infantino_home):
    registry = train_tiny_registry(infantino_home, epochs=3)
    settings = Settings(home=infantino_home, gate_min_items=6, gate_alpha=1e-9)  # no gain is that certain
    stores = store_feedback(registry, settings.storage.database_url, 4)

    report = adapt_from_feedback(registry, stores.feedback, settings.online, training_data(registry), QUICK, val_fraction=0.25)

    assert not report.promoted and report.gate_codes
    assert registry.champion_version("head") == "1" and registry.champion_version("backbone") == "1"
    assert registry.champion_version("head", CHALLENGER) == report.head_version
    assert registry.load_head(report.head_version).tags["gate_reason"] == report.verdict


@pytest.mark.slow
def test_the_cli_runs_the_adaptation_and_refuses_too_little_feedback_clearly(infantino_home):
    registry = train_tiny_registry(infantino_home, epochs=3)
    settings = Settings(home=infantino_home)
    store_feedback(registry, settings.storage.database_url, 1)  # 3 items < gate_min_items (20)
    with pytest.raises(AdaptationError, match="at least 20 feedback items"):
        adapt_from_feedback(registry, Stores.open(settings.storage.database_url).feedback, settings.online, training_data(registry), QUICK)
    result = CliRunner().invoke(cli, ["adapt", "--part", "all", "--epochs", "1"])
    assert result.exit_code != 0 and "at least 20 feedback items" in result.output

    store_feedback(registry, settings.storage.database_url, 6)  # now 21
    result = CliRunner().invoke(cli, ["adapt", "--part", "all", "--epochs", "1", "--replay", "16", "--distill", "1", "--soup", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the progress goes to stderr
    assert report["feedback_items"] == 21 and report["backbone_version"] == "2"
    info = registry.version_info("head", report["head_version"])
    assert info.tags["origin"] == "feedback_adaptation"
    # the weight served is reported, and is the one tagged on the version
    assert report["interpolation_weight"] in AdaptConfig().interpolation_grid
    assert float(info.tags["interpolation_weight"]) == report["interpolation_weight"]
    # the options given reach the fine-tune; those left out are AdaptConfig's defaults (one place for them)
    run = registry.client.search_runs([registry.experiment_id()], "tags.kind = 'feedback_adaptation'")[0]
    assert run.data.params["adapt_epochs"] == "1" and run.data.params["adapt_replay_size"] == "16" and run.data.params["adapt_soup"] == "2"
    assert run.data.params["adapt_lr"] == str(AdaptConfig().lr) and run.data.params["adapt_feedback_weight"] == str(AdaptConfig().feedback_weight)

    # A scheduled run with nothing new returns at once, and says so; --force redoes it.
    again = CliRunner().invoke(cli, ["adapt", "--part", "all", "--epochs", "1", "--replay", "16"])
    assert again.exit_code == 0 and "already adapted from these 21 feedback items" in json.loads(again.stdout)["skipped"]
    assert registry.champion_version("head", CHALLENGER if not report["promoted"] else CHAMPION) == report["head_version"]
    forced = CliRunner().invoke(cli, ["adapt", "--part", "all", "--epochs", "1", "--replay", "16", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["head_version"] != report["head_version"]
