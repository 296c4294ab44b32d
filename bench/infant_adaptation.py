"""Does the online loop adapt the shipped FER2013 model to infants? And at what cost?

    .venv/bin/python -m bench.infant_adaptation        # ~10-20 minutes on 2 CPU cores

Data: ../shared/data/infant_faces, split once (bench/common.infant_split, stratified, seed 0)
into a feedback stream (half) and a test set (half); FER2013 validation = the fixed split the
shipped model was trained with (fer2013_train.npz, val_fraction 0.1, seed 0). Everything runs
with the shipped defaults (detector, framing, update and gate settings): no overrides but the
admin token (to run the last, partial batch) and a short poll interval.

Reported (accuracy, macro-F1 and three-way valence on the infant test set; FER2013 validation
accuracy alongside):
1. as-is: the shipped model through a real `bentoml serve`, on the whole image and with faces;
Every infant photo is sent naming its domain (`domain=infant`, as a clinical deployment would), so
feedback teaches the model the infant class mix for infant requests only (heads/domain.py); the
final accuracies are also reported without naming it. FER2013 faces are the training domain.

2. online: the stream posted to POST /feedback (face_crop=true) in a fixed random order; the
   service's own updater and gate do the rest (the real path); a curve of infant accuracy
   against feedback items seen;
3. adapted: `infantino adapt` (adaptation/backbone.py) fine-tunes the backbone from the stored
   feedback images, gated; the service follows the new champion pair (if the gate passed);
4. full fine-tune on the same stream (a reference, not the product's path): the backbone
   fine-tuned from the shipped weights on the stream with FER2013 replay, the head refitted;
5. the `fer` package (bench/fer_baseline.py, run in its own environment; read from its JSON).
Results: bench/results/infant_adaptation.json and .png.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from scipy.stats import binomtest
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import (
    BENCH,
    DATA,
    DOMAIN,
    FER_CLASSES,
    RESULTS,
    bootstrap_home,
    infant_split,
    write_result,
)
from heads import create_head, predict_proba
from infantino.faces import create_detector
from infantino.images import open_image
from infantino.regions import find_regions
from infantino.settings import Settings
from registry.shipped import shipped_meta
from registry.store import CHAMPION, ModelRegistry
from testkit.server import BentoServer
from training.data import LabelledImages, load_dataset, stratified_split
from training.evaluate import classification_metrics
from training.trainer import TrainConfig, train_backbone

TOKEN = "bench-token"
# Three-way valence, as infant-expression studies report it (surprise counted as positive).
VALENCE = {"happy": "positive", "surprise": "positive", "neutral": "neutral",
           "angry": "negative", "disgust": "negative", "fear": "negative", "sad": "negative"}


def scores(pred: np.ndarray, y: np.ndarray) -> dict:
    probs = np.eye(len(FER_CLASSES))[pred]
    m = classification_metrics(probs, y, list(FER_CLASSES))
    valence = np.mean([VALENCE[FER_CLASSES[p]] == VALENCE[FER_CLASSES[t]] for p, t in zip(pred, y)])
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "valence_accuracy": float(valence),
            "per_class_recall": {c: m[f"recall_{c}"] for c in FER_CLASSES}}


def paired_gain(before: np.ndarray, after: np.ndarray, y: np.ndarray, resamples: int = 10_000) -> dict:
    """``after``'s accuracy over ``before``'s on the same photos, in points, with how sure it is: a 95%
    percentile-bootstrap interval (photos resampled) and McNemar's exact two-sided test on the photos
    one gets right and the other wrong. With 233 photos a gain is known to a few points either way."""
    gained = (after == y).astype(float) - (before == y)
    boots = gained[np.random.default_rng(0).integers(0, len(gained), (resamples, len(gained)))].mean(1)
    won, lost = int(np.sum(gained > 0)), int(np.sum(gained < 0))
    return {"points": 100 * float(gained.mean()), "ci95_points": [100 * float(q) for q in np.percentile(boots, [2.5, 97.5])],
            "won": won, "lost": lost, "mcnemar_p": float(binomtest(won, won + lost, 0.5).pvalue) if won + lost else 1.0}


def http_predictions(client: httpx.Client, files: list[Path], faces: bool, domain: str | None = DOMAIN) -> tuple[np.ndarray, int]:
    preds, found = [], 0
    for i in tqdm(range(0, len(files), 16), desc=f"POST /predict_batch (faces={faces})", leave=False):
        chunk = [base64.b64encode(f.read_bytes()).decode() for f in files[i : i + 16]]
        r = client.post("/predict_batch", json={"images_base64": chunk, "faces": faces, **({"domain": domain} if domain else {})})
        r.raise_for_status()
        for p in r.json()["predictions"]:
            if faces:
                found += bool(p["faces"])
                p = p["faces"][0] if p["faces"] else p["whole_image"]
            preds.append(FER_CLASSES.index(p["label"]))
    return np.array(preds), found


def infant_predictions(head, embeddings: np.ndarray) -> np.ndarray:
    """``head``'s classes for infant requests (naming their domain, as the service is asked)."""
    return predict_proba(head, embeddings, DOMAIN).argmax(1)


