"""Supervised training of the backbone: the recipe, the loop, checkpoints and resume.

Recipe: AdamW (or SGD with Nesterov momentum) with warm-up then cosine decay (or a cut of
the rate whenever validation accuracy stops improving), label smoothing, class-balanced
sampling (or loss weights) for the long tail, flip/rotation/colour/erasing/lower-face-occlusion
augmentation, mixup and cutmix, an optional two-stage schedule (frozen backbone first,
then unfrozen at a lower rate), and an optional moving average of the weights (``ema_decay``).
Seeds are fixed; a checkpoint is written every epoch, so an interrupted run continues with
``resume``. bench/recipes.py compares recipes by measurement.

Under torchrun (an initialised process group, see training/distributed.py) the same loop runs
in every process with DistributedDataParallel: each process takes its part of every epoch
(the class-balanced sampler becomes a distributed weighted sampler), ``batch_size`` stays the
global batch, the epoch's metrics are summed over the processes, and only rank 0 writes the
checkpoint. Alone, nothing of that applies and the run is what it always was.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from backbones.model import EmbeddingNet, create_backbone
from infantino.images import PRECROPPED_FACE_MARGIN, Preprocessing, normalise
from training import distributed
from training.augment import train_transform
from training.data import LabelledImages

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_b0"
    backbone_args: dict | None = None  # extra timm.create_model arguments, e.g. {"mlp_ratio": 0.125} for VGG
    pretrained: bool = False
    checkpoint: str | None = None
    image_size: int = 64
    grayscale: bool = True
    face_margin: float = PRECROPPED_FACE_MARGIN  # the framing of the training faces (see infantino.images)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # cosine (over `epochs`) | plateau (cut by plateau_factor after plateau_patience flat epochs)
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    balance: str = "sampler"  # sampler | loss | none
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    mixup_prob: float = 0.5
    occlusion_p: float = 0.2
    erasing_p: float = 0.25
    augment: str = "standard"  # how far the training views range: training.augment.AUGMENTATIONS
    drop_rate: float = 0.2
    drop_path_rate: float = 0.05
    freeze_epochs: int = 0
    unfreeze_lr_scale: float = 0.1
    # > 0: validate and return an exponential moving average of the weights (timm's ModelEmaV3, updated
    # every step) instead of the last weights; 0.998 averages over about 500 steps. Accuracy here moves
    # by half a point from one epoch to the next at the end of a run (bench/results/recipes.json).
    ema_decay: float = 0.0
    # > 0: knowledge distillation: each training target is (1 - w) * the (smoothed) label + w * a
    # teacher's probabilities for that image (train_backbone's ``teacher_proba``; no mixup with it).
    distill_weight: float = 0.0
    # "bf16": mixed precision (torch.autocast to bfloat16 for the forward pass and loss; weights, optimiser
    # and validation stay float32). On a CPU with AMX or AVX512-BF16 a training step runs 1.6x
    # faster at 64 px (bench/results/training_throughput_precision.json); without them bfloat16 is emulated and slower.
    precision: str = "fp32"
    # The MLP head registered with the backbone: "refit" fits it anew on the training embeddings;
    # "classifier" answers as the backbone's own training classifier: calibrated, but the online head
    # updates, refitted on training embeddings too, then lose more FER2013 accuracy against it than the
    # gate allows (training/pipeline.fit_head, README "The shipped model").
    head: str = "refit"
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 0
    device: str | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(input_size=self.image_size, grayscale=self.grayscale, face_margin=self.face_margin)

    def to_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _AugmentedImages(Dataset):
    def __init__(self, data: LabelledImages, transform):
        self.x = torch.from_numpy(data.x).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W), a view
        self.y = torch.from_numpy(data.y)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i], i  # the index finds the item's teacher probabilities


def class_weights(counts: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Inverse-frequency weights, softened by ``power`` (0.5 = inverse square root), mean 1."""
    w = (counts.max() / np.maximum(counts, 1)) ** power
    return w / w.mean()


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=1)
    if weight is not None:
        per_item = -(target * logp).sum(1) * (target * weight).sum(1)
        return per_item.mean()
    return -(target * logp).sum(1).mean()


