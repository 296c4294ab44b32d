"""How often does the gate refuse the interpolation weight `infantino adapt` chose? Measured on FER2013 only.

    .venv/bin/python -m bench.interpolation_choice                       # ~3 minutes on 2 CPU cores
    .venv/bin/python -m bench.interpolation_choice --model registry/candidates/scratch-distill-40-restart-24

`infantino adapt` (adaptation/backbone.py) picks the interpolation weight between the champion's
backbone and its fine-tune on one half of the training data's validation split, and the gate
judges the pick on the other half (allowed drop: gate_max_val_drop, 1 point). A pick that looks
safe on one half and is refused on the other wastes the adaptation. This bench fine-tunes the
model as the job does (all the infant feedback half's face crops, the job's defaults), scores
every weight of the grid on the whole validation split once, then re-runs the choice on many
random halvings: for each rule, the mean weight picked and the share of halvings where the gate's
half sees a drop over the allowance. Rules: the point estimate within half the allowance (the
rule until 2026-12-05) and the confidence bound of ``safe_weight`` at several z. No infant test
photo is read, and the infant side is not scored here (bench/feature_adaptation.py does that,
by weight, on the feedback half).
Results: bench/results/interpolation_choice.json (``--model DIR``: interpolation_choice_<DIR's name>.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from adaptation.backbone import drop_and_error, safe_weight
from backbones.inference import embed_images
from bench.common import DATA, infant_split, write_result
from bench.feature_adaptation import crops
from infantino.images import Preprocessing
from registry.shipped import DEFAULT_DIR, shipped_backbone, shipped_head, shipped_meta
from training.adapt import AdaptConfig, classifier_proba, fine_tune, interpolate
from training.data import load_dataset, stratified_split

ALLOWED_DROP = 0.01  # the gate's default gate_max_val_drop
RULES = {  # name -> (allowance the rule compares with, z)
    "point estimate within half the allowance (until 2026-12-05)": (ALLOWED_DROP / 2, 0.0),
    "point estimate within the allowance": (ALLOWED_DROP, 0.0),
    "confidence bound, z=1": (ALLOWED_DROP, 1.0),
    "confidence bound, z=1.645 (the default)": (ALLOWED_DROP, AdaptConfig().choice_z),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model folder in the shipped format (default: the shipped model)")
    ap.add_argument("--halvings", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    model_dir = args.model or DEFAULT_DIR
    meta = shipped_meta(model_dir)
    prep = Preprocessing.from_dict(meta["preprocessing"])
    original, root = shipped_backbone(model_dir), shipped_head(model_dir)
    files, labels, _, _ = infant_split()  # the feedback half only
    cfg = AdaptConfig()
    train, val = stratified_split(load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale), 0.1, 0)
    replay = train.subset(np.random.default_rng(0).permutation(len(train))[: cfg.replay_size])
    tuned = fine_tune(original, crops(files, prep), labels, replay.x, replay.y, prep, cfg)

    reference = root.predict(embed_images(original, val.x, prep)) == val.y
    right = {}
    for w in cfg.interpolation_grid:
        model = interpolate(original, tuned, w)
        right[w] = classifier_proba(model, embed_images(model, val.x, prep)).argmax(1) == val.y
    whole = {str(w): dict(zip(("drop", "standard_error"), drop_and_error(reference, r))) for w, r in right.items()}

    rules = {}
    for name, (allowance, z) in RULES.items():
        picks, refused = [], 0
        for seed in range(args.halvings):
            choose, gate = train_test_split(np.arange(len(val.y)), test_size=0.5, stratify=val.y, random_state=seed)
            w = safe_weight({v: r[choose] for v, r in right.items()}, reference[choose], allowance, z)
            picks.append(w)
            refused += drop_and_error(reference[gate], right[w][gate])[0] > ALLOWED_DROP
        rules[name] = {"mean_weight": float(np.mean(picks)), "gate_refuses": refused / args.halvings,
                       "weight_at_seed_0": picks[0], "weights": {str(w): picks.count(w) for w in sorted(right)}}
        print(f"{name}: mean weight {np.mean(picks):.3f}, the gate refuses {refused / args.halvings:.1%}", flush=True)
    write_result("interpolation_choice" + (f"_{args.model.name}" if args.model else ""), {
        "command": "python -m bench.interpolation_choice" + (f" --model {args.model}" if args.model else ""),
        "model": str(model_dir), "reference_accuracy": float(reference.mean()),
        "data": "fine-tuned on the infant feedback half (face crops, AdaptConfig defaults); FER2013 validation split "
                f"(2,571 faces) halved at random {args.halvings} times, stratified (seed 0 is the halving `infantino adapt` uses)",
        "allowed_drop": ALLOWED_DROP, "drop_by_weight_whole_split": whole, "rules": rules,
        "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
