"""Train -> register -> reload, promote and rollback, resume, and the CLI, on a tiny self-made data set.

Real MLflow (SQLite under the per-test INFANTINO_HOME), real timm ``test_efficientnet`` at 32 px.
Every test here is marked slow (seconds each); all run by default, ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from testkit.faces import TINY_CLASSES, make_image_folder
from cli.main import main
from registry.store import ModelRegistry, RegistryError
from training.data import load_dataset, stratified_split
from backbones.inference import embed_images
from training.adapt import classifier_proba
from training.augment import AUGMENTATIONS
from training.pipeline import teacher_probabilities, train_and_register
from training.trainer import TrainConfig, train_backbone

# A copy of a pre-migrated empty MLflow database per test (see conftest): same registry, no
# migration cost. The tests still reach it only through the settings (INFANTINO_HOME).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_mlflow_db")]


def tiny_config(**kw) -> TrainConfig:
    return TrainConfig(**{"backbone": "test_efficientnet", "image_size": 32, "epochs": 1, "batch_size": 16, "threads": 1, **kw})


class RecordingRegistry(ModelRegistry):
    """The real registry, keeping a reference to the in-memory models it is asked to log."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.logged: dict[str, object] = {}

    def log_backbone(self, model, *a, **kw):
        self.logged["backbone"] = model
        return super().log_backbone(model, *a, **kw)

    def log_head(self, head, *a, **kw):
        self.logged["head"] = head
        return super().log_head(head, *a, **kw)


def champions(reg: ModelRegistry) -> tuple[str | None, str | None]:
    return reg.champion_version("backbone"), reg.champion_version("head")


def aliases(reg: ModelRegistry, kind: str) -> dict[str, list[str]]:
    return {r["version"]: r["aliases"] for r in reg.list_versions(kind)}


def test_empty_registry_in_the_per_test_home(infantino_home):
    reg = ModelRegistry()
    assert reg.settings.storage.home == infantino_home
    assert reg.tracking_uri == f"sqlite:///{(infantino_home / 'mlflow.db').resolve()}"
    assert reg.names == {"backbone": "infantino-expression-backbone", "head": "infantino-expression-head"}
    assert champions(reg) == (None, None)
    assert not reg.has_champion()
    assert reg.list_versions("head") == []
    with pytest.raises(RegistryError, match="no registered model"):
        reg.rollback("head")
    with pytest.raises(RegistryError, match="has no version or alias '1'"):
        reg.promote("head", 1)
    with pytest.raises(RegistryError, match="has no version or alias 'champion'"):
        reg.load_head("champion")
    with pytest.raises(RegistryError, match="unknown model kind"):
        reg.promote("tail", 1)


