"""How often does the Haar face detector find a face in the real infant photos, and how fast?

Runs ``infantino.faces.HaarDetector`` on every image in ../shared/data/infant_faces/<class>/
(decoded with ``infantino.images.open_image``, exactly as training and serving decode) and
reports per class and overall: images, images with >= 1 face, faces found, and
milliseconds per image (detection only; decoding is reported separately). The data set has
one child per photo, so "images with 2+ faces" counts (mostly) false positives, and
"images with >= 1 face" is the recall proxy.

    .venv/bin/python bench/face_detection.py              # the default detector
    .venv/bin/python bench/face_detection.py --ablation   # also: default cascade only, + alt2

Writes bench/results/face_detection.json. Exits 0 with a message if the data set is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from infantino.faces import HaarDetector
from infantino.images import ImageError, open_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "infant_faces"
OUT = Path(__file__).resolve().parent / "results" / "face_detection.json"

# name -> HaarDetector options; "default" is what create_detector("haar") builds.
VARIANTS = {
    "default_cascade_only": {"alt2_fallback": False, "pad_fallback": 0.0},
    "default+alt2": {"alt2_fallback": True, "pad_fallback": 0.0},
    "default": {},
}


def list_images(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {d.name: sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) for d in classes}


def decode_all(files: dict[str, list[Path]]) -> tuple[dict, dict, dict]:
    """Decode once (every variant then sees the same pixels): images, errors and ms per class."""
    images, errors, decode_ms = {}, {}, {}
    total = sum(len(v) for v in files.values())
    with tqdm(total=total, desc="decode", unit="img") as bar:
        for cls, paths in files.items():
            images[cls], errors[cls] = [], []
            t0 = time.perf_counter()
            for p in paths:
                try:
                    images[cls].append((p.name, open_image(p)))
                except ImageError as exc:
                    errors[cls].append(f"{p.name}: {exc.code}")
                bar.update(1)
            decode_ms[cls] = (time.perf_counter() - t0) * 1000 / max(1, len(paths))
    return images, errors, decode_ms


def run_variant(name: str, detector: HaarDetector, images: dict, errors: dict, decode_ms: dict) -> dict:
    per_class: dict[str, dict] = {}
    times_ms: list[float] = []
    total = sum(len(v) for v in images.values())
    with tqdm(total=total, desc=f"detect [{name}]", unit="img") as bar:
        for cls, items in images.items():
            with_face = multi = faces = 0
            misses = []
            t_detect = 0.0
            for fname, img in items:
                t0 = time.perf_counter()
                found = detector.detect(img)
                dt = time.perf_counter() - t0
                t_detect += dt
                times_ms.append(dt * 1000)
                faces += len(found)
                with_face += bool(found)
                multi += len(found) > 1
                if not found:
                    misses.append(fname)
                bar.update(1)
            n = len(items)
            per_class[cls] = {
                "images": n + len(errors[cls]),
                "decoded": n,
                "decode_errors": errors[cls],
                "images_with_face": with_face,
                "images_with_2plus_faces": multi,
                "faces": faces,
                "face_rate": round(with_face / n, 4) if n else None,
                "ms_per_image": round(t_detect * 1000 / n, 2) if n else None,
                "decode_ms_per_image": round(decode_ms[cls], 2),
                "_detect_s": t_detect,
                "no_face": misses,
            }
    overall = _overall(per_class)
    if times_ms:
        overall["ms_p50"] = round(float(np.percentile(times_ms, 50)), 2)
        overall["ms_p95"] = round(float(np.percentile(times_ms, 95)), 2)
    for row in per_class.values():
        row.pop("_detect_s")
    return {"detector": repr(detector), "classes": per_class, "overall": overall}


def _overall(per_class: dict[str, dict]) -> dict:
    decoded = sum(r["decoded"] for r in per_class.values())
    with_face = sum(r["images_with_face"] for r in per_class.values())
    detect_s = sum(r["_detect_s"] for r in per_class.values())
    decode_ms = sum(r["decode_ms_per_image"] * r["images"] for r in per_class.values())
    images = sum(r["images"] for r in per_class.values())
    return {
        "images": images,
        "decoded": decoded,
        "decode_errors": sum(len(r["decode_errors"]) for r in per_class.values()),
        "images_with_face": with_face,
        "images_with_2plus_faces": sum(r["images_with_2plus_faces"] for r in per_class.values()),
        "faces": sum(r["faces"] for r in per_class.values()),
        "face_rate": round(with_face / decoded, 4) if decoded else None,
        "ms_per_image": round(detect_s * 1000 / decoded, 2) if decoded else None,
        "decode_ms_per_image": round(decode_ms / images, 2) if images else None,
    }


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: {result['detector']}")
    header = f"{'class':<10} {'images':>6} {'>=1 face':>9} {'rate':>6} {'2+ faces':>8} {'faces':>6} {'ms/img':>7}"
    print(header)
    print("-" * len(header))
    rows = list(result["classes"].items()) + [("overall", result["overall"])]
    for cls, r in rows:
        rate = f"{r['face_rate']:.0%}" if r["face_rate"] is not None else "-"
        print(
            f"{cls:<10} {r['images']:>6} {r['images_with_face']:>9} {rate:>6} "
            f"{r['images_with_2plus_faces']:>8} {r['faces']:>6} {r['ms_per_image']:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DATA, help=f"data set folder (default {DATA})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON results (default {OUT})")
    ap.add_argument("--ablation", action="store_true", help="also run the default cascade alone and with alt2 only")
    ap.add_argument(
        "--cv-threads", type=int, default=1,
        help="cv2.setNumThreads for the cascade (default 1: per-image latency of one serving worker)",
    )
    args = ap.parse_args(argv)

    if not args.root.is_dir():
        print(f"SKIP: no data set at {args.root} (expected <root>/<class>/<images>); nothing measured.")
        return 0
    files = list_images(args.root)
    if not any(files.values()):
        print(f"SKIP: {args.root} has no class folders with images; nothing measured.")
        return 0
    cv2.setNumThreads(args.cv_threads)

    images, errors, decode_ms = decode_all(files)
    names = list(VARIANTS) if args.ablation else ["default"]
    variants = {}
    for name in names:
        variants[name] = run_variant(name, HaarDetector(**VARIANTS[name]), images, errors, decode_ms)

    result = {
        "dataset": str(args.root),
        "cv_threads": args.cv_threads,
        "opencv": cv2.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **variants["default"],
    }
    if args.ablation:
        result["ablation"] = {name: {"detector": v["detector"], "overall": v["overall"]} for name, v in variants.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    for name in names:
        print_table(name, variants[name])
    o = result["overall"]
    print(f"\ndefault detector: p50 {o.get('ms_p50')} ms, p95 {o.get('ms_p95')} ms per image")
    print(f"ms/img = Haar detection only (cv2 threads = {args.cv_threads}); decoding averaged "
          f"{result['overall']['decode_ms_per_image']} ms/img on top.")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
