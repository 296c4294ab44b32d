"""The serving Bento without torch: `infantino bundle` + `bentoml build` (what `make build` runs).

Each registered backbone version carries its ONNX export, and `infantino bundle` stores it beside
the head in BentoML's model store, so the backbone service runs on ONNX Runtime alone. Here torch
is blocked in a subprocess (imports of torch, timm, torchvision fail) to show nothing served needs
it, and the Bento built from bentofile.yaml lists none of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backbones.runtime import create_runner
from infantino.settings import Settings
from registry.store import ONNX_TAG, ModelRegistry
from testkit.registry import train_tiny_registry

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TORCH_PACKAGES = ("torch", "torchvision", "timm")

# Run ``code`` where torch, timm and torchvision cannot be imported (as in the torch-free Bento).
NO_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
""")


def run_without_torch(code: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    script = NO_TORCH.format(blocked=TORCH_PACKAGES) + textwrap.dedent(code) + textwrap.dedent(f"""
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TORCH_PACKAGES!r})
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained registry and BentoML home where `infantino bundle` stored its champions."""
    tmp = tmp_path_factory.mktemp("bento")
    home, bentoml_home = tmp / "home", tmp / "bentoml"
    train_tiny_registry(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFANTINO_", "MLFLOW_", "BENTOML_"))}
    env.update(INFANTINO_HOME=str(home), BENTOML_HOME=str(bentoml_home), BENTOML_DO_NOT_TRACK="true")
    bundled = subprocess.run([sys.executable, "-m", "cli.main", "bundle"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert bundled.returncode == 0, bundled.stderr[-4000:]
    assert "bundled infantino-expression-backbone:v1" in bundled.stdout, bundled.stdout
    return {"tmp": tmp, "home": home, "env": env}


def torch_embeddings(home: Path, images: np.ndarray) -> np.ndarray:
    registry = ModelRegistry(Settings(home=home))
    backbone = registry.load_backbone(registry.version_info("head", "champion").tags["backbone_version"])
    return create_runner(backbone.preprocessing, "torch", model=backbone.model)(images)


SERVE_ONE_BATCH = """
    import numpy as np
    from service.backbone import ServedBackbone, serving_device

    device = serving_device("auto")
    assert device == "cpu", device
    served = ServedBackbone("expression", device)  # loads what it would serve (registry champion, else bundled)
    loaded, run = served.current
    assert loaded.model is None and loaded.onnx, "not served from its ONNX export"
    np.save(OUT, run(np.load(IMAGES)))
    print("served backbone v" + loaded.version + " on " + run.runtime)
"""


@pytest.mark.parametrize("where", ["registry", "bundle"])
def test_the_backbone_serves_from_its_onnx_export_without_torch(tiny, tmp_path, where):
    """From the registry (a registered version's ONNX artifact) and from the Bento's bundled model
    (the registry empty and torch absent, so the bundled pair is registered, untouched, as the first
    champion): the same embeddings as the torch model."""
    registry = ModelRegistry(Settings(home=tiny["home"]))
    assert registry.version_info("backbone", "1").tags[ONNX_TAG]  # logged with the version
    images = np.random.default_rng(0).integers(0, 255, (6, 48, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    home = tiny["home"] if where == "registry" else tmp_path / "empty-home"
    env = {**tiny["env"], "INFANTINO_HOME": str(home)}
    code = f"OUT, IMAGES = {str(tmp_path / 'out.npy')!r}, {str(tmp_path / 'images.npy')!r}\n" + textwrap.dedent(SERVE_ONE_BATCH)
    proc = run_without_torch(code, env)
    assert "served backbone v1 on openvino" in proc.stdout  # the CPU default, installed with the Bento (bentofile.yaml)
    by_export = np.load(tmp_path / "out.npy")
    by_torch = torch_embeddings(tiny["home"], images)
    assert by_export.shape == by_torch.shape and by_export.shape[1] > 64  # served rows: the embedding, then the stage features
    # OpenVINO computes in bfloat16 where the CPU can: the same embeddings up to its rounding
    cosine = (by_export * by_torch).sum(1) / np.linalg.norm(by_export, axis=1) / np.linalg.norm(by_torch, axis=1)
    assert cosine.min() > 0.99, cosine
    if where == "bundle":  # the empty registry now holds the bundled pair as champion, registered without torch
        # (one registry at a time: MLflow's tracking URI is global to the process)
        original = ModelRegistry(Settings(home=tiny["home"]))
        original_replay, _ = original.load_embeddings(original.load_head("1"))
        original_proba = original.load_head("1").model.predict_proba(original_replay.x[:5])
        registered = ModelRegistry(Settings(home=home))
        head = registered.version_info("head", "champion")
        backbone = registered.version_info("backbone", head.tags["backbone_version"])
        assert head.tags["bundled_version"] == backbone.tags["bundled_version"] == "1"
        assert registered.champion_version("backbone") == str(backbone.version)
        # the same models as the bundling registry's: embeddings, the head's answers, the backbone's weights
        replay, validation = registered.load_embeddings(registered.load_head(head.version))
        assert np.array_equal(replay.x, original_replay.x) and len(validation) > 0
        assert np.allclose(registered.load_head(head.version).model.predict_proba(replay.x[:5]), original_proba)
        loaded = registered.load_backbone(backbone.version)
        assert np.allclose(create_runner(loaded.preprocessing, "torch", model=loaded.model)(images), by_torch, atol=1e-5)


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_bentoml_build_makes_a_bento_without_torch(tiny):
    """`bentoml build` as `make build` runs it, after `infantino bundle`: no torch, timm or torchvision
    in the Bento's requirements (nor in its lock file, i.e. not pulled in by another package)."""
    env = tiny["env"]
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    bentos = list((Path(env["BENTOML_HOME"]) / "bentos" / "infantino").glob("*/bento.yaml"))
    assert len(bentos) == 1, bentos
    bento = bentos[0].parent
    python = bento / "env" / "python"
    # requirements.in: bentofile.yaml's packages; requirements.txt: them locked, with every dependency.
    declared, locked = requirement_names(python / "requirements.in"), requirement_names(python / "requirements.txt")
    assert {"bentoml", "onnxruntime", "scikit-learn", "mlflow"} <= declared <= locked, (declared, locked)
    assert not declared & set(TORCH_PACKAGES) and not locked & set(TORCH_PACKAGES), sorted(locked & set(TORCH_PACKAGES))
    print(f"the Bento's requirements: {len(declared)} declared, {len(locked)} locked, none of {TORCH_PACKAGES}")
    import yaml

    models = {m["tag"] for m in yaml.safe_load((bento / "bento.yaml").read_text())["models"]}
    assert models == {"infantino-expression-backbone:v1", "infantino-expression-head:v1"}, models
    assert (Path(env["BENTOML_HOME"]) / "models" / "infantino-expression-backbone" / "v1" / "backbone.onnx").exists()
    assert not (bento / "src" / "training").exists()  # served code never imports training/
