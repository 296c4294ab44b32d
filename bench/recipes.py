"""Which training recipe gives the best FER2013 model a 2-core CPU can train? Measured, not guessed.

    .venv/bin/python -m bench.recipes                 # every recipe not yet in the results file
    .venv/bin/python -m bench.recipes --only r18-64-adamw --epochs 6
    .venv/bin/python -m bench.recipes --only cont-sgd-plateau-natural-long --resume   # go on after an interruption
    .venv/bin/python -m bench.recipes --record-run RUN_ID cont-shipped-30   # add an `infantino train` run from MLflow

Each recipe trains a backbone from scratch (or continues the shipped model) for the same short
budget of epochs on the FER2013 training split, then fits the MLP head on its embeddings and
scores backbone + head on the validation split (the split `infantino train` and `infantino
evaluate --holdout 0.1` use). Reported per recipe: validation accuracy after every epoch,
the final served accuracy (backbone + head), seconds per epoch and training images per second.
Short budgets rank recipes; they do not predict the accuracy of a long run. Checkpoints (and the
curve so far) are written every epoch under --out-dir, so a long recipe survives interruptions.
Results accumulate in bench/results/recipes.json (a rerun skips recipes already measured);
the curves are drawn in bench/results/recipes.png (`--plot-only` redraws them). `--record-run`
adds a run that `infantino train` logged to MLflow (MLFLOW_TRACKING_URI or $INFANTINO_HOME's
registry), e.g. the one that trained the shipped model, from its per-epoch metrics. `--ensemble`
scores registered pairs with their probabilities averaged, `--soup` registered backbones with their
weights averaged (both recorded under --name).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import DATA, FER_CLASSES, RESULTS, write_result
from backbones.inference import embed_images
from registry.shipped import shipped_backbone
from training.data import load_dataset, stratified_split
from training.pipeline import fit_head
from training.trainer import TrainConfig, train_backbone

BASE = dict(mixup_prob=0.3, threads=2)
# The model the recorded continuations ("cont-...") started from: the one shipped until 2026-12-05
# (30 epochs, 60.6 %). Its successor, shipped since, is the last of the lineage drawn in bold.
FIRST_SHIPPED_EPOCHS, FIRST_SHIPPED_ACCURACY = 30, 0.6056
SHIPPED_LINEAGE, SHIPPED_ACCURACY = ("scratch-distill-40", "scratch-distill-40+restart-24"), 0.6523
# Recipes that continue the shipped model (resnet18, 64 px, 60.6 % after 30 epochs) instead of starting
# from scratch: what a further run from today's model would gain, per epoch, by optimiser and sampling.
CONTINUE = dict(init="shipped", backbone="resnet18", image_size=64, warmup_epochs=0.3)
RECIPES: dict[str, dict] = {
    # architecture and input size, the current recipe otherwise (AdamW + cosine, balanced sampler)
    "r18-64-adamw": dict(backbone="resnet18", image_size=64),
    "r18-48-adamw": dict(backbone="resnet18", image_size=48),
    "r18-96-adamw": dict(backbone="resnet18", image_size=96),  # more pixels per face (FER2013's 48 px upscaled)
    "vgg11bn-48-sgd": dict(backbone="vgg11_bn", image_size=48, backbone_args={"mlp_ratio": 0.125}, drop_path_rate=0.0,
                           optimizer="sgd", lr=0.01, weight_decay=1e-4),
    # optimiser and sampling, resnet18 at 64 px
    "r18-64-sgd": dict(backbone="resnet18", image_size=64, optimizer="sgd", lr=0.01, weight_decay=1e-4),
    "r18-64-adamw-natural": dict(backbone="resnet18", image_size=64, balance="none"),
    # continuing the shipped model, 3 epochs each
    "cont-adamw-cosine-balanced": dict(CONTINUE, lr=3e-4),
    "cont-adamw-cosine-natural": dict(CONTINUE, lr=3e-4, balance="none"),
    "cont-sgd-plateau-natural": dict(CONTINUE, optimizer="sgd", lr=0.01, weight_decay=1e-4, schedule="plateau",
                                     plateau_patience=1, balance="none"),
    # the longer run of the continuation the short runs favoured (natural sampling, AdamW + cosine: 61.3% at its 3rd epoch)
    "cont-adamw-cosine-natural-long": dict(CONTINUE, lr=3e-4, balance="none", epochs=14),
}


def run(name: str, recipe: dict, epochs: int, data_cache: dict, out: Path, resume: bool) -> dict:
    """Train ``recipe`` with checkpoints in ``out`` (a run interrupted there continues with ``resume``)."""
    recipe = dict(recipe)
    initial = shipped_backbone().train() if recipe.pop("init", None) == "shipped" else None
    epochs = recipe.pop("epochs", epochs)
    cfg = TrainConfig(**{**BASE, **recipe, "epochs": epochs})
    if cfg.image_size not in data_cache:
        fer = load_dataset(DATA / "fer2013_train.npz", cfg.image_size, cfg.grayscale, FER_CLASSES)
        data_cache[cfg.image_size] = stratified_split(fer, 0.1, 0)
    train, val = data_cache[cfg.image_size]
    out.mkdir(parents=True, exist_ok=True)
    curve_path = out / "curve.json"  # beside the checkpoint: the curve survives an interruption with it
    curve = json.loads(curve_path.read_text()) if resume and curve_path.exists() else []
    last = time.time()

    def on_epoch(epoch: int, metrics: dict) -> None:
        nonlocal last
        curve.append({"epoch": epoch + 1, **metrics, "seconds": time.time() - last})
        last = time.time()
        curve_path.write_text(json.dumps(curve))

    model = train_backbone(cfg, train, val, out, resume=resume, initial=initial, on_epoch=on_epoch)
    timed = [c["seconds"] for c in curve if "seconds" in c]
    prep = cfg.preprocessing
    head = fit_head(embed_images(model, train.x, prep), train.y, len(FER_CLASSES))
    served = float(np.mean(head.predict(embed_images(model, val.x, prep)) == val.y))
    return {"recipe": recipe, "epochs": epochs, "curve": curve, "val_accuracy_backbone_head": served,
            "seconds_per_epoch": float(np.mean(timed)), "train_images_per_s": len(train) / float(np.mean(timed)),
            "params_millions": sum(p.numel() for p in model.parameters()) / 1e6}


def recorded_run(run_id: str) -> dict:
    """A row of the results for an `infantino train` run in MLflow: its params, per-epoch curve, served accuracy, cost."""
    from mlflow.tracking import MlflowClient

    from infantino.settings import get_settings
    from registry.store import ModelRegistry

    ModelRegistry(get_settings())  # points MLflow at the configured tracking URI
    client = MlflowClient()
    run = client.get_run(run_id)
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, f"epoch_{key}")}
               for key in ("train_loss", "val_accuracy")}
    curve = [{"epoch": step + 1, "train_loss": history["train_loss"].get(step), "val_accuracy": acc}
             for step, acc in sorted(history["val_accuracy"].items())]
    seconds = run.data.metrics["train_seconds"] / max(len(curve), 1)
    return {"recipe": {**run.data.params, "mlflow_run": run_id},
            "epochs": len(curve), "curve": curve, "val_accuracy_backbone_head": run.data.metrics["val_accuracy"],
            "seconds_per_epoch": seconds, "train_images_per_s": float(run.data.params.get("n_train", 0)) / seconds}


def ensemble(versions: list[str]) -> dict:
    """Would distilling an ensemble of registered models pay? Their served pairs (backbone + head) scored on
    the validation split alone and with their probabilities averaged."""
    from infantino.settings import get_settings
    from registry.store import ModelRegistry
    from training.evaluate import expected_calibration_error

    registry = ModelRegistry(get_settings())
    splits: dict = {}  # the validation split at each input size
    probs = {}
    for version in versions:
        head = registry.load_head(version)
        backbone = registry.load_backbone(head.backbone_version)
        prep = backbone.preprocessing
        if prep.input_size not in splits:
            fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
            splits[prep.input_size] = stratified_split(fer, 0.1, 0)[1]
        val = splits[prep.input_size]
        probs[version] = head.model.predict_proba(embed_images(backbone.model.eval(), val.x, prep))
    probs["+".join(versions)] = np.mean(list(probs.values()), axis=0)
    return {name: {"accuracy": float(np.mean(p.argmax(1) == val.y)), "ece": expected_calibration_error(p, val.y)}
            for name, p in probs.items()}


def soup(versions: list[str]) -> dict:
    """A uniform weight soup: the mean of the weights (and normalisation statistics) of registered
    backbones of one lineage (each continued from the one before, so their weights average
    meaningfully), with a head fitted on its training embeddings as `infantino train` fits one,
    scored on the validation split: one network, so it keeps the product's contract, where an
    ensemble (``ensemble``) costs a pass per member."""
    import copy

    from infantino.settings import get_settings
    from registry.store import ModelRegistry
    from training.adapt import classifier_proba

    registry = ModelRegistry(get_settings())
    members = [registry.load_backbone(version) for version in versions]
    prep = members[0].preprocessing
    if any(m.preprocessing != prep for m in members):
        raise SystemExit(f"--soup {' '.join(versions)}: the backbones read different images ({[m.preprocessing for m in members]})")
    states = [m.model.state_dict() for m in members]
    mean = {key: (sum(s[key].float() for s in states) / len(states)).to(value.dtype) if value.is_floating_point() else value
            for key, value in states[0].items()}
    model = copy.deepcopy(members[0].model)
    model.load_state_dict(mean)
    model.eval()
    fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    train, val = stratified_split(fer, 0.1, 0)
    val_emb = embed_images(model, val.x, prep, progress="soup (validation)")
    head = fit_head(embed_images(model, train.x, prep, progress="soup (train)"), train.y, len(FER_CLASSES))
    return {"backbone_versions": versions,
            "classifier_accuracy": float(np.mean(classifier_proba(model, val_emb).argmax(1) == val.y)),
            "val_accuracy_backbone_head": float(np.mean(head.predict_proba(val_emb).argmax(1) == val.y))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--continue-epochs", type=int, default=3, help="epochs of the recipes that continue the shipped model")
    ap.add_argument("--only", nargs="*", help="recipe names (default: all not yet measured)")
    ap.add_argument("--again", action="store_true", help="measure recipes already in the results file again")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the results file")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "infantino-recipes",
                    help="checkpoints, one folder per recipe (kept; never committed)")
    ap.add_argument("--resume", action="store_true", help="continue interrupted recipes from their checkpoints in --out-dir")
    ap.add_argument("--record-run", nargs=2, metavar=("RUN_ID", "NAME"), help="add an `infantino train` run from MLflow as NAME")
    ap.add_argument("--continues", metavar="NAME", help="with --record-run: the recorded recipe the run continued (--init-from), "
                                                          "so its curve is drawn after that one's epochs")
    ap.add_argument("--ensemble", nargs="+", metavar="HEAD_VERSION",
                    help="score these registered head versions (with their backbones) alone and averaged (does distillation pay?)")
    ap.add_argument("--soup", nargs="+", metavar="BACKBONE_VERSION",
                    help="score the mean of these registered backbones' weights (one lineage) with a fitted head")
    ap.add_argument("--name", help="what the ensemble or soup is recorded as (version numbers differ between registries; "
                                   "default: the versions joined by +)")
    args = ap.parse_args()
    path = RESULTS / "recipes.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results, ensembles, soups = saved.get("recipes", {}), saved.get("ensembles", {}), saved.get("soups", {})
    if args.soup:
        soups[args.name or "+".join(args.soup)] = scores = soup(args.soup)
        print(json.dumps(scores, indent=1))
        return write_result("recipes", {**saved, "soups": soups})
    if args.ensemble:
        ensembles[args.name or "+".join(args.ensemble)] = scores = ensemble(args.ensemble)
        print(json.dumps(scores, indent=1))
        return write_result("recipes", {**saved, "ensembles": ensembles})
    if args.record_run:
        results[args.record_run[1]] = recorded_run(args.record_run[0])
        if args.continues:
            results[args.record_run[1]]["continues"] = args.continues
        write_result("recipes", {**saved, "command": "python bench/recipes.py", "recipes": results})
    if args.plot_only or args.record_run:
        return plot(results, RESULTS / "recipes.png")
    cache: dict = {}
    for name in args.only or list(RECIPES):
        if name in results and not args.again:
            continue
        print(f"== {name}", flush=True)
        epochs = args.continue_epochs if RECIPES[name].get("init") else args.epochs
        results[name] = run(name, RECIPES[name], epochs, cache, args.out_dir / name, args.resume)
        print(f"{name}: {results[name]['val_accuracy_backbone_head']:.4f} in {results[name]['seconds_per_epoch']:.0f} s/epoch", flush=True)
        write_result("recipes", {**saved, "command": "python bench/recipes.py", "recipes": results})
        plot(results, RESULTS / "recipes.png")


def plot(results: dict, path) -> None:
    """Validation accuracy (the training classifier) after every epoch, one line per recipe; the
    recipes that continue the shipped model start from its 30 epochs, a recorded run that continued
    another recorded recipe ("continues") from that one's last epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def first_epoch(name: str) -> int:  # epochs the recipe's starting model had already trained
        r = results[name]
        if r.get("continues") in results:
            return first_epoch(r["continues"]) + results[r["continues"]]["epochs"]
        return FIRST_SHIPPED_EPOCHS if r["recipe"].get("init") == "shipped" or name.startswith("cont-") else 0

    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab20").colors
    for i, (name, r) in enumerate(results.items()):
        epochs = [first_epoch(name) + c["epoch"] for c in r["curve"]]
        shipped = name in SHIPPED_LINEAGE
        ax.plot(epochs, [100 * c["val_accuracy"] for c in r["curve"]], "o-", ms=3 if shipped else 2, lw=2.5 if shipped else 1,
                color="black" if shipped else colours[i % len(colours)], zorder=3 if shipped else 2,
                label=f"{name}{' (shipped lineage)' if shipped else ''}: {100 * r['val_accuracy_backbone_head']:.1f}% served, "
                      f"{r['seconds_per_epoch'] / 60:.1f} min/epoch")
    ax.axhline(100 * SHIPPED_ACCURACY, color="black", ls="--", lw=1,
               label=f"shipped model since 2026-12-05 ({100 * SHIPPED_ACCURACY:.1f}%, its head answering as its classifier)")
    ax.axhline(100 * FIRST_SHIPPED_ACCURACY, color="grey", ls=":",
               label=f"model shipped before ({100 * FIRST_SHIPPED_ACCURACY:.1f}%, {FIRST_SHIPPED_EPOCHS} epochs)")
    ax.axhline(65, color="tab:red", ls=":", label="issue 12's goal (65%)")
    ax.set_xlabel("epoch (continuations counted after the model they continued)")
    ax.set_ylabel("FER2013 validation accuracy (%)")
    ax.set_title("Training recipes on 2 CPU cores (bench/recipes.py)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