@torch.inference_mode()
def accuracy(model: EmbeddingNet, data: LabelledImages, prep: Preprocessing, device, batch_size: int = 512) -> float:
    """Top-1 accuracy of the training classifier; under torchrun each process scores its slice and the counts are summed."""
    model.eval()
    correct = 0
    start, stop = distributed.shard(len(data))
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        xb = torch.from_numpy(normalise(data.x[s:e], prep)).to(device)
        correct += (model.logits(xb).argmax(1).cpu().numpy() == data.y[s:e]).sum()
    if distributed.current().enabled:
        correct = distributed.all_sum([correct])[0]
    return float(correct) / max(len(data), 1)


class _Plateau:
    """The plateau schedule's state: a rate factor cut by ``cut`` after ``patience`` epochs without a
    new best validation accuracy; finished once a cut would take it below ``floor``."""

    def __init__(self, cut: float, patience: int, floor: float):
        self.cut, self.patience, self.floor = cut, patience, floor
        self.factor, self.best, self.flat, self.finished = 1.0, -1.0, 0, False

    def step(self, score: float) -> None:
        if score > self.best + 1e-4:
            self.best, self.flat = score, 0
            return
        self.flat += 1
        if self.flat > self.patience:
            self.flat = 0
            if self.factor * self.cut < self.floor:
                self.finished = True
            else:
                self.factor *= self.cut


