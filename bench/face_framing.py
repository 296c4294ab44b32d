"""Which face detector, and which crop framing, let the shipped model read infants best?

    .venv/bin/python -m bench.face_framing            # ~5 min on 2 CPU cores

For every detector (and fallback chains of them) on all 466 infant photos: the share of photos
with a face found and the detection time. Then, for each detector and crop margin, the shipped
model's accuracy on the **feedback half** of the fixed split (bench/common.infant_split): the
detector and margin are chosen there, never on the test half, whose accuracy is reported for
the chosen setting only. The margin is relative to the detector's box in the Haar framing
convention (infantino.faces), and a negative margin cuts into the box.
Writes bench/results/face_framing.json and .png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import RESULTS, infant_files, infant_split, write_result
from infantino.faces import create_detector
from infantino.images import Preprocessing, open_image
from infantino.regions import find_regions
from registry.shipped import shipped_backbone, shipped_head, shipped_meta

SINGLE = ("haar", "hog", "cnn")
CHAINS = ("haar+cnn", "haar+hog", "haar+hog+cnn", "cnn+haar")
MARGINS = (-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3)


class _Found:
    """A detector that replays boxes found earlier (so each detector runs once per photo)."""

    name = "cached"

    def __init__(self, faces):
        self.faces = faces

    def detect(self, img):
        return self.faces


def framed(images, faces, prep: Preprocessing, margin: float | None = None) -> np.ndarray:
    """Each photo's face found earlier (``faces[i]``, as ``detected`` gives them), cropped as the service
    crops for a model of preprocessing ``prep`` (at ``margin``, default the model's own), else the whole photo."""
    return np.stack([find_regions(img, prep, "largest", _Found(found), keep_images=False, margin=margin)[0].array
                     for img, found in zip(images, faces)])


def detected_feedback_half():
    """The infant feedback half decoded, with the default detector's largest face in each photo:
    (images, faces, labels, detector); a ``_Found(faces[i])`` detector replays photo i's face."""
    files, y, _, _ = infant_split()
    return detected(files, y)


def detected(files, y):
    """``files`` decoded, with the default detector's largest face in each: (images, faces, labels ``y``, detector)."""
    images = [open_image(f) for f in tqdm(files, desc="decode")]
    detector = create_detector()  # the deployment's default chain
    faces = [detector.detect(img)[:1] for img in tqdm(images, desc=f"detect ({detector.name})")]
    return images, faces, y, detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    files, labels = infant_files()
    s_files, _, t_files, _ = infant_split()
    where = {str(f): i for i, f in enumerate(files)}
    stream = np.array([where[str(f)] for f in s_files])
    test = np.array([where[str(f)] for f in t_files])
    images = [open_image(f) for f in tqdm(files, desc="decode")]

    found: dict[str, list] = {}
    detection = {}
    for name in SINGLE:
        detector = create_detector(name)
        t0 = time.perf_counter()
        found[name] = [detector.detect(img) for img in tqdm(images, desc=f"detect {name}")]
        detection[name] = {"ms_per_image": (time.perf_counter() - t0) * 1000 / len(images)}
    for chain in CHAINS:
        parts = chain.split("+")
        found[chain] = [next((found[p][i] for p in parts if found[p][i]), []) for i in range(len(images))]
        # A chain costs its first detector everywhere, the next ones where the earlier found nothing.
        cost = 0.0
        for k, part in enumerate(parts):
            reached = [i for i in range(len(images)) if not any(found[p][i] for p in parts[:k])]
            cost += detection[part]["ms_per_image"] * len(reached) / len(images)
        detection[chain] = {"ms_per_image": cost}
    for name in found:
        detection[name]["found_rate"] = float(np.mean([bool(f) for f in found[name]]))
        detection[name]["found"] = int(sum(bool(f) for f in found[name]))

    meta = shipped_meta()
    model, head = shipped_backbone(), shipped_head()
    base = Preprocessing.from_dict(meta["preprocessing"])

    def predictions(name: str, margin: float, idx: np.ndarray) -> np.ndarray:
        prep = Preprocessing(base.input_size, base.grayscale, base.mean, base.std, face_margin=margin)
        x = framed([images[i] for i in idx], [found[name][i] for i in idx], prep)
        return head.predict(embed_images(model, x, prep))

    sweep = {}
    for name in found:
        for margin in MARGINS:
            acc = float(np.mean(predictions(name, margin, stream) == labels[stream]))
            sweep.setdefault(name, {})[f"{margin:g}"] = acc
            tqdm.write(f"{name:14s} margin {margin:+.2f}: feedback-half accuracy {acc:.3f}")
    best_name, best_margin = max(((n, float(m)) for n in sweep for m in sweep[n]), key=lambda nm: sweep[nm[0]][f"{nm[1]:g}"])
    whole = np.stack([find_regions(images[i], base, "whole", None, keep_images=False)[0].array for i in test])
    chosen = {
        "detector": best_name, "margin": best_margin, "feedback_half_accuracy": sweep[best_name][f"{best_margin:g}"],
        "test_half_accuracy": float(np.mean(predictions(best_name, best_margin, test) == labels[test])),
        "test_half_accuracy_at_the_old_default_haar_0.25": float(np.mean(predictions("haar", 0.25, test) == labels[test])),
        "test_half_accuracy_whole_image": float(np.mean(head.predict(embed_images(model, whole, base)) == labels[test])),
    }
    result = {"command": "python -m bench.face_framing", "model": {k: meta.get(k) for k in ("backbone", "preprocessing", "metrics")},
              "photos": len(files), "detection": detection, "feedback_half_accuracy": sweep, "chosen": chosen}
    path = write_result("face_framing", result)
    plot(result)
    print(chosen)
    print(f"wrote {path}")


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, by_margin in result["feedback_half_accuracy"].items():
        margins = [float(m) for m in by_margin]
        found = result["detection"][name]["found_rate"]
        ax.plot(margins, list(by_margin.values()), "o-" if "+" in name else "s--", label=f"{name} (faces found {found:.0%})")
    ax.axvline(result["chosen"]["margin"], color="grey", ls=":", lw=1)
    ax.set_xlabel("crop margin (fraction of the face box, each side; Haar framing)")
    ax.set_ylabel("shipped model accuracy, feedback half")
    ax.set_title("Infant photos: framing and detector (chosen on the feedback half)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "face_framing.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
