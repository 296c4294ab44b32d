"""Off-the-shelf baseline for the infant benchmark: the `fer` PyPI package.

`fer` is a mini-Xception trained on FER2013 (adult faces, 64x64 grey crops)
behind an OpenCV Haar-cascade face detector. This script runs it, unchanged and
with its default settings (`FER(mtcnn=False)`), on the TEST half of the shared
infant split (`bench/common.py: infant_split(seed=0)`) and writes
bench/results/fer_baseline.json.

For each test image (read with PIL, EXIF-rotated, alpha flattened on white,
converted to RGB then to BGR for fer):
  * `detect_emotions(img)`; if faces are found, the largest box's scores count;
  * if no face is found, the whole image is classified as one face
    (`detect_emotions(img, face_rectangles=[(0, 0, w, h)])`).
Reported: faces found, accuracy / macro-F1 (a) on the images with a detected
face and (b) on all test images ("largest face, else whole image"), per-class
recall for (b), wall time and images/s. The labels are mapped by name.

fer >= 25.10 classifies with a quantised TFLite export of the model by default
(`use_tflite=True`); the original Keras weights (data/emotion_model.hdf5, the
same file as in fer 22.x) are also scored on the same face boxes and reported
under "keras_hdf5" (skip with --no-keras).

It needs its own venv (TensorFlow; not the project's .venv) and does not import
the project's packages: only numpy, PIL, scikit-learn, tqdm (if present), fer and
bench.common (which imports nothing from the project either). Set-up (once), from
anywhere:

    python3 -m venv /work/fer_venv
    /work/fer_venv/bin/pip install tensorflow-cpu 'opencv-python-headless<5' pillow numpy scikit-learn
    /work/fer_venv/bin/pip install --no-deps fer

(fer imports pkg_resources: a Python 3.11 venv ships setuptools 65, which has it;
on Python >= 3.12 add `/work/fer_venv/bin/pip install 'setuptools<81'`. None of
fer's other declared deps, moviepy, pandas, facenet-pytorch, ffmpeg-python,
matplotlib, opencv-contrib-python, are needed for `fer.fer.FER`.)

Run from the project root, as a module (with `-m` the current folder is importable,
so `bench.common` is found without the project being installed in that venv):

    /work/fer_venv/bin/python -m bench.fer_baseline

Options: --seed (split seed, default 0), --root (data folder), --limit N
(first N test images only, for a smoke test; then the result is written as
fer_baseline_limitN.json), --no-keras.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up

import numpy as np
from PIL import Image, ImageOps

from bench.common import DATA, FER_CLASSES, infant_split, write_result

try:
    from tqdm import tqdm
except ImportError:  # fer is installed with --no-deps, so tqdm may be missing
    tqdm = None


def load_bgr(path: Path) -> np.ndarray:
    """Read any of the photos (jpg/webp/png; RGB, RGBA, grey, palette) as a uint8 BGR array."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (
            im.mode == "P" and "transparency" in im.info
        )
        if has_alpha:
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def scores_vector(emotions: dict) -> np.ndarray:
    """fer's {name: score} dict -> scores in FER_CLASSES order (mapped by name)."""
    missing = set(FER_CLASSES) - set(emotions)
    if missing:
        raise KeyError(f"fer did not return scores for {sorted(missing)}: {emotions}")
    return np.array([float(emotions[c]) for c in FER_CLASSES])


def box_area(face: dict) -> int:
    x, y, w, h = face["box"]
    return int(w) * int(h)


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    labels = list(range(len(FER_CLASSES)))
    if len(y_true) == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None}
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": {
            c: float(r)
            for c, r in zip(
                FER_CLASSES,
                recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0),
            )
        },
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(FER_CLASSES))))
    return {"rows_true_cols_pred": list(FER_CLASSES), "matrix": cm.tolist()}


