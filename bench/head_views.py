"""Does the registered head gain from being fitted on mirrored training faces too?

    .venv/bin/python -m bench.head_views --model registry/candidates/scratch-light-45-cont-14-distill-10   # ~8 minutes

A training run fits its MLP head on its backbone's embeddings of the training images
(training/pipeline.py fit_head), which that backbone has learnt, so they are better separated
than the embeddings of faces it never saw; the head registered with a network has scored up to
half a point under the network's own training classifier (bench/results/recipes.json). Adding
each training face's mirror image (a view the backbone saw only under random flips) is the
cheapest augmentation of the head's data that costs nothing at serving time. Measured for two
head seeds, on the two stratified halves of the FER2013 validation split, so a choice made on
half A can be confirmed on half B. Results: bench/results/head_views_<model folder>.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from backbones.inference import embed_images
from backbones.views import augmented_views
from bench.common import DATA, FER_CLASSES, write_result
from infantino.settings import Settings
from registry.shipped import register_shipped
from registry.store import ModelRegistry
from training.data import load_dataset, stratified_split
from training.pipeline import fit_head

HEAD_DATA = {"plain": 1, "plain+flip": 2}  # number of views (augmented_views order: the image, its mirror)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model folder in the shipped format")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(2)
    registry = ModelRegistry(Settings(home=Path(tempfile.mkdtemp(prefix="head-views-")) / "home"))
    backbone_version, _ = register_shipped(registry, args.model)
    backbone = registry.load_backbone(backbone_version)
    prep = backbone.preprocessing
    data = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    train, val = stratified_split(data, 0.1, 0)  # the training run's split
    views = [embed_images(backbone.model, np.ascontiguousarray(v), prep, progress="embedding")
             for v in augmented_views(train.x, "flip")]
    val_emb = embed_images(backbone.model, val.x, prep)
    half_a, half_b = train_test_split(np.arange(len(val.y)), test_size=0.5, stratify=val.y, random_state=0)
    rows = {}
    for name, n_views in HEAD_DATA.items():
        X, y = np.concatenate(views[:n_views]), np.tile(train.y, n_views)
        rows[name] = []
        for seed in args.seeds:
            right = fit_head(X, y, len(FER_CLASSES), seed).predict_proba(val_emb).argmax(1) == val.y
            rows[name].append({"seed": seed, "val_half_a": right[half_a].mean(), "val_half_b": right[half_b].mean(),
                               "val_accuracy": right.mean()})
            print(name, rows[name][-1], flush=True)
    out = write_result(f"head_views_{args.model.name}", {
        "command": f"python -m bench.head_views --model {args.model}", "model": str(args.model), "rows": rows,
        "n_train": len(train), "n_val": len(val)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
