"""Load labelled faces from the three layouts users bring.

- an image folder with one sub-folder per class (``data/happy/001.jpg``);
- a FER2013-style CSV with columns ``emotion``, ``pixels`` and optionally ``Usage``;
- a ``.npz`` with ``x`` (uint8 N×H×W or N×H×W×3), ``y`` and ``classes``.

Every loader returns a :class:`LabelledImages` with images already decoded and resized to
the model's input size, so training never touches files again. Unreadable files are skipped
and counted; a data set that cannot train a classifier is a :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from infantino import FER_CLASSES
from infantino.images import PRECROPPED_FACE_MARGIN, ImageError, Preprocessing, open_image, to_model_array

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)


class DatasetError(ValueError):
    """The data set cannot be used as given (empty class, unknown label, too few classes...)."""


@dataclass
class LabelledImages:
    x: np.ndarray  # uint8 (N, S, S, 3)
    y: np.ndarray  # int64 (N,)
    classes: list[str]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "LabelledImages":
        return LabelledImages(self.x[idx], self.y[idx], self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=len(self.classes))

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels, recorded with every model trained on them."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(self.y.astype(np.int64).tobytes())
        h.update(",".join(self.classes).encode())
        return h.hexdigest()[:16]


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def load_dataset(
    path: str | Path,
    image_size: int = 64,
    grayscale: bool = True,
    classes: Sequence[str] | None = FER_CLASSES,
    limit: int | None = None,
    seed: int = 0,
    usage: str | None = None,
    crop_faces: str | None = None,
    face_margin: float = PRECROPPED_FACE_MARGIN,
) -> LabelledImages:
    """Load any supported layout. ``classes=None`` takes the label set from the data itself.

    ``limit`` keeps a stratified random subset of that many items (quick experiments).
    ``crop_faces`` names a face detector (infantino.faces): image folders are then read from
    their largest face framed at ``face_margin``, as the service does with face_crop (whole
    scenes -> face crops); the model records that framing and is served crops framed alike.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if path.is_dir():
        data = _load_folder(path, Preprocessing(image_size, grayscale, face_margin=face_margin), classes, crop_faces)
    elif path.suffix.lower() == ".csv":
        data = _load_csv(path, image_size, grayscale, classes, usage)
    elif path.suffix.lower() == ".npz":
        data = _load_npz(path, image_size, grayscale, classes)
    else:
        raise DatasetError(f"{path}: unknown data layout; give a folder of class sub-folders, a .csv or a .npz")
    if limit is not None and limit < len(data):
        data = _stratified_limit(data, limit, seed)
    _validate(data, str(path))
    if data.skipped:
        log.warning("%s: skipped %d unreadable item(s), e.g. %s", path, data.skipped, data.skipped_examples[:3])
    return data


def _validate(data: LabelledImages, where: str) -> None:
    if len(data.classes) < 2:
        raise DatasetError(f"{where}: a classifier needs at least two classes, got {data.classes}")
    counts = data.class_counts()
    empty = [c for c, n in zip(data.classes, counts) if n == 0]
    if empty:
        raise DatasetError(f"{where}: class(es) {empty} have no readable images; every class in {data.classes} needs at least one")