def test_train_register_reload(tiny_folder):
    reg = RecordingRegistry()
    result = train_and_register(tiny_folder, tiny_config(), reg, classes=None)

    # -- two registered models, each v1 with alias champion
    assert (result.backbone_version, result.head_version) == ("1", "1")
    assert champions(reg) == ("1", "1")
    assert aliases(reg, "backbone") == {"1": ["champion"]}
    assert aliases(reg, "head") == {"1": ["champion"]}
    names = {m.name for m in reg.client.search_registered_models()}
    assert names == {"infantino-expression-backbone", "infantino-expression-head"}
    assert result.skipped == 0

    # -- run metrics and artifacts
    metrics = reg.run_metrics(result.run_id)
    expected = ["val_accuracy", "val_macro_f1", "val_ece", "val_occluded_accuracy",
                *[f"val_recall_{c}" for c in TINY_CLASSES], "skipped_images", "epoch_val_accuracy", "epoch_train_loss"]
    for key in expected:
        assert key in metrics, f"run metric {key} missing; got {sorted(metrics)}"
    for key in ("val_accuracy", "val_macro_f1", "val_ece", "val_occluded_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[key] == pytest.approx(result.metrics[key])
    assert metrics["skipped_images"] == 0
    params = reg.client.get_run(result.run_id).data.params
    assert params["backbone"] == "test_efficientnet" and params["image_size"] == "32"
    assert int(params["n_train"]) + int(params["n_val"]) == 36

    artifacts = {a.path for a in reg.client.list_artifacts(result.run_id)}
    assert {"confusion_matrix.png", "metrics.json"} <= artifacts, artifacts
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="confusion_matrix.png")
    with Image.open(local) as png:
        assert png.format == "PNG" and png.size[0] > 200
    metrics_json = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="metrics.json")).read_text())
    assert metrics_json["val_accuracy"] == pytest.approx(metrics["val_accuracy"])

    # -- version tags
    data = load_dataset(tiny_folder, 32, True, classes=None)
    bt = reg.version_info("backbone", "1").tags
    ht = reg.version_info("head", "champion").tags
    for tags in (bt, ht):
        assert tags["label_set"] == "happy,sad,surprise"
        assert tags["data_fingerprint"] == data.fingerprint()
        assert tags["parent_version"] == ""  # the first champion has no parent
        assert tags["task"] == "expression"
    assert bt["input_size"] == "32" and bt["preprocessing.grayscale"] == "True"
    assert ht["backbone_version"] == "1" and ht["origin"] == "train"
    assert ht["embeddings_run_id"] == result.run_id

    # -- reload the champion pair and compare with the in-memory models on the same images
    head = reg.load_head("champion")
    backbone = reg.load_backbone(head.backbone_version)
    assert (head.version, backbone.version) == ("1", "1")
    assert head.classes == backbone.classes == ["happy", "sad", "surprise"]
    assert backbone.preprocessing == tiny_config().preprocessing
    mem_backbone, mem_head = reg.logged["backbone"], reg.logged["head"]
    assert backbone.model is not mem_backbone and head.model is not mem_head
    emb_mem = embed_images(mem_backbone, data.x, tiny_config().preprocessing)
    emb_loaded = embed_images(backbone.model, data.x, backbone.preprocessing)
    assert emb_mem.shape == (36, 64)
    assert np.allclose(emb_mem, emb_loaded, atol=1e-5)
    p_mem, p_loaded = mem_head.predict_proba(emb_mem), head.model.predict_proba(emb_loaded)
    assert p_mem.shape == (36, 3)
    assert np.allclose(p_mem, p_loaded, atol=1e-6)
    assert np.allclose(p_loaded.sum(1), 1.0)

    # -- the stored embeddings are the in-memory backbone's, on the same fixed split
    replay, validation = reg.load_embeddings(head)
    train, val = stratified_split(data, tiny_config().val_fraction, tiny_config().seed)
    assert np.allclose(validation.x, emb_mem[_positions(data, val)], atol=1e-5)
    assert validation.y.tolist() == val.y.tolist()
    assert len(replay.y) == len(train)
    # and the logged val accuracy is what the reloaded pair scores on that split
    val_pred = head.model.predict_proba(embed_images(backbone.model, val.x, backbone.preprocessing)).argmax(1)
    assert metrics["val_accuracy"] == pytest.approx(float(np.mean(val_pred == val.y)))


def test_the_head_is_refitted_on_the_training_embeddings_or_answers_as_the_training_classifier(tiny_folder):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    for head_from, answers_as_classifier in (("refit", False), ("classifier", True)):
        reg = RecordingRegistry()
        train_and_register(tiny_folder, tiny_config(head=head_from), reg, classes=None)
        emb = embed_images(reg.logged["backbone"], data.x, tiny_config().preprocessing)
        same = np.allclose(reg.logged["head"].predict_proba(emb), classifier_proba(reg.logged["backbone"], emb), atol=1e-5)
        assert same == answers_as_classifier, head_from


def _positions(full, part) -> np.ndarray:
    """Indices in ``full`` of the images in ``part`` (the tiny faces are all distinct)."""
    flat = full.x.reshape(len(full), -1)
    return np.array([int(np.flatnonzero((flat == im.ravel()).all(1))[0]) for im in part.x])


