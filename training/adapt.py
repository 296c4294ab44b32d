"""Fine-tune part of a trained backbone on a few new-domain images, with replay of its training data.

What the feedback adaptation (adaptation/) runs on stored feedback images, and what
bench/feature_adaptation.py measured on the infant feedback half (4-fold cross-validation, the
shipped 65.2% model, 2026-12-05): the whole backbone fine-tuned gently (lr 1e-4, a feedback image
weighted as a replayed one) gains +5.1 points at a FER2013 cost of 0.9, and +6.0 at 0.5 interpolated
0.7; layer4 and the projection at lr 3e-4, feedback weighted 3 (the default until then) +3.9 at 0.3
interpolated 0.55 and +4.3 at 2.4 uninterpolated (the head alone on the fixed embedding: -0.9 to
+0.9). The defaults of ``AdaptConfig`` are the measured best.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from backbones.inference import embed_images
from backbones.model import EmbeddingNet
from infantino.images import Preprocessing
from training.augment import train_transform

# Which parameters each ``part`` trains (by name prefix); the training classifier always trains.
PARTS = {"embed": ("embed",), "layer4+embed": ("features.layer4", "embed"), "all": ("features", "embed")}


@dataclass(frozen=True)
class AdaptConfig:
    part: str = "all"
    epochs: int = 8
    lr: float = 1e-4
    feedback_weight: float = 1.0  # a feedback image against a replayed training image, in the loss
    # Training images replayed beside the feedback, as drawn (not class-balanced). 2000 measured on the
    # feedback half (2026-12-05): no FER2013 cost even uninterpolated, but +4.3 (+5.2 at 0.7) against
    # 1000's +6.0 at 0.7; a class-balanced 1000 gains more uninterpolated (+6.9) at -1.8, less at 0.7.
    replay_size: int = 1000
    batch_size: int = 32
    seed: int = 0
    # Learning without forgetting (Li & Hoiem, 2017): on replayed images, also match the original
    # model's softened answers (temperature 2), weighted so; 0: replayed labels only.
    distill: float = 0.0
    # Of the cross-entropy on every label, feedback and replayed. 0.1, as the shipped model was trained,
    # measured on the feedback half (2026-12-05): +5.6 at -0.5 FER2013 interpolated 0.7, against 0's +6.0.
    label_smoothing: float = 0.0
    # WiSE-FT (Wortsman et al., 2022): the weights served are interpolate(original, fine-tuned, w),
    # w the largest of these whose old-domain drop is, with one-sided confidence, within the gate's
    # allowed drop: drop + choice_z x its standard error (paired, per face) on a part of the
    # validation split the gate does not see (adaptation/backbone.py). A point estimate within half
    # the allowance (the rule until 2026-12-05) let the gate refuse 25-27% of random halvings for
    # the two models measured, the bound 3-10% (bench/interpolation_choice.py): on a 1,285-face half
    # a difference has a standard error near 0.8 points, the size of the allowance itself.
    # Steps of 0.15, not finer: with steps of 0.05 (2026-12-04, bench/results/infant_adaptation_fine_grid.json)
    # the largest weight passing on one half lost 1.17 points on the gate's half and was refused;
    # more weights tried on a noisy half means a more optimistic pick (the winner's curse).
    interpolation_grid: tuple[float, ...] = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)
    choice_z: float = 1.645  # one-sided 95%
    # A uniform model soup (Wortsman et al., 2022): this many fine-tunes from the same start, seeds
    # seed, seed+1, ..., with their weights averaged, at this many times the time. Measured with 3 on
    # the feedback half (2026-12-05): as much gain uninterpolated, less once interpolated (0.7: +4.7
    # against +6.0, both at -0.5 FER2013), so one run is the default.
    soup: int = 1
    # BatchNorm running statistics of the adapted part: updated by the fine-tune's batches (mostly
    # replayed images, a sixth feedback) or kept as trained, so only the weights move (a common way
    # to fine-tune on a few hundred images and forget less). Measured on the feedback half
    # (2026-12-05): it forgets no less and gains less (+4.7 against +6.0 at 0.7): off.
    freeze_norm_stats: bool = False

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {sorted(PARTS)}, got {self.part!r}")
        if not self.interpolation_grid or not all(0 < w <= 1 for w in self.interpolation_grid):
            raise ValueError(f"interpolation_grid must hold weights in (0, 1], got {self.interpolation_grid}")
        if self.choice_z < 0:
            raise ValueError(f"choice_z must be >= 0, got {self.choice_z}")
        if self.soup < 1:
            raise ValueError(f"soup must be >= 1, got {self.soup}")

    def to_params(self) -> dict:
        return {f"adapt_{k}": v for k, v in asdict(self).items()}


def _trainable(model: EmbeddingNet, part: str) -> list[torch.nn.Parameter]:
    prefixes = (*PARTS[part], "classifier")
    return [p for name, p in model.named_parameters() if name.startswith(prefixes)]


def fine_tune(model: EmbeddingNet, x: np.ndarray, y: np.ndarray, replay_x: np.ndarray, replay_y: np.ndarray,
              prep: Preprocessing, cfg: AdaptConfig = AdaptConfig()) -> EmbeddingNet:
    """A fine-tuned copy of ``model`` (``model`` itself is not changed), in eval mode on the CPU.

    ``x``/``y``: the new-domain images (uint8 N x S x S x 3, at the model's input size) and
    labels; ``replay_*``: training images that keep the old domain. Only ``cfg.part`` (and the
    training classifier) learns; BatchNorm statistics outside it (with ``cfg.freeze_norm_stats``,
    everywhere) stay as trained. With ``cfg.soup`` above 1, the average of that many fine-tunes'
    weights.
    """
    if cfg.soup > 1:
        runs = [fine_tune(model, x, y, replay_x, replay_y, prep, replace(cfg, seed=cfg.seed + i, soup=1)) for i in range(cfg.soup)]
        return average_weights(runs)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill else None
    trainable = _trainable(model, cfg.part)
    stage = PARTS[cfg.part][0]
    if stage.startswith("features.") and not any(name.startswith(stage) for name, _ in model.named_parameters()):
        raise ValueError(f"part {cfg.part!r} names no layer of this backbone ({PARTS[cfg.part][0]} is resnet's last stage); "
                         f"use 'embed' or 'all'")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    frozen_norms = [m for name, m in model.named_modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    and (cfg.freeze_norm_stats or not name.startswith(PARTS[cfg.part]))]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=1e-4)
    transform = train_transform(prep, occlusion_p=0.0, erasing_p=0.1)
    images, labels = np.concatenate([x, replay_x]), np.concatenate([y, replay_y]).astype(np.int64)
    weight = np.concatenate([np.full(len(y), cfg.feedback_weight), np.ones(len(replay_y))]).astype(np.float32)
    batch = max(min(cfg.batch_size, len(images) - len(images) % 2), 2)  # BatchNorm needs 2 a batch
    steps = cfg.epochs * max(len(images) // batch, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    while step < steps:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            pick = order[start : start + batch]
            model.train()
            for m in frozen_norms:
                m.eval()
            xb = torch.stack([transform(torch.from_numpy(images[j]).permute(2, 0, 1)) for j in pick])
            w = torch.from_numpy(weight[pick])
            logits = model.logits(xb)
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[pick]), reduction="none",
                                                     label_smoothing=cfg.label_smoothing)
            loss = (loss * w).sum() / w.sum()
            replayed = torch.from_numpy(pick >= len(y))
            if cfg.distill and replayed.any():
                loss = loss + cfg.distill * _distillation(logits[replayed], teacher.logits(xb[replayed]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= steps:
                break
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def _distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened answers, scaled by T^2 (Hinton et al., 2015)."""
    t = temperature
    return torch.nn.functional.kl_div(torch.log_softmax(student_logits / t, 1), torch.log_softmax(teacher_logits.detach() / t, 1),
                                      reduction="batchmean", log_target=True) * t * t


@torch.no_grad()
def average_weights(models: list[EmbeddingNet]) -> EmbeddingNet:
    """A copy of the first model with every floating-point weight and statistic the mean of all of theirs."""
    states = [m.state_dict() for m in models]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}
    model = copy.deepcopy(models[0])
    model.load_state_dict(mean)
    return model.eval()


@torch.no_grad()
def interpolate(original: EmbeddingNet, tuned: EmbeddingNet, weight: float) -> EmbeddingNet:
    """A copy of ``tuned`` whose weights (and normalisation statistics) lie ``weight`` of the way from
    ``original`` to ``tuned``: 1 is the fine-tune, 0 the original. Interpolated weights keep most of a
    fine-tune's new-domain gain at a fraction of its old-domain cost (WiSE-FT)."""
    a, b = original.state_dict(), tuned.state_dict()
    mixed = {k: torch.lerp(a[k].to(v.dtype), v, weight) if v.is_floating_point() else v for k, v in b.items()}
    model = copy.deepcopy(tuned)
    model.load_state_dict(mixed)
    return model.eval()


@torch.inference_mode()
def classifier_proba(model: EmbeddingNet, embeddings: np.ndarray) -> np.ndarray:
    """The backbone's own training classifier on its embeddings, as probabilities."""
    return torch.softmax(model.classifier(torch.from_numpy(np.asarray(embeddings, np.float32))), 1).numpy()


def proba(model: EmbeddingNet, x: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Images -> the training classifier's probabilities."""
    return classifier_proba(model, embed_images(model, x, prep))
