"""Test-time augmentation: what each INFANTINO_TTA mode gains in accuracy and costs in latency.

    .venv/bin/python -m bench.tta        # ~5 minutes on 2 CPU cores

Accuracy: the shipped model on the FER2013 validation split it was trained with (stratified
10%, seed 0), each embedding averaged over the mode's views (backbones.views.augmented_views),
scored by the shipped head. Latency: the served runner (ONNX Runtime on this CPU,
backbones.runtime.create_runner wrapped by with_tta) on one image and on a batch of 32, the
median of repeated calls. The serving default stays `none` unless a mode's gain is worth its cost.
Results: bench/results/tta.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from backbones.inference import embed_images
from backbones.runtime import create_runner, with_tta
from backbones.views import TTA_MODES
from bench.common import DATA, FER_CLASSES, bootstrap_home, write_result
from infantino.settings import Settings
from registry.store import CHAMPION, ModelRegistry
from training.data import load_dataset, stratified_split

REPEATS = 30


def median_ms(run, images: np.ndarray) -> float:
    run(images)  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="tta-bench-")) / "home"
    bootstrap_home(home).check_returncode()
    registry = ModelRegistry(Settings(home=home))
    head = registry.load_head(CHAMPION)
    backbone = registry.load_backbone(head.backbone_version)
    prep = backbone.preprocessing
    fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    _, val = stratified_split(fer, 0.1, 0)
    runner = create_runner(prep, "auto", model=backbone.model)
    rows = []
    for mode in TTA_MODES:
        emb = embed_images(backbone.model, val.x, prep, tta=mode)
        accuracy = float(np.mean(head.model.predict(emb) == val.y))
        run = with_tta(runner, mode)
        row = {"tta": mode, "fer2013_val_accuracy": accuracy, "n": len(val),
               "latency_ms_batch_1": median_ms(run, val.x[:1]), "latency_ms_batch_32": median_ms(run, val.x[:32])}
        rows.append(row)
        print(f"{mode:>10}: accuracy {accuracy:.4f}, batch 1 {row['latency_ms_batch_1']:.2f} ms, "
              f"batch 32 {row['latency_ms_batch_32']:.2f} ms", flush=True)
    base = rows[0]
    for row in rows:
        row["gain_points"] = 100 * (row["fer2013_val_accuracy"] - base["fer2013_val_accuracy"])
        row["latency_factor_batch_32"] = row["latency_ms_batch_32"] / base["latency_ms_batch_32"]
    print(write_result("tta", {"command": "python -m bench.tta", "head_version": head.version, "rows": rows}))


if __name__ == "__main__":
    main()
