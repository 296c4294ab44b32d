"""Which MLP head should a training run register: refitted on the training embeddings, or answering as
the backbone's own training classifier?

    .venv/bin/python -m bench.head_init      # ~15 minutes for the six committed networks

For each model folder (the shipped model and the candidates): the backbone embeds the FER2013
training split and the validation split of its training run; the head ``infantino train --head
refit`` registers (training/pipeline.py fit_head: an MLP stopped early on a tenth of the training
embeddings) and the one ``--head classifier`` registers (heads/mlp.py MLPHead.from_linear: the
backbone's training classifier as an MLP) are scored on the validation split, with their expected
calibration error. Results: bench/results/head_init.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from backbones.inference import embed_images
from bench.common import DATA, FER_CLASSES, write_result
from infantino.settings import Settings
from registry.shipped import register_shipped
from registry.store import ModelRegistry
from training.data import load_dataset, stratified_split
from training.evaluate import expected_calibration_error
from training.pipeline import fit_head

MODELS = ["registry/default_model", "registry/candidates/scratch-light-45-cont-14",
          "registry/candidates/scratch-light-45-cont-14-distill-10", "registry/candidates/scratch-distill-28",
          "registry/candidates/scratch-distill-40", "registry/candidates/scratch-distill-40-restart-24"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, nargs="*", default=[Path(m) for m in MODELS])
    args = ap.parse_args()
    torch.set_num_threads(2)
    registry = ModelRegistry(Settings(home=Path(tempfile.mkdtemp(prefix="head-init-")) / "home"))
    rows = {}
    data = None
    for folder in args.models:
        backbone = registry.load_backbone(register_shipped(registry, folder)[0])
        prep = backbone.preprocessing
        if data is None:  # every model here reads 64 px grey
            data = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
            train, val = stratified_split(data, 0.1, 0)  # the training runs' split
        train_emb = embed_images(backbone.model, train.x, prep, progress=f"embedding {folder.name}")
        val_emb = embed_images(backbone.model, val.x, prep)
        rows[folder.name] = {}
        for head_from, classifier in (("refit", None), ("classifier", backbone.model.classifier)):
            probs = fit_head(train_emb, train.y, len(FER_CLASSES), 0, classifier).predict_proba(val_emb)
            rows[folder.name][head_from] = {"val_accuracy": float(np.mean(probs.argmax(1) == val.y)),
                                            "val_ece": expected_calibration_error(probs, val.y)}
        print(folder.name, rows[folder.name], flush=True)
    gain = [r["classifier"]["val_accuracy"] - r["refit"]["val_accuracy"] for r in rows.values()]
    out = write_result("head_init", {
        "command": "python -m bench.head_init " + " ".join(sys.argv[1:]), "rows": rows, "n_train": len(train), "n_val": len(val),
        "mean_accuracy_gain_points": 100 * float(np.mean(gain))})
    print(f"classifier head - refit head: {100 * np.mean(gain):+.2f} points on average; wrote {out}")


if __name__ == "__main__":
    main()