def summarise(y: np.ndarray, pred: np.ndarray, found: np.ndarray) -> dict:
    a = metrics(y[found], pred[found])
    b = metrics(y, pred)
    return {
        "a_detected_faces_only": {
            "accuracy": a["accuracy"],
            "macro_f1": a["macro_f1"],
            "n": a["n"],
            "per_class_recall": a.get("per_class_recall"),
        },
        "b_all_largest_face_else_whole_image": {
            "accuracy": b["accuracy"],
            "macro_f1": b["macro_f1"],
            "n": b["n"],
            "per_class_recall": b["per_class_recall"],
            "confusion": confusion(y, pred),
        },
        "whole_image_fallback_only": {
            k: v for k, v in metrics(y[~found], pred[~found]).items() if k != "per_class_recall"
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DATA / "infant_faces", help="infant_faces folder")
    ap.add_argument("--seed", type=int, default=0, help="infant_split seed (benchmarks use 0)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images (smoke test)")
    ap.add_argument("--no-keras", action="store_true", help="skip the unquantised Keras-weights comparison")
    args = ap.parse_args(argv)
    command = shlex.join([sys.executable, "-m", "bench.fer_baseline", *(sys.argv[1:] if argv is None else argv)])

    warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*structure of `inputs` doesn't match.*")
    import tensorflow as tf
    import fer

    try:
        from fer import FER  # fer <= 22.x
    except ImportError:
        from fer.fer import FER  # fer 25.x no longer re-exports FER from the package

    _, _, files, y = infant_split(args.root, seed=args.seed)
    if args.limit:
        files, y = files[: args.limit], y[: args.limit]
    n = len(files)
    print(f"fer {fer.__version__}, tensorflow {tf.__version__}; {n} test images (seed {args.seed})", flush=True)

    t0 = time.perf_counter()
    detector = FER(mtcnn=False)  # fer's defaults: Haar cascade + TFLite mini-Xception
    keras_clf = None if args.no_keras else FER(mtcnn=False, use_tflite=False)
    load_s = time.perf_counter() - t0

    pred = np.full(n, -1, dtype=np.int64)
    pred_keras = np.full(n, -1, dtype=np.int64)
    found = np.zeros(n, dtype=bool)
    n_faces = np.zeros(n, dtype=np.int64)
    ties = 0
    per_image = []
    clf_keras_s = 0.0

    it = tqdm(range(n), desc="fer", unit="img") if tqdm else range(n)
    t_start = time.perf_counter()
    for i in it:
        img = load_bgr(files[i])
        h, w = img.shape[:2]
        faces = detector.detect_emotions(img)
        n_faces[i] = len(faces)
        if faces:
            found[i] = True
            best = max(faces, key=box_area)
            box = [int(v) for v in best["box"]]
        else:
            box = [0, 0, w, h]
            out = detector.detect_emotions(img, face_rectangles=[tuple(box)])
            if not out:
                raise RuntimeError(f"fer returned nothing for the whole-image box of {files[i]}")
            best = out[0]
        s = scores_vector(best["emotions"])
        pred[i] = int(np.argmax(s))  # fer rounds scores to 0.01: ties go to the first class
        ties += int((s == s.max()).sum() > 1)

        if keras_clf is not None:
            tk = time.perf_counter()
            out_k = keras_clf.detect_emotions(img, face_rectangles=[tuple(box)])
            clf_keras_s += time.perf_counter() - tk
            pred_keras[i] = int(np.argmax(scores_vector(out_k[0]["emotions"])))

        rel = files[i].relative_to(args.root) if files[i].is_relative_to(args.root) else files[i]
        per_image.append({
            "file": str(rel), "label": FER_CLASSES[int(y[i])], "pred": FER_CLASSES[int(pred[i])],
            "n_faces": int(n_faces[i]), "box": box, "image_wh": [w, h],
            **({"pred_keras_hdf5": FER_CLASSES[int(pred_keras[i])]} if keras_clf is not None else {}),
        })
        if tqdm is None and ((i + 1) % 25 == 0 or i + 1 == n):
            el = time.perf_counter() - t_start
            print(f"  {i + 1}/{n} images, {int(found[: i + 1].sum())} with a face, {el:.1f}s", flush=True)
    wall = time.perf_counter() - t_start - clf_keras_s  # the default fer pipeline only

    res = summarise(y, pred, found)
    payload = {
        "what": "fer (PyPI) FER2013 mini-Xception + OpenCV Haar cascade, off the shelf, on the infant test half",
        "command": command,
        "cwd": os.getcwd(),
        "fer_version": fer.__version__,
        "tensorflow_version": tf.__version__,
        "opencv_version": __import__("cv2").__version__,
        "detector": "FER(mtcnn=False): Haar frontalface_default, scaleFactor 1.1, minNeighbors 5, minSize 50",
        "classifier": "fer default: quantised TFLite mini-Xception (use_tflite=True), 64x64 grey",
        "split": {"function": "bench/common.py:infant_split", "seed": args.seed, "half": "test",
                  "root": str(args.root), "limit": args.limit},
        "n_test_images": n,
        "faces_found": {"count": int(found.sum()), "fraction": float(found.mean()) if n else None,
                        "images_with_more_than_one_face": int((n_faces > 1).sum())},
        **res,
        "majority_class_accuracy": float(np.bincount(y, minlength=7).max() / n) if n else None,
        "argmax_ties_in_rounded_scores": ties,
        "timing": {
            "model_load_s": round(load_s, 3),
            "wall_s": round(wall, 3),
            "images_per_s": round(n / wall, 3) if wall > 0 else None,
            "note": "wall_s: read + detect + classify (+ whole-image pass when no face), fer default "
                    "pipeline, one image at a time; excludes model load and the keras_hdf5 comparison",
        },
        "per_image": per_image,
    }
    if keras_clf is not None:
        rk = summarise(y, pred_keras, found)
        payload["keras_hdf5"] = {
            "what": "same boxes, classified with fer's original Keras weights (data/emotion_model.hdf5, "
                    "use_tflite=False) instead of the quantised TFLite model",
            "a_detected_faces_only": {k: rk["a_detected_faces_only"][k] for k in ("accuracy", "macro_f1", "n")},
            "b_all_largest_face_else_whole_image": {
                k: rk["b_all_largest_face_else_whole_image"][k]
                for k in ("accuracy", "macro_f1", "n", "per_class_recall")
            },
            "agreement_with_tflite": float((pred_keras == pred).mean()) if n else None,
            "classify_s": round(clf_keras_s, 3),
        }

    name = "fer_baseline" if not args.limit else f"fer_baseline_limit{args.limit}"
    out = write_result(name, payload)

    a, b = res["a_detected_faces_only"], res["b_all_largest_face_else_whole_image"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"faces found: {int(found.sum())}/{n} ({fmt(payload['faces_found']['fraction'])})")
    print(f"(a) detected faces only: acc {fmt(a['accuracy'])}  macro-F1 {fmt(a['macro_f1'])}  (n={a['n']})")
    print(f"(b) all, face else whole image: acc {fmt(b['accuracy'])}  macro-F1 {fmt(b['macro_f1'])}  (n={b['n']})")
    print("    recall: " + "  ".join(f"{c} {r:.2f}" for c, r in b["per_class_recall"].items()))
    if keras_clf is not None:
        kb = payload["keras_hdf5"]["b_all_largest_face_else_whole_image"]
        ka = payload["keras_hdf5"]["a_detected_faces_only"]
        print(f"keras hdf5 weights: (a) acc {fmt(ka['accuracy'])} F1 {fmt(ka['macro_f1'])}; "
              f"(b) acc {fmt(kb['accuracy'])} F1 {fmt(kb['macro_f1'])}")
    print(f"time: {wall:.1f}s, {payload['timing']['images_per_s']} images/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
