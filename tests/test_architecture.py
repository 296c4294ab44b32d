"""The architecture holds: the import-linter contracts in pyproject.toml are kept, and they do
catch a forbidden import (checked on a copy of the tree with one added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from testkit.server import PROJECT_ROOT

PACKAGES = ["cli", "service", "online", "training", "registry", "store", "backbones", "heads", "infantino"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}  # analyse this tree, not the installed one
    return subprocess.run([str(exe), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_are_kept():
    out = lint_imports(PROJECT_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_forbidden_import_breaks_them(tmp_path):
    for name in PACKAGES:
        shutil.copytree(PROJECT_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    store = tmp_path / "registry" / "store.py"
    store.write_text(store.read_text() + "\nfrom training.pipeline import train_and_register  # the registry reaching up\n")
    gate = tmp_path / "online" / "gate.py"
    gate.write_text(gate.read_text() + "\nimport torch  # the online loop running a network itself\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "registry is not allowed to import training" in out.stdout
    assert "online.gate -> torch" in out.stdout
