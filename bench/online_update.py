"""How fast does feedback become a served model, and what does an online update cost?

    .venv/bin/python -m bench.online_update            # ~3-5 minutes on 2 CPU cores

1. Latency: a real `bentoml serve` (update trigger N=64 items). Post N-1 feedback items,
   then the N-th; from the N-th's acknowledgement, poll POST /predict until an answer names
   the new head version (goal: under 2 s). Repeated --trials times.
2. Cost: one online update (partial_fit on the N items + replay, gate, register) against a
   full fine-tune on the same N images: the backbone fine-tuned for a few epochs, then the
   whole training set re-embedded and the head refitted (what a fine-tune of a deployed
   backbone+head pair really needs), both timed on this machine.

Model: the shipped FER2013 model (registered into a temporary home); feedback: FER2013
faces from ../shared/data when present, else drawn faces.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bench.common import DATA, FER_CLASSES, bootstrap_home, write_result
from infantino.settings import Settings
from registry.store import ModelRegistry
from testkit.faces import draw_face
from testkit.server import BentoServer


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def feedback_images(n: int, classes: list[str], seed: int) -> list[tuple[bytes, str, np.ndarray]]:
    npz = DATA / "fer2013_train.npz"
    rng = np.random.default_rng(seed)
    if npz.exists() and tuple(classes) == FER_CLASSES:
        with np.load(npz) as d:
            idx = rng.choice(len(d["y"]), n, replace=False)
            return [(png(d["x"][i]), classes[int(d["y"][i])], d["x"][i]) for i in idx]
    out = []
    for i in range(n):
        label = i % len(classes)
        img = draw_face(label, 48, rng).convert("L")
        out.append((png(np.asarray(img)), classes[label], np.asarray(img)))
    return out


def prepare_home(home: Path) -> str:
    out = bootstrap_home(home)
    if out.returncode == 0:
        return "shipped model (registry/default_model)"
    from testkit.registry import train_tiny_registry

    train_tiny_registry(home)
    return "tiny test model (no shipped model found): " + out.stderr.strip()[-200:]


def measure_latency(server: BentoServer, n: int, trials: int, classes: list[str]) -> list[dict]:
    results = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        probe = feedback_images(1, classes, 999)[0][0]
        for trial in tqdm(range(trials), desc="latency trials"):
            before = client.post("/predict", files={"image": ("p.png", probe, "image/png")}).json()["head_version"]
            items = feedback_images(n, classes, seed=trial)
            for img, label, _ in items[:-1]:
                assert client.post("/feedback", files={"image": ("f.png", img, "image/png")}, data={"label": label}).status_code == 200
            img, label, _ = items[-1]
            r = client.post("/feedback", files={"image": ("f.png", img, "image/png")}, data={"label": label})
            acked = time.perf_counter()
            assert r.status_code == 200 and r.json()["queue_depth"] >= n, r.text
            version, polls = before, 0
            while version == before and time.perf_counter() - acked < 30:
                version = client.post("/predict", files={"image": ("p.png", probe, "image/png")}).json()["head_version"]
                polls += 1
            served = time.perf_counter() - acked
            info = ModelRegistry(Settings(home=Path(server.env["INFANTINO_HOME"]))).list_versions("head")[-1]
            results.append({"trial": trial, "promoted": version != before, "seconds_to_served": served if version != before else None,
                            "new_version": info["version"], "aliases": info["aliases"], "gate": info["tags"].get("gate", ""),
                            "polls": polls})
            tqdm.write(f"trial {trial}: {results[-1]}")
    return results


def measure_costs(home: Path, n: int, classes: list[str], fine_tune_epochs: int, reembed_limit: int | None) -> dict:
    import torch

    from backbones.inference import embed_images
    from heads import create_head
    from online.updater import Updater
    from registry.embedder import torch_embedder
    from store import Stores
    from training.data import LabelledImages, load_dataset
    from training.trainer import TrainConfig, train_backbone

    settings = Settings(home=home, update_min_items=n, gate_max_val_drop=1.0)
    registry = ModelRegistry(settings)
    head = registry.load_head("champion")
    backbone = registry.load_backbone(head.backbone_version)
    prep = backbone.preprocessing
    items = feedback_images(n, classes, seed=1234)
    stores = Stores.open(settings.storage.database_url)
    x = np.stack([np.repeat(a[:, :, None], 3, 2) if a.ndim == 2 else a for _, _, a in items])
    from infantino.images import to_model_array

    x = np.stack([to_model_array(Image.fromarray(a), prep.input_size, prep.grayscale) for a in x])
    emb = embed_images(backbone.model, x, prep)
    for e, (_, label, _) in zip(emb, items):
        stores.feedback.add(task=registry.task, label=label, embedding=e, backbone_version=backbone.version)
    updater = Updater(settings.online, registry, stores.feedback, stores.lease, embed=torch_embedder(registry))
    start = time.perf_counter()
    report = updater.run_once(force=True)
    online_s = time.perf_counter() - start

    y = np.array([classes.index(lbl) for _, lbl, _ in items])
    cfg = TrainConfig(backbone=backbone.tags.get("backbone_name", "resnet18"), image_size=prep.input_size, grayscale=prep.grayscale,
                      epochs=fine_tune_epochs, batch_size=32, lr=1e-4, warmup_epochs=0, mixup_prob=0.0, balance="none", val_fraction=0.0)
    data = LabelledImages(x, y, classes)
    import copy

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tuned = train_backbone(cfg, data, data, tmp, initial=copy.deepcopy(backbone.model))
    fine_tune_s = time.perf_counter() - start
    npz = DATA / "fer2013_train.npz"
    reembed_s = head_s = None
    n_reembed = 0
    if npz.exists() and tuple(classes) == FER_CLASSES:
        train = load_dataset(npz, prep.input_size, prep.grayscale, classes, limit=reembed_limit)
        n_reembed = len(train)
        start = time.perf_counter()
        train_emb = embed_images(tuned, train.x, prep, progress="re-embedding the training set")
        reembed_s = time.perf_counter() - start
        start = time.perf_counter()
        create_head("mlp", random_state=0).fit(np.concatenate([train_emb, embed_images(tuned, x, prep)]), np.concatenate([train.y, y]),
                                               classes=np.arange(len(classes)))
        head_s = time.perf_counter() - start
    full = fine_tune_s + (reembed_s or 0) + (head_s or 0)
    return {
        "n_feedback": n, "online_update_seconds": online_s, "online_update_verdict": report.verdict if report else None,
        "full_fine_tune": {"backbone_epochs": fine_tune_epochs, "backbone_seconds": fine_tune_s,
                           "reembed_images": n_reembed, "reembed_seconds": reembed_s, "head_fit_seconds": head_s,
                           "total_seconds": full},
        "full_over_online": full / online_s if online_s else None,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="feedback items that trigger an update")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--fine-tune-epochs", type=int, default=3)
    ap.add_argument("--reembed-limit", type=int, default=None, help="re-embed only this many training images (default: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        model = prepare_home(home)
        classes = ModelRegistry(Settings(home=home)).load_head("champion").classes
        env = {"INFANTINO_HOME": str(home), "INFANTINO_UPDATE_MIN_ITEMS": str(args.n), "INFANTINO_UPDATE_INTERVAL_S": "100000",
               "INFANTINO_MODEL_POLL_S": "0.5"}
        with BentoServer(env, log_path=Path(tmp) / "serve.log") as server:
            latency = measure_latency(server, args.n, args.trials, classes)
        cost_home = Path(tmp) / "cost"
        prepare_home(cost_home)
        costs = measure_costs(cost_home, args.n, classes, args.fine_tune_epochs, args.reembed_limit)
    served = [r["seconds_to_served"] for r in latency if r["seconds_to_served"] is not None]
    summary = {
        "command": "python -m bench.online_update " + " ".join(sys.argv[1:]),
        "model": model, "n": args.n, "model_poll_s": 0.5,
        "latency_trials": latency,
        "seconds_to_served_median": float(np.median(served)) if served else None,
        "goal_seconds": 2.0,
        "goal_met": bool(served) and float(np.median(served)) < 2.0,
        "cost": costs,
    }
    path = write_result("online_update", summary)
    print(f"median ack->served {summary['seconds_to_served_median']} s over {len(served)} promoted trial(s); "
          f"online update {costs['online_update_seconds']:.2f} s vs full fine-tune {costs['full_fine_tune']['total_seconds']:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