def train_backbone(
    cfg: TrainConfig,
    train: LabelledImages,
    val: LabelledImages,
    out_dir: str | Path,
    resume: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
    initial: EmbeddingNet | None = None,
    teacher_proba: np.ndarray | None = None,
) -> EmbeddingNet:
    """Train an EmbeddingNet (a new one, or fine-tune ``initial``); returns it in eval mode on the CPU.

    Under torchrun every process calls this and gets the same model back; ``on_epoch`` is called
    in every process with the metrics of the whole epoch (summed over the processes).
    ``teacher_proba`` (N x classes, in ``train``'s order) are the targets ``cfg.distill_weight`` blends in.
    """
    from timm.data import Mixup

    d = distributed.current()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + d.rank)  # augmentation and mixing differ per process; the data order is shared (order_rng)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.device_for(cfg.device, d)
    n_classes = len(train.classes)
    prep = cfg.preprocessing
    model = initial if initial is not None else create_backbone(
        cfg.backbone, n_classes, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
        drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **(cfg.backbone_args or {}),
    )
    if initial is not None:  # a continued model takes this run's dropout (its stochastic depth was fixed when it was built)
        model.embed[0].p = cfg.drop_rate
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)
    distributed.broadcast_state(model)  # every process starts from rank 0's weights (alone: nothing to do)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)  # every process averages the same weights

    counts = train.class_counts()
    weights = class_weights(counts)
    sampler = None
    order_rng = torch.Generator().manual_seed(cfg.seed)  # one generator, checkpointed, so resume continues the order
    dataset = _AugmentedImages(train, train_transform(prep, cfg.occlusion_p, cfg.erasing_p, cfg.augment))
    batch_size = min(cfg.batch_size, len(train) - len(train) % 2) or 2
    if d.enabled:
        # Each process takes its part of every epoch; the global batch is split evenly (BatchNorm needs 2 a process).
        batch_size = max(batch_size // d.world_size, 2)
        if cfg.balance == "sampler":
            sampler = distributed.DistributedWeightedSampler(weights[train.y], len(train), d.rank, d.world_size, order_rng)
        else:
            sampler = DistributedSampler(dataset, d.world_size, d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    elif cfg.balance == "sampler":
        item_w = weights[train.y]
        sampler = WeightedRandomSampler(torch.as_tensor(item_w, dtype=torch.double), len(train), generator=order_rng)
    loss_weight = torch.as_tensor(weights, dtype=torch.float32, device=device) if cfg.balance == "loss" else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
        generator=order_rng,
    )
    teacher = None
    if cfg.distill_weight:
        if teacher_proba is None or len(teacher_proba) != len(train):
            raise ValueError(f"distill_weight {cfg.distill_weight} needs the teacher's probabilities for each of the {len(train)} "
                             "training images")
        if cfg.mixup_prob > 0:
            raise ValueError("distillation blends each image's own teacher probabilities: set mixup_prob to 0")
        teacher = torch.as_tensor(np.asarray(teacher_proba), dtype=torch.float32, device=device)
    mixer = None
    if cfg.mixup_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        mixer = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=n_classes)

    feature_params = list(model.features.parameters())
    head_params = list(model.embed.parameters()) + list(model.classifier.parameters())
    feature_lr = cfg.lr * (cfg.unfreeze_lr_scale if cfg.freeze_epochs else 1.0)
    groups = [{"params": feature_params, "lr": feature_lr}, {"params": head_params, "lr": cfg.lr}]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    steps_per_epoch = max(len(loader), 1)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    plateau = _Plateau(cfg.plateau_factor, cfg.plateau_patience, cfg.min_lr_ratio) if cfg.schedule == "plateau" else None

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if plateau is not None:
            return plateau.factor
        progress = (step - warmup) / max(total - warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_epoch = 0
    ckpt_path = out_dir / "last.pt"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        np.random.set_state(state["numpy_rng"])
        if "order_rng" in state:
            order_rng.set_state(state["order_rng"].cpu())
        if plateau is not None and "plateau" in state:
            plateau.__dict__.update(state["plateau"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        start_epoch = state["epoch"] + 1
        if d.enabled:  # each process continues its own random streams (rank 0's are the ones above)
            rank_rngs = state.get("rank_rngs") or []
            if len(rank_rngs) == d.world_size:
                torch.set_rng_state(rank_rngs[d.rank][0].cpu())
                np.random.set_state(rank_rngs[d.rank][1])
            elif d.rank:  # written by another number of processes: fresh streams, still distinct per rank
                seed_everything(cfg.seed + d.rank + 1000 * start_epoch)
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    ddp, ddp_frozen = None, None  # under torchrun: the DDP module over what trains in this stage
    for epoch in range(start_epoch, cfg.epochs):
        if plateau is not None and plateau.finished:
            if d.is_main:
                print(f"stopping after epoch {epoch}: the learning rate reached its floor and accuracy stopped rising", flush=True)
            break
        frozen = epoch < cfg.freeze_epochs
        for p in feature_params:
            p.requires_grad_(not frozen)
        if d.enabled:
            if ddp is None or ddp_frozen != frozen:
                ddp, ddp_frozen = None, frozen  # drop the old reducer (and its hooks) before making the new one
                ddp = distributed.wrap_ddp(model, device)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
        model.train()
        if frozen:
            model.features.eval()  # keep BatchNorm statistics of the frozen part
        running, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}" + (" (frozen)" if frozen else ""), unit="batch",
                   disable=not d.is_main)
        for xb, yb, ib in bar:
            xb, yb = xb.to(device, memory_format=torch.channels_last), yb.to(device)
            if mixer is not None:
                xb, target = mixer(xb, yb)
            else:
                target = torch.full((len(yb), n_classes), cfg.label_smoothing / n_classes, device=device)
                target.scatter_(1, yb[:, None], 1 - cfg.label_smoothing + cfg.label_smoothing / n_classes)
            if teacher is not None:
                target = (1 - cfg.distill_weight) * target + cfg.distill_weight * teacher[ib.to(device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = ddp(xb) if ddp is not None else model.logits(xb)
            loss = _soft_cross_entropy(logits.float(), target, loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            running += loss.item() * len(yb)
            seen += len(yb)
            bar.set_postfix(loss=f"{running / seen:.3f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
        if d.enabled:
            distributed.broadcast_state(model, buffers_only=True)  # one model in every process, also its BatchNorm statistics
            running, seen = distributed.all_sum([running, seen])
        metrics = {"train_loss": running / max(seen, 1), "val_accuracy": accuracy(ema.module if ema else model, val, prep, device),
                   "lr": scheduler.get_last_lr()[-1]}
        if ema is not None:
            metrics["val_accuracy_last_weights"] = accuracy(model, val, prep, device)
        if plateau is not None:
            plateau.step(metrics["val_accuracy"])
        if d.is_main:
            log.info("epoch %d: %s", epoch + 1, metrics)
            print(f"epoch {epoch + 1}/{cfg.epochs}: train_loss={metrics['train_loss']:.4f} val_accuracy={metrics['val_accuracy']:.4f}", flush=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                 "order_rng": order_rng.get_state(), "config": cfg.to_params(),
                 "plateau": plateau.__dict__ if plateau is not None else None,
                 "ema": ema.module.state_dict() if ema is not None else None}
        if d.enabled:  # rank 0's state, plus every process's random streams
            state.update(world_size=d.world_size,
                         rank_rngs=distributed.all_gather_object((torch.get_rng_state(), np.random.get_state())))
        if d.is_main:
            torch.save(state, ckpt_path)
        if on_epoch:
            on_epoch(epoch, metrics)
    if ema is not None:
        model = ema.module
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return model
