"""What must adapt for infant feedback to move accuracy? Measured on the feedback half only.

    .venv/bin/python -m bench.feature_adaptation                 # ~20-40 minutes on 2 CPU cores
    .venv/bin/python -m bench.feature_adaptation --only as_is head_adapter
    .venv/bin/python -m bench.feature_adaptation --model registry/candidates/scratch-light-45-cont-14 --only tune_layer4+embed

The head-level adapter (heads/feedback.py) moves infant accuracy about 2 points: the 64-d
embedding of a FER2013-trained backbone does not separate infant expressions much better
whatever head sits on it. This bench measures what adapting more of the model would gain,
before any of it is built into the service: 4-fold stratified cross-validation on the infant
feedback half (each variant adapted on three folds, scored on the fourth, the same folds as
bench/adapter_variants.py), and FER2013 validation accuracy of the adapted model (the gate
allows a 1-point drop). The test half is never read.

Variants:
- as_is: the shipped head on the shipped embedding;
- head_adapter: the shipped feedback head taught the folds (heads/feedback.py, the service's update);
- pooled_lr: a logistic regression on the backbone's pooled features (before the 64-d projection),
  with a FER2013 replay sample;
- adabn: BatchNorm statistics re-estimated on infant and FER2013 crops, then head_adapter;
- tune_<part>: the backbone's <part> (embed: the 64-d projection; layer4+embed; all) fine-tuned
  on the folds (augmented, weighted) with FER2013 replay, then head_adapter on the new embedding;
- each also blended with as_is (mean of probabilities), as a guard against forgetting;
- tune_<part> (training classifier, interpolated w): the fine-tuned weights moved only w of the way
  from the shipped ones (WiSE-FT, training/adapt.py), the trade `infantino adapt` chooses along;
- +prior_shift: probabilities moved from FER2013's class mix to the fold's feedback's, for every
  request; +domain_prior: only for requests naming the feedback's domain, as the service does
  (heads/domain.py), or weighted by a learned guess of the domain (`--only domain_prior`);
- +domain_bias L: per-class logit offsets fitted (L2 weight L) on out-of-fold probabilities of the
  fold's feedback, for requests naming its domain (`--only domain_bias`, `domain_bias_tuned` for the
  adapted backbone with an inner cross-fit);
- +memory_logistic / +memory_prototype / +memory_knn W: the fold's feedback embeddings remembered,
  answering held-out items by a logistic regression fitted on them alone (the service's
  INFANTINO_UPDATE_DOMAIN_MEMORY with _KIND=logistic, heads/domain.py), by class prototype (_KIND=
  prototype) or by their 10 nearest neighbours, blended in with weight W (`--only memory`, and
  `memory_tuned` for infantino adapt's fine-tune: run it with `--lr 1e-4 --feedback-weight 1`).
With ``--feedback-fraction F`` (tune_* rows only) each fold is taught a stratified share F of its
feedback and scored on the same held-out fold: points of a learning curve, drawn in the plot's
third panel for infantino adapt's default fine-tune (how much more feedback would buy).
Results: bench/results/feature_adaptation.json and .png (with ``--model DIR``, another model folder
in the shipped format: feature_adaptation_<DIR's name>.json and .png).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from backbones.inference import embed_images
from bench.common import (
    DATA,
    DOMAIN,
    FER_CLASSES,
    RESULTS,
    bootstrap_home,
    infant_split,
    write_result,
)
from heads import configure_online
from heads.domain import DomainMemory, DomainPriors, unit_rows
from infantino.faces import create_detector
from infantino.images import normalise, open_image
from infantino.regions import find_regions
from infantino.settings import Settings
from registry.shipped import register_shipped
from registry.store import CHAMPION, ModelRegistry
from training.adapt import PARTS, AdaptConfig, classifier_proba, fine_tune, interpolate
from training.data import load_dataset, stratified_split


def crops(files: list[Path], prep) -> np.ndarray:
    detector = create_detector()
    return np.stack([find_regions(open_image(f), prep, "largest", detector, keep_images=False)[0].array
                     for f in tqdm(files, desc="face crops (feedback half)")])


@torch.inference_mode()
def pooled(model, x: np.ndarray, prep) -> np.ndarray:
    model.eval()
    return np.concatenate([model.features(torch.from_numpy(normalise(x[i : i + 256], prep))).numpy()
                           for i in range(0, len(x), 256)])


@torch.no_grad()
def adabn(model, x: np.ndarray, prep):
    """BatchNorm running statistics re-estimated (cumulative average) on ``x``; weights untouched."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    order = np.random.default_rng(0).permutation(len(x))
    for i in range(0, len(x), 64):
        model(torch.from_numpy(normalise(x[order[i : i + 64]], prep)))
    return model.eval()


