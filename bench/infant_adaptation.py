"""Does the online loop adapt the shipped FER2013 model to infants? And at what cost?

    .venv/bin/python bench/infant_adaptation.py        # ~10-20 minutes on 2 CPU cores

Data: ../shared/data/infant_faces, split once (bench/common.infant_split, stratified, seed 0)
into a feedback stream (half) and a test set (half); FER2013 validation = the fixed split the
shipped model was trained with (fer2013_train.npz, val_fraction 0.1, seed 0).

Reported (accuracy and macro-F1 on the infant test set; FER2013 validation accuracy alongside):
1. as-is: the shipped model through a real `bentoml serve`, without and with face cropping;
2. online: the stream posted to POST /feedback (face_crop=true) in the order a ward would send
   it; the service's own updater runs partial_fit, the gate and promotion (the real path);
   a curve of infant accuracy against feedback items seen;
3. full fine-tune on the same stream (the reference): backbone fine-tuned from the shipped
   weights, the FER2013 training sample re-embedded, the head refitted; wall time;
4. the `fer` package (bench/fer_baseline.py, run in its own environment; read from its JSON).
Results: bench/results/infant_adaptation.json and .png.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import DATA, FER_CLASSES, RESULTS, bootstrap_home, infant_split, write_result  # noqa: E402

from infantino.faces import create_detector, crop_largest_face  # noqa: E402
from infantino.images import open_image, to_model_array  # noqa: E402
from infantino.settings import Settings  # noqa: E402
from registry.store import ModelRegistry  # noqa: E402
from service.process import BentoServer  # noqa: E402
from training.data import LabelledImages, load_dataset, stratified_split  # noqa: E402
from training.evaluate import classification_metrics  # noqa: E402
from training.head import fit_head  # noqa: E402
from training.model import embed_images  # noqa: E402
from training.trainer import TrainConfig, train_backbone  # noqa: E402

TOKEN = "bench-token"


def scores(pred: np.ndarray, y: np.ndarray) -> dict:
    probs = np.eye(len(FER_CLASSES))[pred]
    m = classification_metrics(probs, y, list(FER_CLASSES))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "per_class_recall": {c: m[f"recall_{c}"] for c in FER_CLASSES}}


def http_predictions(client: httpx.Client, files: list[Path], faces: bool) -> np.ndarray:
    preds = []
    for i in tqdm(range(0, len(files), 16), desc=f"POST /predict_batch (faces={faces})", leave=False):
        chunk = [base64.b64encode(f.read_bytes()).decode() for f in files[i : i + 16]]
        r = client.post("/predict_batch", json={"images_base64": chunk, "faces": faces})
        r.raise_for_status()
        for p in r.json()["predictions"]:
            best = (p["faces"][0] if p["faces"] else p["whole_image"]) if faces else p
            preds.append(FER_CLASSES.index(best["label"]))
    return np.array(preds)


def crops(files: list[Path], prep, detector) -> tuple[np.ndarray, int]:
    """Model inputs for each file: its largest face (the service's own crop), else the whole image."""
    out, found = [], 0
    for f in tqdm(files, desc="face crops", leave=False):
        img, face = crop_largest_face(open_image(f), detector)
        found += face is not None
        out.append(to_model_array(img, prep.input_size, prep.grayscale))
    return np.stack(out), found


def drain(client: httpx.Client, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while client.get("/model").json()["queue"]["queued"] >= 32 and time.time() < deadline:
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="update trigger: feedback items per update")
    ap.add_argument("--fine-tune-epochs", type=int, default=8)
    ap.add_argument("--fer-sample", type=int, default=5000, help="FER2013 training images re-embedded for the fine-tuned head")
    args = ap.parse_args()
    started = time.time()
    s_files, s_y, t_files, t_y = infant_split()
    tmp = Path(tempfile.mkdtemp(prefix="infant-bench-"))
    home = tmp / "home"
    bootstrap_home(home).check_returncode()
    registry = ModelRegistry(Settings(home=home))
    shipped_head = registry.load_head("champion")
    backbone = registry.load_backbone(shipped_head.backbone_version)
    prep = backbone.preprocessing
    assert shipped_head.classes == list(FER_CLASSES)

    # FER2013 validation: the same split the shipped model was trained with.
    fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    fer_train, fer_val = stratified_split(fer, 0.1, 0)
    fer_val_emb = embed_images(backbone.model, fer_val.x, prep, progress="embedding FER2013 validation")

    def fer_val_accuracy(head_model, emb=fer_val_emb) -> float:
        return float(np.mean(head_model.predict(emb) == fer_val.y))

    detector = create_detector("haar")
    test_x, test_found = crops(t_files, prep, detector)
    stream_x, stream_found = crops(s_files, prep, detector)
    test_emb = embed_images(backbone.model, test_x, prep)
    result: dict = {"command": "python bench/infant_adaptation.py " + " ".join(sys.argv[1:]),
                    "model": json.loads((ROOT / "infantino/default_model/model.json").read_text()),
                    "split": {"stream": len(s_files), "test": len(t_files), "seed": 0},
                    "faces_found": {"test": test_found, "stream": stream_found, "detector": "haar"}}

    env = {"INFANTINO_HOME": str(home), "INFANTINO_UPDATE_MIN_ITEMS": str(args.batch), "INFANTINO_UPDATE_INTERVAL_S": "100000",
           "INFANTINO_MODEL_POLL_S": "0.5", "INFANTINO_ADMIN_TOKEN": TOKEN, "INFANTINO_FACE_DETECTOR": "haar",
           "INFANTINO_BATCH_MAX_LATENCY_MS": "60000"}
    with BentoServer(env, log_path=tmp / "serve.log") as server, httpx.Client(base_url=server.url, timeout=120) as client:
        # 1. as-is, through the service
        as_is_whole = scores(http_predictions(client, t_files, faces=False), t_y)
        as_is_crop = scores(http_predictions(client, t_files, faces=True), t_y)
        fer_before = fer_val_accuracy(shipped_head.model)
        result["as_is"] = {"no_crop": as_is_whole, "face_crop": as_is_crop, "fer2013_val_accuracy": fer_before}
        # 2. online: the stream through POST /feedback; the service's updater does the rest
        order = np.random.default_rng(0).permutation(len(s_files))
        curve = [{"items": 0, "head_version": shipped_head.version, **scores(shipped_head.model.predict(test_emb), t_y),
                  "fer2013_val_accuracy": fer_before}]
        t0 = time.time()
        for start in tqdm(range(0, len(order), args.batch), desc="feedback stream"):
            for i in order[start : start + args.batch]:
                f = s_files[i]
                r = client.post("/feedback", files={"image": (f.name, f.read_bytes())},
                                data={"label": FER_CLASSES[s_y[i]], "face_crop": "true"})
                r.raise_for_status()
            if start + args.batch >= len(order):  # the last, partial batch: run it on demand
                client.post("/admin/update", json={"force": True}, headers={"Authorization": f"Bearer {TOKEN}"})
            drain(client)
            head = registry.load_head("champion")
            curve.append({"items": min(start + args.batch, len(order)), "head_version": head.version,
                          **scores(head.model.predict(test_emb), t_y), "fer2013_val_accuracy": fer_val_accuracy(head.model)})
            tqdm.write(f"{curve[-1]['items']:4d} items: infant accuracy {curve[-1]['accuracy']:.3f}, "
                       f"FER2013 val {curve[-1]['fer2013_val_accuracy']:.3f}, head v{head.version}")
        online_seconds = time.time() - t0
        time.sleep(1.5)  # every worker follows the champion within its poll interval
        online_http = scores(http_predictions(client, t_files, faces=True), t_y)
        versions = registry.list_versions("head")
        result["online"] = {"curve": curve, "final_via_http": online_http, "fer2013_val_accuracy": curve[-1]["fer2013_val_accuracy"],
                            "wall_seconds_including_posting": online_seconds,
                            "versions": [{"version": v["version"], "aliases": v["aliases"], "gate": v["tags"].get("gate", "")} for v in versions[1:]]}

    # 3. full fine-tune on the same stream (the reference)
    t0 = time.time()
    cfg = TrainConfig(backbone=backbone.tags.get("backbone_name", "resnet18"), image_size=prep.input_size, grayscale=prep.grayscale,
                      epochs=args.fine_tune_epochs, batch_size=32, lr=3e-4, warmup_epochs=0.5, mixup_prob=0.0, val_fraction=0.0)
    stream = LabelledImages(stream_x, s_y, list(FER_CLASSES))
    with tempfile.TemporaryDirectory() as ckpt:
        tuned = train_backbone(cfg, stream, stream, ckpt, initial=copy.deepcopy(backbone.model))
    sample = fer_train.subset(np.random.default_rng(0).permutation(len(fer_train))[: args.fer_sample])
    head = fit_head(np.concatenate([embed_images(tuned, sample.x, prep, progress="re-embedding FER2013 sample"),
                                    embed_images(tuned, stream_x, prep)]), np.concatenate([sample.y, s_y]), len(FER_CLASSES))
    fine_tune_seconds = time.time() - t0
    result["full_fine_tune"] = {**scores(head.predict(embed_images(tuned, test_x, prep)), t_y),
                                "fer2013_val_accuracy": float(np.mean(head.predict(embed_images(tuned, fer_val.x, prep)) == fer_val.y)),
                                "wall_seconds": fine_tune_seconds, "epochs": args.fine_tune_epochs, "fer_sample": args.fer_sample}

    # 4. the `fer` package, measured by bench/fer_baseline.py on the same test half
    fer_json = RESULTS / "fer_baseline.json"
    if fer_json.exists():
        base = json.loads(fer_json.read_text())
        result["fer_package"] = {"largest_face_else_whole_image": base["b_all_largest_face_else_whole_image"],
                                 "detected_faces_only": base["a_detected_faces_only"], "faces_found": base["faces_found"]}
    result["goal"] = {
        "online_beats_as_is": result["online"]["final_via_http"]["accuracy"] > as_is_crop["accuracy"],
        "fer2013_within_1_point": result["online"]["fer2013_val_accuracy"] >= fer_before - 0.01,
    }
    result["wall_seconds"] = time.time() - started
    path = write_result("infant_adaptation", result)
    plot(result, RESULTS / "infant_adaptation.png")
    print(json.dumps({k: result[k] for k in ("as_is", "goal")}, indent=2, default=str))
    print(f"online final: {result['online']['final_via_http']['accuracy']:.3f}; full fine-tune: {result['full_fine_tune']['accuracy']:.3f}; wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["online"]["curve"]
    items = [c["items"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(items, [c["accuracy"] for c in curve], "o-", label="InfantinO online (infant test)")
    ax.plot(items, [c["fer2013_val_accuracy"] for c in curve], "s--", color="grey", label="InfantinO online (FER2013 val)")
    ax.axhline(result["full_fine_tune"]["accuracy"], color="tab:green", ls=":", label="full fine-tune (infant test)")
    if "fer_package" in result:
        ax.axhline(result["fer_package"]["largest_face_else_whole_image"]["accuracy"], color="tab:red", ls="-.", label="`fer` package (infant test)")
    ax.set_xlabel("feedback items seen")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Infant adaptation: accuracy vs feedback (7 classes, 233 test images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