def test_promote_and_rollback(tiny_folder):
    reg = ModelRegistry()
    first = train_and_register(tiny_folder, tiny_config(), reg, classes=None)
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback("head")

    # a second training, registered but not promoted: the champion stays
    second = train_and_register(tiny_folder, tiny_config(seed=1), reg, classes=None, promote=False)
    assert (second.backbone_version, second.head_version) == ("2", "2")
    assert champions(reg) == ("1", "1")
    assert aliases(reg, "head") == {"1": ["champion"], "2": []}
    assert reg.version_info("head", "2").tags["parent_version"] == "1"
    assert reg.version_info("backbone", "2").tags["parent_version"] == "1"
    assert reg.version_info("head", "2").tags["backbone_version"] == "2"

    # promoting the head brings its backbone along
    reg.promote("head", second.head_version)
    assert champions(reg) == ("2", "2")
    assert aliases(reg, "head") == {"1": [], "2": ["champion"]}
    assert aliases(reg, "backbone") == {"1": [], "2": ["champion"]}
    assert reg.load_head().backbone_version == "2"

    # a challenger alias does not move the champion nor the history
    reg.promote("head", first.head_version, alias="challenger")
    assert aliases(reg, "head") == {"1": ["challenger"], "2": ["champion"]}
    assert champions(reg) == ("2", "2")

    # rollback: head back to v1, backbone follows
    assert reg.rollback("head") == "1"
    assert champions(reg) == ("1", "1")
    assert aliases(reg, "head") == {"1": ["challenger", "champion"], "2": []}
    assert aliases(reg, "backbone")["1"] == ["champion"]
    head = reg.load_head("champion")
    assert head.version == "1" and reg.load_backbone(head.backbone_version).version == "1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback("head")

    # missing versions are refused and change nothing
    with pytest.raises(RegistryError, match="has no version or alias '7'"):
        reg.promote("head", 7)
    with pytest.raises(RegistryError, match="has no version or alias '9'"):
        reg.promote("backbone", "9")
    assert champions(reg) == ("1", "1")

    # promote again, and roll back again
    reg.promote("head", "2")
    assert champions(reg) == ("2", "2")
    assert reg.rollback("head") == "1"
    assert champions(reg) == ("1", "1")


def test_train_backbone_resume(tiny_folder, tmp_path):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.1, 0)
    out = tmp_path / "ckpt"
    seen: list[int] = []

    first = train_backbone(tiny_config(), train, val, out, on_epoch=lambda e, m: seen.append(e))
    assert seen == [0]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["config"]["backbone"] == "test_efficientnet"
    first_state = {k: v.clone() for k, v in first.state_dict().items()}

    # resume with nothing left to do: the checkpoint's weights, no epoch run
    seen.clear()
    same = train_backbone(tiny_config(), train, val, out, resume=True, on_epoch=lambda e, m: seen.append(e))
    assert seen == []
    assert all(torch.equal(first_state[k], v) for k, v in same.state_dict().items())

    # raise the epochs: only the new epoch runs, starting from the checkpoint
    more = train_backbone(tiny_config(epochs=2), train, val, out, resume=True, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1]
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1
    changed = [k for k, v in more.state_dict().items() if v.is_floating_point() and not torch.equal(first_state[k], v)]
    assert changed, "the resumed epoch should have updated the weights"
    # and without resume a fresh run starts from epoch 0 again
    seen.clear()
    train_backbone(tiny_config(), train, val, out, resume=False, on_epoch=lambda e, m: seen.append(e))
    assert seen == [0]