def knn_proba(memory: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_classes: int,
              temperature: float = 0.1, k: int = 10) -> np.ndarray:
    """Class probabilities of ``queries`` from a memory of labelled embeddings by cosine similarity: the
    ``k`` nearest, each voting exp(similarity / temperature) (the service's kinds: heads/domain.py)."""
    sims = unit_rows(queries) @ unit_rows(memory).T
    nearest = np.argsort(-sims, 1)[:, :k]
    scores = np.zeros((len(queries), n_classes))
    np.add.at(scores, (np.arange(len(queries))[:, None], labels[nearest]), np.exp((np.take_along_axis(sims, nearest, 1) - 1) / temperature))
    return scores / scores.sum(1, keepdims=True)


def logit_offsets(proba: np.ndarray, labels: np.ndarray, l2: float = 0.0) -> np.ndarray:
    """Per-class offsets b minimising the cross-entropy of softmax(log proba + b) on ``labels`` (plus
    ``l2`` x |b|^2): the label-shift correction that best fits out-of-fold probabilities."""
    from scipy.optimize import minimize

    log_p, onehot = np.log(np.clip(proba, 1e-9, 1)), np.eye(proba.shape[1])[labels]

    def loss_and_grad(b):
        z = log_p + b
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        return -np.mean(np.log(q[onehot > 0] + 1e-12)) + l2 * b @ b, (q - onehot).mean(0) + 2 * l2 * b

    return minimize(loss_and_grad, np.zeros(proba.shape[1]), jac=True, method="L-BFGS-B").x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--feedback-weight", type=float, default=3.0)
    ap.add_argument("--replay", type=int, default=1000, help="FER2013 training images replayed by the fine-tunes")
    ap.add_argument("--distill", type=float, default=0.0, help="distillation weight on replayed images (training/adapt.py)")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="of the fine-tunes' cross-entropy (training/adapt.py)")
    ap.add_argument("--soup", type=int, default=1, help="fine-tunes averaged into one (training/adapt.py)")
    ap.add_argument("--replay-balanced", action="store_true", help="replay as many images of each class (default: as drawn)")
    ap.add_argument("--freeze-norm-stats", action="store_true", help="keep BatchNorm running statistics as trained (training/adapt.py)")
    ap.add_argument("--feedback-fraction", type=float, default=1.0,
                    help="teach each fold only this stratified share of its feedback (a learning curve: how much more feedback buys)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the committed results")
    ap.add_argument("--model", type=Path, help="a model folder in the shipped format (default: the shipped model)")
    args = ap.parse_args()
    if args.feedback_fraction < 1 and not (args.only and all(o.startswith("tune_") for o in args.only)):
        ap.error("--feedback-fraction names only the tune_* rows: run it with --only tune_<part>")
    result = "feature_adaptation" + (f"_{args.model.name}" if args.model else "")
    if args.plot_only:
        return plot(json.loads((RESULTS / f"{result}.json").read_text())["rows"], RESULTS / f"{result}.png")
    torch.set_num_threads(2)
    started = time.time()
    home = Path(tempfile.mkdtemp(prefix="feature-adaptation-")) / "home"
    if not args.model:
        bootstrap_home(home).check_returncode()
    settings = Settings(home=home)
    registry = ModelRegistry(settings)
    if args.model:
        register_shipped(registry, args.model)
    measured = registry.load_head(CHAMPION)  # the shipped model, or --model
    backbone = registry.load_backbone(measured.backbone_version)
    model, prep = backbone.model.float().eval(), backbone.preprocessing
    model = model.to(memory_format=torch.contiguous_format)
    files, y, _, _ = infant_split()
    x = crops(files, prep)
    fer = load_dataset(DATA / "fer2013_train.npz", prep.input_size, prep.grayscale, FER_CLASSES)
    fer_train, fer_val = stratified_split(fer, 0.1, 0)
    order = np.random.default_rng(1).permutation(len(fer_train))
    if args.replay_balanced:  # the first replay/7 drawn of each class
        order = np.concatenate([order[fer_train.y[order] == c][: args.replay // len(FER_CLASSES)] for c in range(len(FER_CLASSES))])
    replay = fer_train.subset(order[: args.replay])
    val = fer_val.subset(np.random.default_rng(2).permutation(len(fer_val))[:1200])  # a fixed sample: enough to see 1 point
    root = getattr(measured.model, "base_", measured.model)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(x, y))
    if args.feedback_fraction < 1:  # the same held-out folds, taught less
        folds = [(train_test_split(tr, train_size=args.feedback_fraction, stratify=y[tr], random_state=0)[0], held)
                 for tr, held in folds]

    def head_taught(emb_fold, y_fold, replay_emb=None):
        """The service's update: the feedback head around the measured model's MLP, taught the fold."""
        head = configure_online(copy.deepcopy(measured.model), settings.online)
        if replay_emb is not None:  # a new embedding: the replay sample must be in it too
            head.replay_x_, head.replay_y_ = replay_emb.astype(np.float32), replay.y.astype(np.int64)
        return head.partial_fit(emb_fold, y_fold)

    rows: dict[str, dict] = {}
    train_prior = np.bincount(fer_train.y, minlength=len(FER_CLASSES)) / len(fer_train.y)

    def prior_shift(probs: list[np.ndarray], val_probs: list[np.ndarray], strength: float = 1.0) -> tuple[list[np.ndarray], float]:
        """Each fold's probabilities moved from FER2013's class prior to the prior of the feedback it
        was taught (``strength`` 1: all the way; 0.5: half-way in log space); and the FER2013 validation
        accuracy of the fold models so moved (the cost of the shift)."""
        def shifted(p, tr):
            ratio = (np.bincount(y[tr], minlength=len(FER_CLASSES)) + 1) / (len(tr) + len(FER_CLASSES)) / train_prior
            q = p * ratio ** strength
            return q / q.sum(1, keepdims=True)
        val_acc = float(np.mean([np.mean(shifted(v, tr).argmax(1) == val.y) for v, (tr, _) in zip(val_probs, folds)]))
        return [shifted(p, tr) for p, (tr, _) in zip(probs, folds)], val_acc

    def record(name: str, fold_probs: list[np.ndarray], val_acc: float, note: str = "") -> None:
        cv = float(np.mean([np.mean(p.argmax(1) == y[held]) for p, (_, held) in zip(fold_probs, folds)]))
        rows[name] = {"cv_accuracy": cv, "fer2013_val_accuracy": val_acc, "note": note,
                      "photos_taught": float(np.mean([len(tr) for tr, _ in folds]))}  # a fold's feedback, on average
        base = rows.get("as_is", rows[name])
        print(f"{name:>28}: CV {cv:.3f} ({100 * (cv - base['cv_accuracy']):+.1f} pts), FER2013 val {val_acc:.3f} "
              f"({100 * (val_acc - base['fer2013_val_accuracy']):+.1f}) [{time.time() - started:.0f} s]", flush=True)

    wanted = lambda name: not args.only or any(name.startswith(o) for o in args.only)
    emb = embed_images(model, x, prep)
    val_emb = embed_images(model, val.x, prep)
    as_is_probs = [root.predict_proba(emb[held]) for _, held in folds]
    record("as_is", as_is_probs, float(np.mean(root.predict(val_emb) == val.y)))
    if args.feedback_fraction == 1:  # the prior of a fold taught less would name a different row
        record("as_is+prior_shift", *prior_shift(as_is_probs, [root.predict_proba(val_emb)] * len(folds)))

    if wanted("head_adapter"):
        heads = [head_taught(emb[tr], y[tr]) for tr, _ in folds]
        whole = head_taught(emb, y)
        probs = [h.predict_proba(emb[held]) for h, (_, held) in zip(heads, folds)]
        record("head_adapter", probs, float(np.mean(whole.predict(val_emb) == val.y)))
        record("head_adapter+prior_shift", *prior_shift(probs, [h.predict_proba(val_emb) for h in heads]))

    if wanted("pooled_lr"):
        f_x, f_rep, f_val = pooled(model, x, prep), pooled(model, replay.x, prep), pooled(model, val.x, prep)
        for w in (1.0, 3.0):
            def fit(tr, w=w):
                scaler = StandardScaler().fit(f_rep)
                lr = LogisticRegression(C=0.05, max_iter=3000).fit(
                    scaler.transform(np.vstack([f_x[tr], f_rep])), np.concatenate([y[tr], replay.y]),
                    sample_weight=np.concatenate([np.full(len(tr), w), np.ones(len(replay.y))]))
                return lambda f: lr.predict_proba(scaler.transform(f))
            probs = [fit(tr)(f_x[held]) for tr, held in folds]
            whole = fit(np.arange(len(y)))
            record(f"pooled_lr_w{w:g}", probs, float(np.mean(whole(f_val).argmax(1) == val.y)))
            record(f"pooled_lr_w{w:g}+as_is", [(p + a) / 2 for p, a in zip(probs, as_is_probs)],
                   float(np.mean((whole(f_val) + root.predict_proba(val_emb)).argmax(1) == val.y)))

    if wanted("adabn"):
        probs, vals = [], []
        for tr, held in folds:
            adapted = adabn(model, np.concatenate([x[tr], replay.x[: 4 * len(tr)]]), prep)
            e = embed_images(adapted, x, prep)
            rep = embed_images(adapted, replay.x, prep)
            head = head_taught(e[tr], y[tr], rep)
            probs.append(head.predict_proba(e[held]))
            vals.append(float(np.mean(head.predict(embed_images(adapted, val.x, prep)) == val.y)))
        record("adabn", probs, float(np.mean(vals)), "FER2013 val: mean over the fold models")

    def adapt_config(part: str) -> AdaptConfig:
        """The fine-tune every variant below runs, of ``part``, with the command line's arguments."""
        return AdaptConfig(part=part, epochs=args.epochs, lr=args.lr, feedback_weight=args.feedback_weight, replay_size=args.replay,
                           distill=args.distill, soup=args.soup, label_smoothing=args.label_smoothing,
                           freeze_norm_stats=args.freeze_norm_stats)

    fine_tune_args = (f"epochs {args.epochs}, lr {args.lr:g}, weight {args.feedback_weight:g}, replay {args.replay}"
                      + (f", distill {args.distill:g}" if args.distill else "") + (f", soup {args.soup}" if args.soup > 1 else "")
                      + (f", label smoothing {args.label_smoothing:g}" if args.label_smoothing else "")
                      + (", replay balanced" if args.replay_balanced else "")
                      + (", norm statistics frozen" if args.freeze_norm_stats else "")
                      + (f", feedback fraction {args.feedback_fraction:g}" if args.feedback_fraction < 1 else ""))
    defaults = "epochs 8, lr 0.0003, weight 3, replay 1000"  # the rows of other arguments are named with theirs
    for part in PARTS:
        name = f"tune_{part}" + ("" if defaults == fine_tune_args else f" [{fine_tune_args}]")
        if not wanted(f"tune_{part}"):
            continue
        probs, blend, vals, blend_vals, logit_probs, logit_vals, logit_val_probs, head_val_probs = ([] for _ in range(8))
        cfg = adapt_config(part)
        interpolated = {w: ([], []) for w in cfg.interpolation_grid if w < 1}  # weight -> (fold probs, fold val accuracies)
        for k, (tr, held) in enumerate(folds):
            tuned = fine_tune(model, x[tr], y[tr], replay.x, replay.y, prep, cfg)
            for w, (w_probs, w_vals) in interpolated.items():
                between = interpolate(model, tuned, w)
                w_probs.append(classifier_proba(between, embed_images(between, x[held], prep)))
                w_vals.append(float(np.mean(classifier_proba(between, embed_images(between, val.x, prep)).argmax(1) == val.y)))
            e, rep, v = embed_images(tuned, x, prep), embed_images(tuned, replay.x, prep), embed_images(tuned, val.x, prep)
            head = head_taught(e[tr], y[tr], rep)
            probs.append(head.predict_proba(e[held]))
            blend.append((probs[-1] + as_is_probs[k]) / 2)
            vals.append(float(np.mean(head.predict(v) == val.y)))
            blend_vals.append(float(np.mean((head.predict_proba(v) + root.predict_proba(val_emb)).argmax(1) == val.y)))
            with torch.inference_mode():
                logit_probs.append(torch.softmax(tuned.classifier(torch.from_numpy(e[held])), 1).numpy())
                logit_val_probs.append(torch.softmax(tuned.classifier(torch.from_numpy(v)), 1).numpy())
                logit_vals.append(float(np.mean(logit_val_probs[-1].argmax(1) == val.y)))
            head_val_probs.append(head.predict_proba(v))
            print(f"  {name} fold {k}: {np.mean(probs[-1].argmax(1) == y[held]):.3f} "
                  f"(as-is {np.mean(as_is_probs[k].argmax(1) == y[held]):.3f}), val {vals[-1]:.3f}", flush=True)
        note = fine_tune_args
        record(name, probs, float(np.mean(vals)), note)
        record(name + "+as_is", blend, float(np.mean(blend_vals)), note)
        record(name + " (training classifier)", logit_probs, float(np.mean(logit_vals)), note)
        for w, (w_probs, w_vals) in interpolated.items():
            record(f"{name} (training classifier, interpolated {w:g})", w_probs, float(np.mean(w_vals)), note)
        record(name + " (training classifier)+prior_shift", *prior_shift(logit_probs, logit_val_probs), note)
        record(name + " (training classifier)+half_prior_shift", *prior_shift(logit_probs, logit_val_probs, 0.5), note)
        record(name + "+prior_shift", *prior_shift(probs, head_val_probs), note)

    if wanted("domain_prior"):
        # The class-prior shift above, measured as the service applies it (heads/domain.py): to requests
        # that name the feedback's domain ("known domain"; FER2013 requests name none, so are unchanged);
        # and, the rejected alternative, weighted per request by a logistic regression's odds that its
        # embedding is from the feedback's domain rather than FER2013 ("learned domain").
        cfg = adapt_config("layer4+embed")

        def learned_domain(p, e, e_tr, y_tr, e_rep):
            ratio = DomainPriors(train_prior, min_items=1).fit(y_tr, "feedback").ratios_["feedback"]
            side = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0))
            side.fit(np.vstack([e_tr, e_rep]), np.r_[np.ones(len(e_tr)), np.zeros(len(e_rep))])
            q = p * ratio[None, :] ** side.predict_proba(e)[:, 1:]
            return q / q.sum(1, keepdims=True)

        # name -> per fold: embeddings of the fold's feedback, held-out items, FER2013 val and replay, and probabilities
        rep_emb = embed_images(model, replay.x, prep)
        variants = {"as_is": [(emb[tr], emb[held], val_emb, rep_emb, root.predict_proba(emb[held]), root.predict_proba(val_emb))
                              for tr, held in folds]}
        if wanted("domain_prior_tuned"):
            tuned_parts: dict[float, list] = {0.7: [], 1.0: []}
            for tr, held in folds:
                tuned = fine_tune(model, x[tr], y[tr], replay.x, replay.y, prep, cfg)
                for w, parts in tuned_parts.items():
                    m = interpolate(model, tuned, w)
                    e_tr, e_held, e_val, e_rep = (embed_images(m, a, prep) for a in (x[tr], x[held], val.x, replay.x))
                    parts.append((e_tr, e_held, e_val, e_rep, classifier_proba(m, e_held), classifier_proba(m, e_val)))
            for w, parts in tuned_parts.items():
                variants["tune_layer4+embed (training classifier" + (f", interpolated {w:g})" if w < 1 else ")")] = parts
        for stem, parts in variants.items():
            known, learned = ([], []), ([], [])
            for (tr, _), (e_tr, e_held, e_val, e_rep, p_held, p_val) in zip(folds, parts):
                known[0].append(DomainPriors(train_prior).fit(y[tr], "infant").adjust(p_held, "infant"))
                known[1].append(float(np.mean(p_val.argmax(1) == val.y)))  # FER2013 requests name no domain
                learned[0].append(learned_domain(p_held, e_held, e_tr, y[tr], e_rep))
                learned[1].append(float(np.mean(learned_domain(p_val, e_val, e_tr, y[tr], e_rep).argmax(1) == val.y)))
            record(f"{stem}+domain_prior (known domain)", known[0], float(np.mean(known[1])))
            record(f"{stem}+domain_prior (learned domain)", learned[0], float(np.mean(learned[1])))

    if wanted("domain_bias"):
        # The class-mix correction learned rather than counted: per-class logit offsets fitted (least
        # cross-entropy) on out-of-fold probabilities of the fold's feedback, so a classifier that has
        # already learned part of the infant mix from the feedback is not corrected for it twice, as
        # the count ratio (domain_prior) would. As-is: its probabilities on the fold's feedback are
        # out-of-fold already; the adapted backbone (interpolated at the weight `infantino adapt` chose
        # on the shipped model, 0.55): an inner 4-fold cross-fit of fine-tunes within each fold.
        # Applied only to requests naming the domain: FER2013 accuracy is the classifier's own.
        cfg = adapt_config("layer4+embed")
        as_is_train = [root.predict_proba(emb[tr]) for tr, _ in folds]
        stems = {"as_is": (as_is_probs, as_is_train, rows["as_is"]["fer2013_val_accuracy"])}
        if wanted("domain_bias_tuned"):
            w, held_probs, train_oof, vals = 0.55, [], [], []
            for k, (tr, held) in enumerate(folds):
                tuned = interpolate(model, fine_tune(model, x[tr], y[tr], replay.x, replay.y, prep, cfg), w)
                held_probs.append(classifier_proba(tuned, embed_images(tuned, x[held], prep)))
                vals.append(float(np.mean(classifier_proba(tuned, embed_images(tuned, val.x, prep)).argmax(1) == val.y)))
                oof = np.zeros((len(tr), len(FER_CLASSES)))
                for inner_tr, inner_held in StratifiedKFold(args.folds, shuffle=True, random_state=1).split(x[tr], y[tr]):
                    inner = interpolate(model, fine_tune(model, x[tr][inner_tr], y[tr][inner_tr], replay.x, replay.y, prep, cfg), w)
                    oof[inner_held] = classifier_proba(inner, embed_images(inner, x[tr][inner_held], prep))
                train_oof.append(oof)
                print(f"  domain_bias_tuned fold {k}: {np.mean(held_probs[-1].argmax(1) == y[held]):.3f} [{time.time() - started:.0f} s]", flush=True)
            stems[f"tune_layer4+embed (training classifier, interpolated {w:g})"] = (held_probs, train_oof, float(np.mean(vals)))
        for stem, (held_probs, train_probs, val_acc) in stems.items():
            if stem != "as_is":
                record(stem, held_probs, val_acc)
            record(f"{stem}+domain_prior (known domain)", [DomainPriors(train_prior).fit(y[tr], "infant").adjust(p, "infant")
                                                          for p, (tr, _) in zip(held_probs, folds)], val_acc)
            for l2 in (0.0, 0.01, 0.1):
                fold_probs = []
                for p, q, (tr, _) in zip(held_probs, train_probs, folds):
                    moved = p * np.exp(logit_offsets(q, y[tr], l2))
                    fold_probs.append(moved / moved.sum(1, keepdims=True))
                record(f"{stem}+domain_bias {l2:g}", fold_probs, val_acc, "FER2013 requests name no domain: unchanged")

    if wanted("memory"):
        # A memory of the feedback's embeddings beside the classifier (issue 11: "a memory of feedback
        # embeddings blended with the head"): each fold's taught items, embedded by the fold's model,
        # answer a held-out item by a logistic regression of their own (the service's default,
        # heads/domain.py), by class prototype (cosine to each class's mean) or by their nearest
        # neighbours; blended with the classifier's probabilities. Applied, like the domain prior, only
        # to requests naming the feedback's domain, so FER2013 accuracy is the classifier's own.
        cfg = adapt_config("all")  # infantino adapt's fine-tune (with --lr 1e-4 --feedback-weight 1, its defaults)
        tuned_stem = lambda w: f"tune_all [{fine_tune_args}] (training classifier{f', interpolated {w:g}' if w < 1 else ''})"
        stems = {"as_is": [(emb[tr], emb[held], root.predict_proba(emb[held])) for tr, held in folds]}
        stem_vals = {"as_is": rows["as_is"]["fer2013_val_accuracy"]}
        if wanted("memory_tuned"):
            for w in (0.7, 1.0):
                stems[tuned_stem(w)] = []
            vals_by_w = {0.7: [], 1.0: []}
            for tr, held in folds:
                tuned = fine_tune(model, x[tr], y[tr], replay.x, replay.y, prep, cfg)
                for w in (0.7, 1.0):
                    m = interpolate(model, tuned, w)
                    e_tr, e_held = embed_images(m, x[tr], prep), embed_images(m, x[held], prep)
                    stems[tuned_stem(w)].append((e_tr, e_held, classifier_proba(m, e_held)))
                    vals_by_w[w].append(float(np.mean(classifier_proba(m, embed_images(m, val.x, prep)).argmax(1) == val.y)))
            for w, v in vals_by_w.items():
                stem_vals[tuned_stem(w)] = float(np.mean(v))
        for stem, parts in stems.items():
            for kind, betas in (("logistic", (0.5, 0.7, 1.0)), ("prototype", (0.25, 0.5)), ("knn", (0.25, 0.5))):
                for beta in betas:
                    if kind in DomainMemory.KINDS:  # the service's own memory, fitted on the fold's feedback
                        fold_probs = [DomainMemory(weight=beta, kind=kind).fit(e_tr, y[tr], DOMAIN).blend(p, e_held, DOMAIN)
                                      for (tr, _), (e_tr, e_held, p) in zip(folds, parts)]
                    else:
                        fold_probs = [(1 - beta) * p + beta * knn_proba(e_tr, y[tr], e_held, len(FER_CLASSES))
                                      for (tr, _), (e_tr, e_held, p) in zip(folds, parts)]
                    record(f"{stem}+memory_{kind} {beta:g}", fold_probs, stem_vals[stem], "FER2013 requests name no domain: unchanged")

    # --only runs add to (or replace) the rows of earlier runs, each row with the arguments it ran with.
    for row in rows.values():
        row["args"] = {k: v for k, v in vars(args).items() if k != "only"}
    earlier = RESULTS / f"{result}.json"
    if args.only and earlier.exists():
        rows = {**json.loads(earlier.read_text()).get("rows", {}), **rows}
    path = write_result(result, {
        "command": "python -m bench.feature_adaptation" + (f" --model {args.model}" if args.model else ""),
        "data": "feedback half of the infant photos (4 stratified folds); FER2013 validation: a fixed 1200-image sample",
        "rows": rows})
    plot(rows, RESULTS / f"{result}.png")
    print(path)


