"""How the online update's learning rate, passes and replay trade infant gains against FER2013.

    .venv/bin/python bench/online_tuning.py                  # ~6 minutes on 2 CPU cores
    .venv/bin/python bench/online_tuning.py --repeats 1 --configs 1e-4,5,4 3e-4,5,4

The same stream as bench/infant_adaptation.py (face crops of the infant feedback half, in the
same order, 32 items per update), fed straight into the real Updater and gate (a temporary
registry and queue per run, no HTTP: the service path is what infant_adaptation.py measures).
Each configuration ``lr,passes,replay_ratio`` runs ``--repeats`` times (the replay sample is
random), and reports the infant test accuracy of the final champion, the number of promotions
and the FER2013 validation accuracy the gate saw. Results: bench/results/online_tuning.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import FER_CLASSES, bootstrap_home, infant_split, write_result  # noqa: E402

from infantino.faces import create_detector, crop_largest_face  # noqa: E402
from infantino.images import open_image, to_model_array  # noqa: E402
from infantino.settings import Settings  # noqa: E402
from online.queue import FeedbackQueue  # noqa: E402
from online.updater import Updater  # noqa: E402
from registry.store import ModelRegistry  # noqa: E402
from training.model import embed_images  # noqa: E402


def run(config: tuple[float, int, float], stream: np.ndarray, stream_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
        batch: int) -> dict:
    lr, passes, replay = config
    home = Path(tempfile.mkdtemp(prefix="online-tuning-")) / "home"
    bootstrap_home(home).check_returncode()
    settings = Settings(home=home, update_learning_rate=lr, update_passes=passes, update_replay_ratio=replay)
    registry, queue = ModelRegistry(settings), FeedbackQueue(settings.resolved_queue_url)
    updater = Updater(settings, registry, queue)
    _, validation = registry.load_embeddings(registry.load_head("champion"))
    promotions = 0
    for start in range(0, len(stream), batch):
        for e, y in zip(stream[start : start + batch], stream_y[start : start + batch]):
            queue.add(task="expression", label=FER_CLASSES[y], embedding=e, backbone_version="1")
        promotions += updater.run_once(force=True).promoted
    head = registry.load_head("champion").model
    return {"infant_accuracy": float(np.mean(head.predict(test) == test_y)), "promotions": promotions,
            "fer2013_val_accuracy": float(np.mean(head.predict(validation.x) == validation.y))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["1e-4,5,4", "3e-4,5,4", "1e-3,5,4"], help="lr,passes,replay_ratio")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    s_files, s_y, t_files, t_y = infant_split()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        bootstrap_home(home).check_returncode()
        registry = ModelRegistry(Settings(home=home))
        head = registry.load_head("champion")
        backbone = registry.load_backbone(head.backbone_version)
        prep, detector = backbone.preprocessing, create_detector("haar")

        def embed(files):
            x = [to_model_array(crop_largest_face(open_image(f), detector)[0], prep.input_size, prep.grayscale)
                 for f in tqdm(files, desc="face crops", leave=False)]
            return embed_images(backbone.model, np.stack(x), prep)

        order = np.random.default_rng(0).permutation(len(s_files))  # the order infant_adaptation.py posts in
        stream, stream_y = embed([s_files[i] for i in order]), s_y[order]
        test = embed(t_files)
        as_is = float(np.mean(head.model.predict(test) == t_y))
    results = []
    for text in tqdm(args.configs, desc="configurations"):
        lr, passes, replay = text.split(",")
        config = (float(lr), int(passes), float(replay))
        runs = [run(config, stream, stream_y, test, t_y, args.batch) for _ in range(args.repeats)]
        acc = [r["infant_accuracy"] for r in runs]
        results.append({"learning_rate": config[0], "passes": config[1], "replay_ratio": config[2], "runs": runs,
                        "infant_accuracy_mean": float(np.mean(acc)), "infant_accuracy_min": float(np.min(acc))})
        print(f"lr {lr} passes {passes} replay {replay}: infant accuracy {np.mean(acc):.3f} (min {np.min(acc):.3f}; "
              f"as-is {as_is:.3f}), promotions {[r['promotions'] for r in runs]}", flush=True)
    write_result("online_tuning", {"command": "python bench/online_tuning.py " + " ".join(sys.argv[1:]),
                                   "as_is_infant_accuracy": as_is, "test_items": len(t_y), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
