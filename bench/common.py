"""Shared helpers for the infant benchmarks in bench/.

Holds the data location, the FER class order, the one fixed stream/test split of
the infant photos that every infant benchmark uses, and a helper that writes a
benchmark's result to bench/results/<name>.json with a note of the machine.

Not run on its own; a benchmark imports it (``from bench.common import ...``), the
benchmarks being run from the project root as ``python -m bench.<name>``. It imports
nothing from the project (only the standard library, numpy and scikit-learn), so a
benchmark run with another venv that lacks the project (bench/fer_baseline.py) can
use it too (infantino.machine, standard library only, is found in the project root).

Quick check of the split (any python with numpy and scikit-learn, from the project root)::

    python -m bench.common
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from infantino.machine import machine_info

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# <project root>/../shared/data
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
DOMAIN = "infant"  # the domain every infant request and feedback item names (heads/domain.py)


def infant_files(root: Path | str = DATA / "infant_faces") -> tuple[list[Path], np.ndarray]:
    """All files under root/<class>/ for the 7 FER classes, sorted by path.

    Returns (files, labels) where labels[i] is the index of files[i]'s class in
    FER_CLASSES. Hidden files (names starting with '.') and sub-folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"infant data folder not found: {root} (expected {root}/<class>/ "
            f"for the classes {', '.join(FER_CLASSES)})"
        )
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(FER_CLASSES):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"infant class folder not found: {folder}")
        items += [(p, label) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")]
    if not items:
        raise FileNotFoundError(f"no files under the class folders of {root}")
    items.sort(key=lambda t: str(t[0]))
    files = [p for p, _ in items]
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    return files, labels


def infant_split(
    root: Path | str = DATA / "infant_faces", seed: int = 0
) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    """The fixed stratified half/half split shared by every infant benchmark.

    Returns (stream_files, stream_labels, test_files, test_labels). Keep this
    exactly as it is: changing it changes every infant benchmark's test set.
    """
    from sklearn.model_selection import train_test_split

    files, labels = infant_files(root)
    s_f, t_f, s_y, t_y = train_test_split(
        files, labels, test_size=0.5, stratify=labels, random_state=seed
    )
    return list(s_f), np.asarray(s_y), list(t_f), np.asarray(t_y)


def bootstrap_home(home: Path) -> "subprocess.CompletedProcess[str]":
    """Register the shipped model (registry/default_model) as champion in a fresh INFANTINO_HOME."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "cli.main", "bootstrap"], cwd=BENCH.parent,
                          env={**os.environ, "INFANTINO_HOME": str(home)}, capture_output=True, text=True)


def write_result(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json (indent 2, plus a "machine" entry); return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    data = dict(payload)
    data["machine"] = machine_info()

    def _default(o):  # numpy scalars/arrays, paths
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    out.write_text(json.dumps(data, indent=2, default=_default) + "\n")
    return out


if __name__ == "__main__":
    s_f, s_y, t_f, t_y = infant_split()
    print(f"data: {DATA / 'infant_faces'}")
    print(f"stream: {len(s_f)}  test: {len(t_f)}")
    for i, c in enumerate(FER_CLASSES):
        print(f"  {c:9s} stream {int((s_y == i).sum()):3d}  test {int((t_y == i).sum()):3d}")