def plot(rows: dict, path: Path) -> None:
    """Infant gain against FER2013 change, one point per variant: the trade at a glance. The
    interpolated fine-tunes of one row are drawn as a line from it (weight 1) toward as-is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows["as_is"]

    def point(row):
        return 100 * (row["fer2013_val_accuracy"] - base["fer2013_val_accuracy"]), 100 * (row["cv_accuracy"] - base["cv_accuracy"])

    def short(name):  # the plot's labels: the arguments abbreviated, the common ones left out
        for long, brief in (("tune_", ""), ("training classifier", "clf"), ("epochs 8, ", ""), ("lr 0.0003, ", ""),
                            ("lr 0.0001", "lr 1e-4"), (", replay 1000", ""), ("weight ", "w"), ("interpolated ", "")):
            name = name.replace(long, brief)
        return name

    curve_rows = {name: row for name, row in rows.items() if FRACTION.search(name)}
    rows = {name: row for name, row in rows.items() if name not in curve_rows}
    fig, (ax, bars, curve) = plt.subplots(1, 3, figsize=(23, 7.5), gridspec_kw={"width_ratios": [3, 2, 1.6]})
    ax.axvspan(-1, 10, color="tab:green", alpha=0.07, label="FER2013 within the gate's 1 point")
    ax.axhline(8, color="tab:red", ls=":", label="issue 11's goal: +8 points")
    chains: dict[str, list] = {}
    for name, row in rows.items():
        if not np.isfinite(row["fer2013_val_accuracy"]):
            continue
        dx, dy = point(row)
        if (m := re.match(r"(.*) \(training classifier, interpolated ([\d.]+)\)$", name)):
            chains.setdefault(m.group(1), []).append((float(m.group(2)), dx, dy))
            continue
        ax.plot(dx, dy, "o", color="tab:blue" if name.startswith("tune") else "tab:grey")
        ax.annotate(short(name), (dx, dy), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    for stem, chain in chains.items():
        start = rows.get(f"{stem} (training classifier)")
        chain = sorted(chain, reverse=True) if start is None else [(1.0, *point(start)), *sorted(chain, reverse=True)]
        ax.plot([c[1] for c in chain], [c[2] for c in chain], ".-", color="tab:orange", alpha=0.8, lw=1,
                label="weights interpolated toward the original ones (WiSE-FT), weight at each dot" if stem == next(iter(chains)) else None)
        for w, dx, dy in chain[1:]:
            ax.annotate(f"{w:g}", (dx, dy), fontsize=6, color="tab:orange", xytext=(-4, -9), textcoords="offset points")
    ax.set_xlim(-8, 1.5)
    ax.set_xlabel("FER2013 validation accuracy change (points)")
    ax.set_ylabel("infant accuracy gain over as-is (points, 4-fold CV on the feedback half)")
    ax.set_title("What must adapt? Head-level variants (grey), fine-tuned backbone parts (blue)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    best_within_budget(bars, chains, {stem: point(rows[f"{stem} (training classifier)"]) for stem in chains
                                      if f"{stem} (training classifier)" in rows}, short)
    learning_curve(curve, rows, curve_rows, base)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# A row taught only part of each fold's feedback (--feedback-fraction): a point of the learning curve.
FRACTION_ARG = r", feedback fraction [\d.]+"
FRACTION = re.compile(FRACTION_ARG + r"\]")
# infantino adapt's defaults, taught all of each fold's feedback or a share of it
CURVE_ROW = re.escape("tune_all [epochs 8, lr 0.0001, weight 1, replay 1000") + f"(?:{FRACTION_ARG})?" + r"\] "
CURVE_WEIGHTS = {"(training classifier)": "fine-tuned weights", "(training classifier, interpolated 0.7)": "interpolated 0.7"}


def learning_curve(ax, rows: dict, curve_rows: dict, base: dict) -> None:
    """Infant gain of infantino adapt's default fine-tune against the feedback photos each fold was
    taught (each row's ``photos_taught``), uninterpolated and at weight 0.7. No line is fitted through
    it to extrapolate: measured on 2026-12-05 it rose to ~116 photos and then stayed level, and a fit
    in log(photos) through all five points would promise +8 at ~250 that the flat end does not support."""
    for (suffix, label), colour in zip(CURVE_WEIGHTS.items(), ("tab:blue", "tab:orange")):
        points = [(row["photos_taught"], row) for name, row in {**rows, **curve_rows}.items()
                  if re.fullmatch(CURVE_ROW + re.escape(suffix), name)]
        if not points:
            continue
        points.sort(key=lambda p: p[0])
        n = np.array([p[0] for p in points])
        gain = np.array([100 * (p[1]["cv_accuracy"] - base["cv_accuracy"]) for p in points])
        ax.plot(n, gain, "o-", color=colour, label=label)
        for x, g, (_, row) in zip(n, gain, points):
            ax.annotate(f"FER {100 * (row['fer2013_val_accuracy'] - base['fer2013_val_accuracy']):+.1f}", (x, g), fontsize=6,
                        xytext=(3, -9), textcoords="offset points")
    ax.axhline(8, color="tab:red", ls=":", label="issue 11's goal: +8 points")
    ax.set_xlabel("feedback photos each fold was taught")
    ax.set_ylabel("infant gain over as-is (points, 4-fold CV)")
    ax.set_title("How much more feedback buys (infantino adapt's defaults)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def best_within_budget(ax, chains: dict, starts: dict, short) -> None:
    """Per fine-tune setting, the most infant gain among its interpolation weights (1 included) whose
    FER2013 change stays within 0.5 and within 1 point: the comparison the plot's cloud hides. 0.5,
    because the service's choice of weight needs the drop within 1 point with 95% confidence, and
    every weight it served so far measured a drop near 0.5 or less (adaptation/backbone.py)."""
    budgets = (0.5, 1.0)
    best = {}
    for stem, chain in chains.items():
        points = [(dx, dy) for _, dx, dy in chain] + ([starts[stem]] if stem in starts else [])
        best[stem] = [max([dy for dx, dy in points if dx >= -b], default=0.0) for b in budgets]
    order = sorted(best, key=lambda stem: best[stem])
    ys = np.arange(len(order))
    for i, (b, colour) in enumerate(zip(budgets, ("tab:blue", "tab:cyan"))):
        ax.barh(ys + (0.2 if i == 0 else -0.2), [best[stem][i] for stem in order], height=0.4, color=colour,
                label=f"FER2013 cost at most {b:g} point")
    ax.axvline(8, color="tab:red", ls=":", label="issue 11's goal: +8 points")
    ax.set_yticks(ys, [short(stem) for stem in order], fontsize=6.5)
    ax.set_xlabel("best infant gain within the FER2013 cost (points; any weight)")
    ax.set_title("Every fine-tune setting, at the FER2013 cost the gate allows", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")


if __name__ == "__main__":
    main()
