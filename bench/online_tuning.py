"""Choose the online update's settings on the infant feedback half, never on the test half.

    .venv/bin/python -m bench.online_tuning                    # ~10-20 minutes on 2 CPU cores
    .venv/bin/python -m bench.online_tuning --variants update_feedback_weight=3 update_feedback_weight=5,gate_worse_alpha=0.05
    .venv/bin/python -m bench.online_tuning --model registry/candidates/NAME --variants ...   # another model folder

The feedback half of the infant photos (bench/common.infant_split) is cut into 4 stratified
folds. For each setting and fold, the other three folds are fed, 32 items per update, through
the real ``Updater`` and gate (the shipped model in a temporary registry and store; no HTTP:
bench/infant_adaptation.py measures the service path), and the final champion is scored on the
fold it never saw. A variant is a set of online settings (``name=value,...``, the fields of
infantino.settings.OnlineSettings; unnamed ones keep their defaults). Reported per variant: mean
accuracy over the folds, promotions and the FER2013 validation accuracy the gate saw. The test
half is not read.
Results: bench/results/online_tuning.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import FER_CLASSES, bootstrap_home, infant_split, write_result
from infantino.faces import create_detector
from infantino.images import open_image
from infantino.regions import find_regions
from infantino.settings import Settings
from online.updater import Updater
from registry.shipped import register_shipped
from registry.store import CHAMPION, ModelRegistry
from store import Stores


def feedback_half_embeddings(registry: ModelRegistry) -> tuple[np.ndarray, np.ndarray]:
    """The feedback half as the service would embed it: largest face, at the model's framing."""
    files, labels, _, _ = infant_split()
    backbone = registry.load_backbone(registry.load_head(CHAMPION).backbone_version)
    prep, detector = backbone.preprocessing, create_detector()
    x = np.stack([find_regions(open_image(f), prep, "largest", detector, keep_images=False)[0].array
                  for f in tqdm(files, desc="face crops (feedback half)")])
    return embed_images(backbone.model, x, prep), np.asarray(labels)


DEFAULT_VARIANTS = ["update_feedback_weight=1", "update_feedback_weight=5", "update_feedback_weight=1,gate_worse_alpha=0.05",
                    "update_feedback_weight=5,gate_worse_alpha=0.05"]


def parse_variant(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


def run(home: Path, overrides: dict[str, str], emb: np.ndarray, y: np.ndarray, train: np.ndarray, held: np.ndarray, batch: int) -> dict:
    settings = Settings(home=home, **overrides)
    registry = ModelRegistry(settings)
    root = registry.load_head("1")
    registry.promote("head", root.version)  # every run starts from the shipped head
    stores = Stores.open(f"sqlite:///{tempfile.mkdtemp(prefix='tuning-store-')}/feedback.db")
    updater = Updater(settings.online, registry, stores.feedback, stores.lease)
    promotions = 0
    for start in range(0, len(train), batch):
        for i in train[start : start + batch]:
            stores.feedback.add(task="expression", label=FER_CLASSES[y[i]], embedding=emb[i], backbone_version=root.backbone_version)
        promotions += updater.run_once(force=True).promoted
    head = registry.load_head(CHAMPION).model
    _, validation = registry.load_embeddings(root)
    return {"accuracy": float(np.mean(head.predict(emb[held]) == y[held])), "promotions": promotions,
            "as_is_accuracy": float(np.mean(root.model.predict(emb[held]) == y[held])),
            "fer2013_val_accuracy": float(np.mean(head.predict(validation.x) == validation.y))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="online settings to compare, each name=value,...")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="a model folder in the shipped format (default: the shipped model)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="online-tuning-")) / "home"
    if args.model is None:
        bootstrap_home(home).check_returncode()
    else:
        register_shipped(ModelRegistry(Settings(home=home)), args.model)
    emb, y = feedback_half_embeddings(ModelRegistry(Settings(home=home)))
    order = np.random.default_rng(0).permutation(len(y))  # the arrival order of the stream
    results = {}
    for variant in args.variants:
        runs = []
        for train, held in StratifiedKFold(args.folds, shuffle=True, random_state=0).split(emb, y):
            runs.append(run(home, parse_variant(variant), emb, y, np.array([i for i in order if i in set(train)]), held, args.batch))
            tqdm.write(f"{variant}: fold accuracy {runs[-1]['accuracy']:.3f} (as-is {runs[-1]['as_is_accuracy']:.3f}), "
                       f"{runs[-1]['promotions']} promotions, FER2013 val {runs[-1]['fer2013_val_accuracy']:.3f}")
        results[variant] = {"mean_accuracy": float(np.mean([r["accuracy"] for r in runs])),
                            "mean_as_is_accuracy": float(np.mean([r["as_is_accuracy"] for r in runs])),
                            "mean_fer2013_val_accuracy": float(np.mean([r["fer2013_val_accuracy"] for r in runs])), "runs": runs}
    best = max(results, key=lambda v: results[v]["mean_accuracy"])
    name = "online_tuning" + (f"_{args.model.name}" if args.model else "")
    path = write_result(name, {"command": "python -m bench.online_tuning " + (f"--model {args.model} " if args.model else "")
                               + " ".join(args.variants), "model": str(args.model or "registry/default_model"), "chosen": best,
                                          "by_variant": results, "folds": args.folds, "batch": args.batch,
                                          "data": "feedback half of the infant photos only (4 stratified folds)"})
    for v, r in results.items():
        print(f"{v}: {r['mean_accuracy']:.3f} (as-is {r['mean_as_is_accuracy']:.3f}), FER2013 val {r['mean_fer2013_val_accuracy']:.3f}")
    print(f"chosen: {best}; wrote {path}")


if __name__ == "__main__":
    main()