def _check_labels(found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{where}: unknown label(s) {unknown}; accepted labels are {list(classes)}")
    return list(classes)


def _load_folder(root: Path, prep: Preprocessing, classes: Sequence[str] | None, crop_faces: str | None = None) -> LabelledImages:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no class sub-folders found (expected {root}/<class>/<image files>)")
    label_set = _check_labels([p.name for p in folders], classes, str(root))
    files = [(f, label_set.index(p.name)) for p in folders for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    from infantino.faces import create_detector
    from infantino.regions import find_regions

    detector = create_detector(crop_faces) if crop_faces and crop_faces != "none" else None
    mode = "largest" if detector is not None else "whole"
    images, labels, skipped = [], [], []
    for file, label in tqdm(files, desc=f"reading {root.name}", unit="img", leave=False):
        try:
            img = open_image(file, reduce_to=None if detector is not None else prep.input_size)  # as the service decodes
            images.append(find_regions(img, prep, mode, detector, keep_images=False)[0].array)
            labels.append(label)
        except (ImageError, OSError) as exc:
            skipped.append(f"{file.relative_to(root)}: {exc}")
    return _pack(images, labels, label_set, skipped, prep.input_size)


def _load_csv(path: Path, size: int, grey: bool, classes: Sequence[str] | None, usage: str | None) -> LabelledImages:
    label_set = list(classes or FER_CLASSES)
    images, labels, skipped = [], [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"emotion", "pixels"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}: missing column(s) {sorted(missing)}; a FER2013 CSV has emotion, pixels and Usage")
        for row_no, row in enumerate(tqdm(reader, desc=f"reading {path.name}", unit="row", leave=False), start=2):
            if usage and row.get("Usage") != usage:
                continue
            try:
                label = int(row["emotion"])
            except (TypeError, ValueError):  # TypeError: a short row has None for the column
                raise DatasetError(f"{path}:{row_no}: emotion {row['emotion']!r} is not an integer class index") from None
            if not 0 <= label < len(label_set):
                raise DatasetError(f"{path}:{row_no}: unknown label {label}; accepted are 0..{len(label_set) - 1} = {label_set}")
            try:
                pixels = np.array((row["pixels"] or "").split(), dtype=np.float64)
                side = int(round(np.sqrt(pixels.size)))
                if side * side != pixels.size or side == 0 or pixels.min() < 0 or pixels.max() > 255:
                    raise ValueError(f"{pixels.size} pixel values do not make a square 8-bit image")
            except ValueError as exc:
                skipped.append(f"row {row_no}: {exc}")
                continue
            img = Image.fromarray(pixels.reshape(side, side).astype(np.uint8), mode="L").convert("RGB")
            images.append(to_model_array(img, size, grey))
            labels.append(label)
    return _pack(images, labels, label_set, skipped, size)


def _load_npz(path: Path, size: int, grey: bool, classes: Sequence[str] | None) -> LabelledImages:
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path}: missing array(s) {sorted(missing)}; expected x, y and classes")
        x, y = npz["x"], npz["y"].astype(np.int64)
        stored = [str(c) for c in npz["classes"]] if "classes" in npz.files else None
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)) or len(x) != len(y):
        raise DatasetError(f"{path}: x must be N×H×W or N×H×W×3 with one label per image; got x {x.shape}, y {y.shape}")
    names = stored or list(classes or FER_CLASSES)
    bad = np.unique(y[(y < 0) | (y >= len(names))])
    if bad.size:
        raise DatasetError(f"{path}: unknown label(s) {bad.tolist()}; accepted are 0..{len(names) - 1} = {names}")
    label_set = _check_labels(names, classes, str(path))
    remap = np.array([label_set.index(n) for n in names])
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    images = [to_model_array(Image.fromarray(im).convert("RGB"), size, grey) for im in tqdm(x, desc=f"reading {path.name}", unit="img", leave=False)]
    return _pack(images, remap[y].tolist(), label_set, [], size)


def _pack(images: list, labels: list, classes: list[str], skipped: list[str], size: int) -> LabelledImages:
    x = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return LabelledImages(x, np.asarray(labels, dtype=np.int64), list(classes), len(skipped), skipped[:20])


def _stratified_limit(data: LabelledImages, limit: int, seed: int) -> LabelledImages:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    present = np.unique(data.y)
    if limit < len(present):
        raise DatasetError(f"limit {limit} is smaller than the number of classes ({len(present)}); keep at least one image per class")
    counts = np.bincount(data.y)[present]
    # sklearn can only stratify when every class has 2+ items and fits on both sides of the cut.
    if counts.min() >= 2 and len(data) - limit >= len(present):
        keep, _ = train_test_split(idx, train_size=limit, stratify=data.y, random_state=seed)
    else:  # one random item of every class, then a random rest
        rng = np.random.default_rng(seed)
        first = np.array([rng.choice(np.flatnonzero(data.y == c)) for c in present])
        keep = np.concatenate([first, rng.permutation(np.setdiff1d(idx, first))[: limit - len(first)]])
    out = data.subset(np.sort(keep))
    out.skipped, out.skipped_examples = data.skipped, data.skipped_examples
    return out


def stratified_split(data: LabelledImages, val_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A fixed, stratified train/validation split (same seed -> same split)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    counts = data.class_counts()
    n_val = max(int(round(len(data) * val_fraction)), 1)
    # Stratify when every class can appear on both sides; tiny data sets fall back to random.
    stratify = data.y if counts.min() >= 2 and min(n_val, len(data) - n_val) >= len(data.classes) else None
    tr, va = train_test_split(idx, test_size=n_val, stratify=stratify, random_state=seed)
    return data.subset(np.sort(tr)), data.subset(np.sort(va))