def model_inputs(files: list[Path], prep, detector) -> np.ndarray:
    """Each file's largest face at the model's framing (the service's own regions), else the whole image."""
    return np.stack([find_regions(open_image(f), prep, "largest", detector, keep_images=False)[0].array
                     for f in tqdm(files, desc="face crops", leave=False)])


def drain(client: httpx.Client, below: int, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while client.get("/model").json()["queue"]["queued"] >= below and time.time() < deadline:
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fine-tune-epochs", type=int, default=8)
    ap.add_argument("--fer-sample", type=int, default=5000, help="FER2013 training images replayed and re-embedded by the fine-tune")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed results")
    args = ap.parse_args()
    if args.plot_only:
        return plot(json.loads((RESULTS / "infant_adaptation.json").read_text()), RESULTS / "infant_adaptation.png")
    started = time.time()
    s_files, s_y, t_files, t_y = infant_split()
    tmp = Path(tempfile.mkdtemp(prefix="infant-bench-"))
    home = tmp / "home"
    bootstrap_home(home).check_returncode()
    settings = Settings(home=home)
    registry = ModelRegistry(settings)
    shipped = registry.load_head(CHAMPION)
    backbone = registry.load_backbone(shipped.backbone_version)
    prep = backbone.preprocessing
    _, fer_val_emb = registry.load_embeddings(shipped)  # the gate's own FER2013 validation embeddings
    batch = settings.online.update_min_items

    def fer_val_accuracy(head_model) -> float:
        return float(np.mean(head_model.predict(fer_val_emb.x) == fer_val_emb.y))

    detector = create_detector(settings.faces.face_detector)
    test_x = model_inputs(t_files, prep, detector)
    test_emb = embed_images(backbone.model, test_x, prep, stage_features=True)  # served rows, as the service reads them
    result: dict = {"command": "python -m bench.infant_adaptation " + " ".join(sys.argv[1:]), "model": shipped_meta(),
                    "split": {"stream": len(s_files), "test": len(t_files), "seed": 0},
                    "settings": {"face_detector": settings.faces.face_detector, "face_margin": prep.face_margin,
                                 "update_min_items": batch, **settings.online.model_dump()},
                    "valence": VALENCE}

    env = {"INFANTINO_HOME": str(home), "INFANTINO_MODEL_POLL_S": "0.5", "INFANTINO_ADMIN_TOKEN": TOKEN,
           "INFANTINO_BATCH_MAX_LATENCY_MS": "60000"}
    with BentoServer(env, log_path=tmp / "serve.log") as server, httpx.Client(base_url=server.url, timeout=300) as client:
        # 1. as-is, through the service
        whole, _ = http_predictions(client, t_files, faces=False)
        with_faces, found = http_predictions(client, t_files, faces=True)
        fer_before = fer_val_accuracy(shipped.model)
        result["as_is"] = {"whole_image": scores(whole, t_y), "faces": scores(with_faces, t_y), "faces_found_test": found,
                           "fer2013_val_accuracy": fer_before}
        # 2. online: the stream through POST /feedback; the service's updater does the rest
        order = np.random.default_rng(0).permutation(len(s_files))
        curve = [{"items": 0, "head_version": shipped.version, **scores(infant_predictions(shipped.model, test_emb), t_y),
                  "fer2013_val_accuracy": fer_before}]
        t0 = time.time()
        for start in tqdm(range(0, len(order), batch), desc="feedback stream"):
            for i in order[start : start + batch]:
                f = s_files[i]
                r = client.post("/feedback", files={"image": (f.name, f.read_bytes())},
                                data={"label": FER_CLASSES[s_y[i]], "face_crop": "true", "domain": DOMAIN})
                r.raise_for_status()
            if start + batch >= len(order):  # the last, partial batch: run it on demand
                client.post("/admin/update", json={"force": True}, headers={"Authorization": f"Bearer {TOKEN}"})
            drain(client, below=1 if start + batch >= len(order) else batch)
            head = registry.load_head(CHAMPION)
            curve.append({"items": min(start + batch, len(order)), "head_version": head.version,
                          **scores(infant_predictions(head.model, test_emb), t_y), "fer2013_val_accuracy": fer_val_accuracy(head.model)})
            tqdm.write(f"{curve[-1]['items']:4d} items: infant accuracy {curve[-1]['accuracy']:.3f}, "
                       f"FER2013 val {curve[-1]['fer2013_val_accuracy']:.3f}, head v{head.version}")
        online_seconds = time.time() - t0
        time.sleep(1.5)  # every worker follows the champion within its poll interval
        online_http, _ = http_predictions(client, t_files, faces=True)
        online_no_domain, _ = http_predictions(client, t_files, faces=True, domain=None)
        versions = registry.list_versions("head")
        result["online"] = {
            "curve": curve, "final_via_http": scores(online_http, t_y), "final_via_http_without_domain": scores(online_no_domain, t_y),
            "fer2013_val_accuracy": curve[-1]["fer2013_val_accuracy"],
            "wall_seconds_including_posting": online_seconds,
            "versions": [{"version": v["version"], "aliases": v["aliases"], "gate": v["tags"].get("gate", "")} for v in versions[1:]],
        }

        # 3. backbone adaptation from the same stored feedback images (`infantino adapt`, as an operator
        #    runs it beside the service; adaptation/backbone.py), then the served pair through HTTP
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "cli.main", "adapt"], check=False, cwd=BENCH.parent, text=True, capture_output=True,
                              env={**os.environ, "INFANTINO_HOME": str(home)})
        (tmp / "adapt.log").write_text(proc.stderr)
        if proc.returncode:
            raise SystemExit(f"infantino adapt failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout)
        if report["promoted"]:  # every worker follows the new champion pair within its poll interval
            deadline = time.time() + 120
            while client.get("/model").json()["head"]["version"] != report["head_version"] and time.time() < deadline:
                time.sleep(0.5)
        adapted_http, _ = http_predictions(client, t_files, faces=True)
        adapted_no_domain, _ = http_predictions(client, t_files, faces=True, domain=None)
        result["adapted"] = {**scores(adapted_http, t_y), "without_domain": scores(adapted_no_domain, t_y), "report": report,
                             "wall_seconds": time.time() - t0,
                             "fer2013_val_accuracy": float(registry.version_info("head", report["head_version"]).tags["val_accuracy"]),
                             "served": "adapted pair" if report["promoted"] else "online head (the gate refused the adapted pair)"}
        # The adapted pair itself on the test half, served or not (reported, never used to choose anything).
        pair_head = registry.load_head(report["head_version"]).model
        pair_backbone = registry.load_backbone(report["backbone_version"])
        result["adapted"]["pair_itself"] = scores(infant_predictions(pair_head, embed_images(pair_backbone.model, test_x, prep, stage_features=True)), t_y)
        tqdm.write(f"after `infantino adapt` (interpolation weight {report['interpolation_weight']}): "
                   f"infant accuracy {result['adapted']['accuracy']:.3f}; gate: {report['verdict']}")

    # 4. full fine-tune on the same stream (a reference): backbone from the shipped weights, FER2013 replay, head refitted
    t0 = time.time()
    fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    fer_train, fer_val = stratified_split(fer, 0.1, 0)
    sample = fer_train.subset(np.random.default_rng(0).permutation(len(fer_train))[: args.fer_sample])
    stream_x = model_inputs(s_files, prep, detector)
    cfg = TrainConfig(backbone=backbone.tags.get("backbone_name", "resnet18"), image_size=prep.input_size, grayscale=prep.grayscale,
                      face_margin=prep.face_margin, epochs=args.fine_tune_epochs, batch_size=64, lr=1e-4, warmup_epochs=0.5,
                      mixup_prob=0.0, balance="none", val_fraction=0.0)
    mixed = LabelledImages(np.concatenate([stream_x, sample.x[: 4 * len(stream_x)]]),
                           np.concatenate([s_y, sample.y[: 4 * len(stream_x)]]), list(FER_CLASSES))
    with tempfile.TemporaryDirectory() as ckpt:
        tuned = train_backbone(cfg, mixed, mixed.subset(np.arange(8)), ckpt, initial=copy.deepcopy(backbone.model).train())
    x = np.concatenate([embed_images(tuned, sample.x, prep), embed_images(tuned, stream_x, prep)])
    y = np.concatenate([sample.y, s_y])
    w_head = create_head("mlp").fit(x, y, classes=np.arange(len(FER_CLASSES)))
    result["full_fine_tune"] = {**scores(w_head.predict(embed_images(tuned, test_x, prep)), t_y),
                                "fer2013_val_accuracy": float(np.mean(w_head.predict(embed_images(tuned, fer_val.x, prep)) == fer_val.y)),
                                "wall_seconds": time.time() - t0, "epochs": args.fine_tune_epochs, "fer_sample": args.fer_sample}

    # 5. the `fer` package, measured by bench/fer_baseline.py on the same test half
    fer_json = RESULTS / "fer_baseline.json"
    if fer_json.exists():
        base = json.loads(fer_json.read_text())
        per_image = base.get("per_image", [])
        result["fer_package"] = {"largest_face_else_whole_image": base["b_all_largest_face_else_whole_image"],
                                 "faces_found": base["faces_found"]}
        if per_image:
            result["fer_package"]["valence_accuracy"] = float(np.mean([VALENCE[p["pred"]] == VALENCE[p["label"]] for p in per_image]))
    as_is = result["as_is"]["faces"]["accuracy"]
    final = result["adapted"]["accuracy"]  # what the service answers after the whole loop (online head, then adaptation)
    result["goal"] = {
        "as_is_ahead_of_fer_package": "fer_package" in result
                                      and as_is > result["fer_package"]["largest_face_else_whole_image"]["accuracy"],
        "online_gain_points": 100 * (final - as_is),
        "online_gain": paired_gain(with_faces, adapted_http, t_y),
        "online_at_least_8_points_over_as_is": final >= as_is + 0.08,
        "online_head_gain_points": 100 * (result["online"]["final_via_http"]["accuracy"] - as_is),
        "fer2013_within_1_point": (result["adapted"]["fer2013_val_accuracy"] if result["adapted"]["report"]["promoted"]
                                   else result["online"]["fer2013_val_accuracy"]) >= fer_before - 0.01,
        "faces_found_at_least_90_percent": result["as_is"]["faces_found_test"] >= 0.9 * len(t_files),
    }
    result["wall_seconds"] = time.time() - started
    path = write_result("infant_adaptation", result)
    plot(result, RESULTS / "infant_adaptation.png")
    print(json.dumps({k: result[k] for k in ("goal",)}, indent=2, default=str))
    gain = result["goal"]["online_gain"]
    print(f"gain {gain['points']:+.1f} points (95% interval {gain['ci95_points'][0]:+.1f} to {gain['ci95_points'][1]:+.1f}; "
          f"won {gain['won']}, lost {gain['lost']}, McNemar p {gain['mcnemar_p']:.2g})")
    print(f"as-is {as_is:.3f}; online head {result['online']['final_via_http']['accuracy']:.3f}; after adapt {final:.3f}; full fine-tune {result['full_fine_tune']['accuracy']:.3f}; wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["online"]["curve"]
    items = [c["items"] for c in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(items, [c["accuracy"] for c in curve], "o-", label="InfantinO online: infant test, 7 classes")
    ax.plot(items, [c["valence_accuracy"] for c in curve], "^-", color="tab:purple", label="InfantinO online: infant test, valence (3-way)")
    ax.plot(items, [c["fer2013_val_accuracy"] for c in curve], "s--", color="grey", label="InfantinO online: FER2013 validation")
    adapted = result["adapted"]
    ax.plot([items[-1]], [adapted["accuracy"]], "*", ms=14, color="tab:orange",
            label=f"after `infantino adapt` (backbone fine-tuned; {'promoted' if adapted['report']['promoted'] else 'refused by the gate'})")
    ax.plot([items[-1]], [adapted["valence_accuracy"]], "*", ms=11, color="tab:purple")
    ax.plot([items[-1]], [adapted["fer2013_val_accuracy"]], "*", ms=11, color="grey")
    ax.axhline(result["full_fine_tune"]["accuracy"], color="tab:green", ls=":", label="full fine-tune (infant test, 7 classes)")
    if "fer_package" in result:
        ax.axhline(result["fer_package"]["largest_face_else_whole_image"]["accuracy"], color="tab:red", ls="-.",
                   label="`fer` package (infant test, 7 classes)")
    ax.set_xlabel("feedback items seen (POST /feedback)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Infant adaptation through the real service ({result['split']['test']} test photos)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