def test_cli_train_models_evaluate(tmp_path, infantino_home):
    data = make_image_folder(tmp_path / "cli_faces")
    runner = CliRunner()
    args = ["train", "--data", str(data), "--backbone", "test_efficientnet", "--image-size", "32",
            "--epochs", "1", "--batch-size", "16", "--classes", "auto", "--threads", "1"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "registered infantino-expression-backbone v1 and infantino-expression-head v1 as champion" in res.stdout
    assert (infantino_home / "mlflow.db").exists()
    assert (infantino_home / "runs" / "expression-test_efficientnet" / "last.pt").exists()

    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "infantino-expression-backbone:" and "infantino-expression-head:" in lines
    v1_lines = [line for line in lines if line.strip().startswith("v1 ")]
    assert len(v1_lines) == 2 and all("champion" in line for line in v1_lines)
    assert "backbone=v1" in v1_lines[1]

    res = runner.invoke(main, ["evaluate", "--data", str(data), "--confusion-png", str(tmp_path / "cm.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads(res.stdout)
    assert report["n"] == 36 and report["skipped"] == 0
    assert report["head_version"] == "1" and report["backbone_version"] == "1"
    for key in ("accuracy", "macro_f1", "ece", "occluded_accuracy", "recall_happy", "recall_sad", "recall_surprise"):
        assert 0.0 <= report[key] <= 1.0, key
    # the number is the reloaded pair's accuracy on all 36 images
    reg = ModelRegistry()
    head = reg.load_head()
    backbone = reg.load_backbone(head.backbone_version)
    full = load_dataset(data, 32, True, classes=head.classes)
    pred = head.model.predict_proba(embed_images(backbone.model, full.x, backbone.preprocessing)).argmax(1)
    assert report["accuracy"] == pytest.approx(float(np.mean(pred == full.y)))
    assert (tmp_path / "cm.png").stat().st_size > 1000

    res = runner.invoke(main, ["rollback"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and "no earlier champion" in res.output
    res = runner.invoke(main, ["promote", "5"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and "has no version or alias '5'" in res.output


def test_cli_train_with_one_class_fails_clearly(one_class_folder):
    runner = CliRunner()
    common = ["train", "--data", str(one_class_folder), "--backbone", "test_efficientnet", "--image-size", "32", "--epochs", "1"]
    res = runner.invoke(main, common + ["--classes", "auto"])
    assert res.exit_code == 1
    assert isinstance(res.exception, SystemExit)  # a ClickException, not a crash
    assert "Error:" in res.output and "at least two classes" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(main, common)  # default FER label set: six classes have no images
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "have no readable images" in res.output and "angry" in res.output


def test_init_from_continues_the_champion_backbone(tiny_folder):
    reg = ModelRegistry()
    train_and_register(tiny_folder, tiny_config(), reg, classes=None)
    first = reg.load_backbone("champion").model.state_dict()
    second = train_and_register(tiny_folder, tiny_config(epochs=1, lr=1e-6, seed=3), reg, classes=None, init_from="champion")
    assert second.backbone_version == "2" and reg.champion_version("backbone") == "2"
    assert reg.version_info("backbone", "2").tags["parent_version"] == "1"
    # A tiny learning rate from the first weights stays next to them; a fresh start (seed 3) would not.
    continued = reg.load_backbone("2").model.state_dict()
    key = next(k for k in first if k.endswith("weight") and first[k].ndim == 4)
    assert torch.allclose(first[key], continued[key], atol=1e-3)
    res = CliRunner().invoke(main, ["train", "--data", str(tiny_folder), "--classes", "auto", "--backbone", "test_efficientnet",
                                    "--image-size", "40", "--epochs", "1", "--init-from", "champion"])
    assert res.exit_code == 1 and "--init-from champion" in res.output and "--image-size" in res.output
    assert reg.champion_version("backbone") == "2"  # nothing registered by the refused run


def test_cli_unknown_backbone_fails_clearly(tiny_folder):
    res = CliRunner().invoke(main, ["train", "--data", str(tiny_folder), "--backbone", "no_such_net", "--classes", "auto"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "unknown timm model 'no_such_net'" in res.output
    reg = ModelRegistry()
    assert reg.list_versions("backbone") == [] and reg.list_versions("head") == []
    runs = reg.client.search_runs([reg.experiment_id()])
    assert [r.info.status for r in runs] == ["FAILED"]  # the run is closed, not left running


def test_a_registry_does_not_leak_its_uri_to_child_processes(tmp_path, monkeypatch):
    """MLflow exports the tracking URI to os.environ; a `bentoml serve` started afterwards
    must still find its registry through its own INFANTINO_HOME."""
    import os

    from infantino.settings import Settings
    from registry.store import ModelRegistry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ModelRegistry(Settings(home=tmp_path / "a"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert Settings(home=tmp_path / "b").storage.registry_uri.endswith(str(tmp_path / "b" / "mlflow.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///chosen-by-the-user.db")
    ModelRegistry(Settings(home=tmp_path / "c"), tracking_uri=f"sqlite:///{tmp_path / 'c.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///chosen-by-the-user.db"


def test_train_backbone_with_ema_returns_and_resumes_the_averaged_weights(tiny_folder, tmp_path):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.1, 0)
    out, metrics = tmp_path / "ckpt", []

    averaged = train_backbone(tiny_config(ema_decay=0.9), train, val, out, on_epoch=lambda e, m: metrics.append(m))
    assert {"val_accuracy", "val_accuracy_last_weights"} <= set(metrics[0])
    ckpt = torch.load(out / "last.pt", weights_only=False)
    floats = [k for k, v in ckpt["model"].items() if v.is_floating_point()]
    # What is returned is the average, which lags the last weights, and the checkpoint keeps both.
    assert all(torch.equal(averaged.state_dict()[k], ckpt["ema"][k].cpu()) for k in floats)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in floats)
    # Resumed with nothing left to do: the averaged weights again, not the last ones.
    again = train_backbone(tiny_config(ema_decay=0.9), train, val, out, resume=True)
    assert all(torch.equal(averaged.state_dict()[k], again.state_dict()[k]) for k in floats)


def test_bf16_precision_trains_in_mixed_precision_and_keeps_float32_weights(tiny_folder, tmp_path):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.1, 0)
    full = train_backbone(tiny_config(), train, val, tmp_path / "fp32")
    mixed = train_backbone(tiny_config(precision="bf16"), train, val, tmp_path / "bf16")
    weights = {k: v for k, v in mixed.state_dict().items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for v in weights.values())  # the master weights stay float32
    # Same seed, same data: only the arithmetic differs, so the weights do (the option is really used).
    assert any(not torch.allclose(v, full.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        train_backbone(tiny_config(precision="fp16"), train, val, tmp_path / "bad")


def test_wide_augmentation_trains_on_other_views_and_is_offered_by_the_cli(tiny_folder, tmp_path):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.1, 0)
    standard = train_backbone(tiny_config(), train, val, tmp_path / "standard")
    wide = train_backbone(tiny_config(augment="wide"), train, val, tmp_path / "wide")
    # Same seed, same data: only the views differ, so the weights do (the option is really used).
    assert any(not torch.allclose(v, standard.state_dict()[k]) for k, v in wide.state_dict().items() if v.is_floating_point())
    with pytest.raises(ValueError, match="augment must be one of"):
        train_backbone(tiny_config(augment="extreme"), train, val, tmp_path / "bad")
    option = next(p for p in main.commands["train"].params if p.name == "augment")
    assert tuple(option.type.choices) == AUGMENTATIONS and option.default == "standard"
    assert tiny_config(augment="wide").to_params()["augment"] == "wide"  # recorded with the registered run


def test_distillation_teaches_the_teachers_answers_and_is_refused_without_a_teacher(tiny_folder, tmp_path):
    data = load_dataset(tiny_folder, 32, True, classes=None)
    train, val = stratified_split(data, 0.1, 0)
    # A teacher sure that every image is of the first class: a student that learns only from it says so too.
    teacher = np.zeros((len(train), len(train.classes)), np.float32)
    teacher[:, 0] = 1
    cfg = tiny_config(epochs=4, lr=3e-3, mixup_prob=0.0, label_smoothing=0.0, distill_weight=1.0)
    student = train_backbone(cfg, train, val, tmp_path / "student", teacher_proba=teacher)
    said = classifier_proba(student, embed_images(student, train.x, cfg.preprocessing)).argmax(1)
    assert np.mean(said == 0) > 0.9 and np.mean(train.y == 0) < 0.6
    with pytest.raises(ValueError, match="teacher's probabilities"):
        train_backbone(cfg, train, val, tmp_path / "none")
    with pytest.raises(ValueError, match="mixup_prob"):
        train_backbone(tiny_config(distill_weight=0.5), train, val, tmp_path / "mixed", teacher_proba=teacher)

    # Through the registry: the teacher is a registered backbone, on its test-time views.
    reg = ModelRegistry()
    train_and_register(tiny_folder, tiny_config(), reg, classes=None)
    taught = train_and_register(tiny_folder, tiny_config(mixup_prob=0.0, distill_weight=0.5), reg, classes=None,
                                distill_from="champion", distill_tta="flip")
    params = reg.client.get_run(taught.run_id).data.params
    assert (params["distill_from"], params["distill_tta"], params["distill_weight"]) == ("champion", "flip", "0.5")
    # An ensemble teacher ("1,2") answers the mean of its members' answers.
    cfg = tiny_config()
    one, two = (teacher_probabilities(reg, v, cfg, train, "none") for v in ("1", taught.backbone_version))
    both = teacher_probabilities(reg, f"1, {taught.backbone_version}", cfg, train, "none")
    assert not np.allclose(one, two) and np.allclose(both, (one + two) / 2, atol=1e-5)
    res = CliRunner().invoke(main, ["train", "--data", str(tiny_folder), "--classes", "auto", "--backbone", "test_efficientnet",
                                    "--image-size", "40", "--epochs", "1", "--mix-prob", "0", "--distill-from", "champion"])
    assert res.exit_code == 1 and "--distill-from champion" in res.output and "--image-size" in res.output
