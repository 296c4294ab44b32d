"""``infantino``: the command-line tool for training, evaluating and managing models.

    infantino train --data DIR|CSV|NPZ     train a backbone + head and register them as champion
    infantino evaluate --data ...          score the champion (or a version) on labelled data
    infantino models                       list registered versions and their aliases
    infantino promote VERSION              make a head (or backbone) version champion
    infantino rollback                     move champion back to the previous champion
    infantino update                       run an online update from queued feedback now
    infantino adapt                        fine-tune the champion's backbone from stored feedback images, gated
    infantino bootstrap                    register the shipped model if the registry has no champion
    infantino bundle                       copy the champions into BentoML's store (before `bentoml build`)
    infantino settings                     every setting: its environment variable, default and meaning

The top floor: it composes the others (training, registry, online, adaptation, store) for people.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from backbones.views import TTA_MODES
from infantino import FER_CLASSES
from infantino.faces import DETECTORS
from infantino.images import PRECROPPED_FACE_MARGIN


def _classes(value: str | None):
    if value is None or value == "fer":
        return FER_CLASSES
    if value == "auto":
        return None
    return [c.strip() for c in value.split(",") if c.strip()]


def _registry(task: str | None, tracking_uri: str | None):
    from registry.store import ModelRegistry

    return ModelRegistry(task=task, tracking_uri=tracking_uri)


task_option = click.option("--task", default=None, help="Task name (default: the first of INFANTINO_TASKS, expression). "
                           "Each task has its own models and label set.")
uri_option = click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                          help="MLflow tracking URI (default: SQLite under $INFANTINO_HOME, ./.infantino).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """InfantinO: facial-expression models that keep learning from their users."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--data", required=True, help="A folder with one sub-folder per class, a FER2013-style CSV, or an .npz (x, y, classes).")
@click.option("--classes", default="fer", help="Label set: 'fer' (the 7 FER2013 classes), 'auto' (the data's own) or a comma list.")
@click.option("--limit", type=int, default=None, help="Use a stratified random subset of this many images (quick runs).")
@click.option("--backbone", default="efficientnet_b0", help="Any timm model name.")
@click.option("--pretrained/--no-pretrained", default=False, help="Start from timm's pretrained weights (needs a network).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False), help="Local timm weights file to start from (offline pretrained).")
@click.option("--image-size", default=64, help="Input size in pixels (square).")
@click.option("--color/--grayscale", default=False, help="Feed colour or grey images to the model (FER is grey).")
@click.option("--epochs", default=10)
@click.option("--batch-size", default=128, help="Images per step (under torchrun: the global batch, split over the processes).")
@click.option("--lr", default=1e-3, help="Peak learning rate (after warm-up).")
@click.option("--warmup-epochs", default=1.0, help="Epochs of linear warm-up to --lr (short when continuing a trained model).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", help="AdamW, or SGD with Nesterov momentum 0.9.")
@click.option("--schedule", type=click.Choice(["cosine", "plateau"]), default="cosine",
              help="cosine: decay over --epochs; plateau: halve the rate when validation accuracy stops rising, stop at the floor.")
@click.option("--plateau-patience", default=2, help="plateau: epochs without a new best before the rate is cut.")
@click.option("--weight-decay", default=0.05)
@click.option("--label-smoothing", default=0.1)
@click.option("--balance", type=click.Choice(["sampler", "loss", "none"]), default="sampler", help="How to counter class imbalance.")
@click.option("--mixup", default=0.2, help="Mixup alpha (0 turns it off).")
@click.option("--cutmix", default=1.0, help="CutMix alpha (0 turns it off).")
@click.option("--mix-prob", default=0.5, help="Probability a batch is mixed.")
@click.option("--occlusion", default=0.2, help="Probability of the lower-face occlusion augmentation.")
@click.option("--augment", type=click.Choice(["standard", "wide"]), default="standard",  # training.augment.AUGMENTATIONS (torchvision stays out of the CLI's start)
              help="How far the training views range: 'wide' also turns, scales, blurs, sharpens and stretches the contrast "
                   "more (faces unlike the training data's; training/augment.py).")
@click.option("--ema-decay", default=0.0,
              help="> 0: register an exponential moving average of the weights (e.g. 0.998) instead of the last ones.")
@click.option("--distill-from", default=None,
              help="Knowledge distillation: blend this registered backbone's probabilities (its training classifier, with "
                   "--distill-tta views) into every training target; a comma-separated list (e.g. 3,4) averages an "
                   "ensemble of backbones. Needs --mix-prob 0.")
@click.option("--distill-weight", default=0.5, help="With --distill-from: the teacher's share of each target.")
@click.option("--distill-tta", type=click.Choice(TTA_MODES), default="flip+shift", help="With --distill-from: the teacher's test-time views.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              help="bf16: mixed-precision training (bfloat16 autocast; 1.6x the steps a second on a CPU with AMX).")
@click.option("--head", "head_from", type=click.Choice(["refit", "classifier"]), default="refit",
              help="The registered MLP head: refitted on the training embeddings (early-stopped), or answering as the "
                   "backbone's training classifier (better calibrated; the online head updates find it harder to beat).")
@click.option("--drop-rate", default=0.2, help="Dropout before the embedding layer (a continued model takes it too).")
@click.option("--freeze-epochs", default=0, help="Two-stage schedule: train only the embedding layer for this many epochs first.")
@click.option("--unfreeze-lr-scale", default=0.1, help="Backbone learning rate relative to --lr after unfreezing.")
@click.option("--val-fraction", default=0.1, help="Stratified validation split.")
@click.option("--seed", default=0)
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present).")
@click.option("--out-dir", default=None, help="Where checkpoints go (default: $INFANTINO_HOME/runs/<task>-<backbone>).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out-dir.")
@click.option("--init-from", default=None, help="Start from this registered backbone version or alias (e.g. champion) under a fresh schedule.")
@click.option("--no-promote", is_flag=True, help="Register without making the new versions champion.")
@click.option("--crop-faces", type=click.Choice(DETECTORS), default="none",
              help="Read image folders from their largest face (whole scenes -> face crops), as the service's face_crop does.")
@click.option("--face-margin", type=float, default=PRECROPPED_FACE_MARGIN,
              help="The framing of the training faces: with --crop-faces, the margin of the crops; without, how the "
                   "(already cropped) faces are framed. Recorded with the model; the service crops faces alike.")
@task_option
@uri_option
def train(data, classes, limit, backbone, pretrained, checkpoint, image_size, color, epochs, batch_size, lr, warmup_epochs, optimizer, schedule,
          plateau_patience, weight_decay,
          label_smoothing, balance, mixup, cutmix, mix_prob, occlusion, augment, ema_decay, distill_from, distill_weight, distill_tta, precision, head_from, drop_rate, freeze_epochs, unfreeze_lr_scale, val_fraction,
          seed, threads, device, out_dir, resume, init_from, no_promote, crop_faces, face_margin, task, tracking_uri):
    """Train a backbone and an MLP head on labelled images and register both in MLflow.

    Under torchrun (`torchrun --nproc_per_node N --no-python infantino train ...`) the processes
    train one model with DistributedDataParallel (gloo on CPU, nccl on GPUs), --batch-size is the
    global batch, and rank 0 alone writes checkpoints and registers.
    """
    from backbones.model import BackboneError
    from registry.store import RegistryError
    from training import distributed
    from training.data import DatasetError
    from training.pipeline import train_and_register
    from training.trainer import TrainConfig

    cfg = TrainConfig(
        backbone=backbone, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size, grayscale=not color, face_margin=face_margin,
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, optimizer=optimizer, schedule=schedule, plateau_patience=plateau_patience,
        weight_decay=weight_decay, label_smoothing=label_smoothing,
        balance=balance, mixup_alpha=mixup, cutmix_alpha=cutmix, mixup_prob=mix_prob, occlusion_p=occlusion, augment=augment, ema_decay=ema_decay, drop_rate=drop_rate, precision=precision, head=head_from,
        distill_weight=distill_weight if distill_from else 0.0, freeze_epochs=freeze_epochs, unfreeze_lr_scale=unfreeze_lr_scale, val_fraction=val_fraction, seed=seed,
        threads=threads, device=device,
    )
    try:
        with distributed.session(device):
            # Rank 0 opens the registry first: a new SQLite registry is created (migrated) once.
            registry = distributed.main_first(lambda: _registry(task, tracking_uri))
            train_and_register(data, cfg, registry, _classes(classes), limit, out_dir, resume,
                               not no_promote, crop_faces=crop_faces, init_from=init_from, distill_from=distill_from,
                               distill_tta=distill_tta)
    except (DatasetError, BackboneError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--data", required=True, help="Labelled images in any supported layout.")
@click.option("--version", "version", default="champion", help="Head version or alias to evaluate.")
@click.option("--limit", type=int, default=None)
@click.option("--holdout", type=float, default=None,
              help="Score only the validation part of the stratified split `train` makes with this --val-fraction (and --seed).")
@click.option("--seed", default=0, help="Seed of that split (train's --seed).")
@click.option("--confusion-png", default=None, help="Write the confusion matrix here.")
@click.option("--tta", type=click.Choice(TTA_MODES), default=None,
              help="Test-time augmentation (default: the service's INFANTINO_TTA).")
@task_option
@uri_option
def evaluate(data, version, limit, holdout, seed, confusion_png, tta, task, tracking_uri):
    """Score a registered model on labelled data (accuracy, macro-F1, recall, ECE, occluded)."""
    from registry.store import RegistryError
    from training.data import DatasetError, load_dataset, stratified_split
    from training.evaluate import save_confusion_matrix
    from training.pipeline import evaluate_pair

    reg = _registry(task, tracking_uri)
    try:
        head = reg.load_head(version)
        backbone = reg.load_backbone(head.backbone_version)
        prep = backbone.preprocessing
        ds = load_dataset(data, prep.input_size, prep.grayscale, head.classes, limit=limit, seed=seed)
        if holdout:
            _, ds = stratified_split(ds, holdout, seed)
    except (RegistryError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from None
    from infantino.settings import get_settings

    tta = tta or get_settings().models.tta
    metrics, probs, _ = evaluate_pair(backbone.model, head.model, ds, prep, head.classes, prefix="", tta=tta)
    metrics.update(n=len(ds), skipped=ds.skipped, head_version=head.version, backbone_version=backbone.version, tta=tta,
                   data=str(data), holdout=holdout, seed=seed)
    if confusion_png:
        save_confusion_matrix(probs, ds.y, head.classes, confusion_png)
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@task_option
@uri_option
def models(task, tracking_uri):
    """List registered backbone and head versions with their aliases."""
    reg = _registry(task, tracking_uri)
    for kind in ("backbone", "head"):
        click.echo(f"{reg.names[kind]}:")
        rows = reg.list_versions(kind)
        if not rows:
            click.echo("  (none)")
        for r in rows:
            t = r["tags"]
            extra = f" backbone=v{t.get('backbone_version', '?')}" if kind == "head" else ""
            click.echo(f"  v{r['version']:<4} {','.join(r['aliases']) or '-':<22} val_accuracy={t.get('val_accuracy', '?')}"
                       f" origin={t.get('origin', 'train')}{extra} {t.get('gate', '')}")


@main.command()
@click.argument("version")
@click.option("--kind", type=click.Choice(["head", "backbone"]), default="head")
@click.option("--alias", default="champion", help="champion or challenger (or any alias).")
@task_option
@uri_option
def promote(version, kind, alias, task, tracking_uri):
    """Make VERSION the champion (served by every worker within seconds)."""
    from registry.store import RegistryError

    try:
        _registry(task, tracking_uri).promote(kind, version, alias)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{kind} v{version} is now {alias}")


@main.command()
@click.option("--kind", type=click.Choice(["head", "backbone"]), default="head")
@task_option
@uri_option
def rollback(kind, task, tracking_uri):
    """Move champion back to the previous champion."""
    from registry.store import RegistryError

    try:
        version = _registry(task, tracking_uri).rollback(kind)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{kind} champion rolled back to v{version}")


@main.command()
@click.option("--force", is_flag=True, help="Run even if fewer items are queued than the trigger threshold.")
@task_option
@uri_option
def update(force, task, tracking_uri):
    """Run one online update now: partial_fit on queued feedback, gate, register, promote."""
    from infantino.settings import get_settings
    from online.updater import Updater
    from registry.embedder import torch_embedder
    from store import Stores

    reg = _registry(task, tracking_uri)
    stores = Stores.open(get_settings().storage.database_url)
    report = Updater(get_settings().online, reg, stores.feedback, stores.lease, embed=torch_embedder(reg)).run_once(force=force)
    if report is None:
        raise click.ClickException("no update ran: nothing queued (or below the threshold without --force), or another process holds the lease")
    click.echo(json.dumps(report.to_dict(), indent=2))


@main.command()
@click.option("--data", "data_path", default=None, help="The champion's training data (replayed, and its validation split "
              "checked by the gate). Default: the path recorded with the champion's backbone.")
@click.option("--part", type=click.Choice(["embed", "layer4+embed", "all"]), default=None,
              help="What of the backbone learns (with its classifier). Default (as for every option left out: "
                   "training/adapt.py AdaptConfig, chosen by bench/feature_adaptation.py): all.")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--feedback-weight", type=float, default=None, help="A feedback image against a replayed training image.")
@click.option("--replay", "replay_size", type=int, default=None, help="Training images replayed beside the feedback.")
@click.option("--distill", type=click.FloatRange(0), default=None,
              help="Weight of matching the champion's answers on replayed images (learning without forgetting).")
@click.option("--soup", type=click.IntRange(1), default=None,
              help="Fine-tunes (seeds seed, seed+1, ...) whose weights are averaged into the one adapted (a model soup).")
@click.option("--interpolation", "interpolation_grid", type=click.FloatRange(0, 1, min_open=True), multiple=True,
              help="Interpolation weights tried between the backbone and its fine-tune (1: the fine-tune; repeat the "
                   "option); the largest whose old-domain drop is within the gate's allowance with 95% confidence is kept. "
                   "Default: 1 .85 .7 .55 .4 .25.")
@click.option("--limit", type=int, default=None, help="Read at most this many training images (for quick tries).")
@click.option("--force", is_flag=True, help="Adapt even if the champion or challenger came from exactly the stored feedback.")
@task_option
@uri_option
def adapt(data_path, part, epochs, lr, feedback_weight, replay_size, distill, soup, interpolation_grid, limit, force, task,
          tracking_uri):
    """Fine-tune the champion's backbone on all stored feedback images (with replay of its training
    data), gate it like an online update, register backbone + head, promote if the gate passes."""
    from pathlib import Path

    from adaptation.backbone import AdaptationError, NothingNew, adapt_from_feedback
    from infantino.settings import get_settings
    from registry.store import CHAMPION
    from store import Stores
    from training.adapt import AdaptConfig
    from training.data import load_dataset

    reg = _registry(task, tracking_uri)
    champion = reg.load_head(CHAMPION)
    backbone = reg.version_info("backbone", champion.backbone_version)
    data_path = data_path or backbone.tags.get("data")
    if not data_path or not Path(data_path).exists():
        raise click.ClickException(f"the champion's training data is needed for replay: pass --data PATH "
                                   f"(recorded with backbone v{champion.backbone_version}: {backbone.tags.get('data')!r})")
    prep = reg.load_backbone(champion.backbone_version).preprocessing
    data = load_dataset(data_path, prep.input_size, prep.grayscale, champion.classes, limit=limit)
    stores = Stores.open(get_settings().storage.database_url)
    given = {"part": part, "epochs": epochs, "lr": lr, "feedback_weight": feedback_weight, "replay_size": replay_size,
             "distill": distill, "soup": soup, "interpolation_grid": tuple(interpolation_grid) or None}
    cfg = AdaptConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        report = adapt_from_feedback(reg, stores.feedback, get_settings().online, data, cfg, force=force,
                                     say=lambda *a, **k: click.echo(" ".join(map(str, a)), err=True))
    except NothingNew as exc:  # not a failure: a scheduled run found nothing to do
        click.echo(json.dumps({"skipped": str(exc)}))
        return
    except AdaptationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report.to_dict(), indent=2))


@main.command()
@click.option("--if-empty/--always", default=True, help="Only register when the registry has no champion yet.")
@task_option
@uri_option
def bootstrap(if_empty, task, tracking_uri):
    """Register the model shipped in registry/default_model/ as champion (first run).

    The service does the same on start when the registry has no champion; both hold one lease
    in the store (INFANTINO_QUEUE_URL) so the model is registered once (service/models.py).
    """
    from infantino.settings import get_settings
    from registry.shipped import DEFAULT_DIR, shipped_meta
    from registry.store import RegistryError
    from service.models import register_initial_once

    if not (DEFAULT_DIR / "model.json").exists():
        raise click.ClickException(f"no shipped model in {DEFAULT_DIR}; train one with `infantino train --data ...`")
    task = task or shipped_meta()["task"]
    try:
        versions = register_initial_once(get_settings(), task, tracking_uri=tracking_uri, always=not if_empty)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    reg = _registry(task, tracking_uri)
    if versions is None:
        if not reg.has_champion():
            raise click.ClickException(f"another process is registering the shipped model at {reg.display_uri}; try again later")
        click.echo(f"registry at {reg.display_uri} already has a champion (task {reg.task}, head v{reg.champion_version('head')})")
        return
    click.echo(f"registered the shipped model as champion: backbone v{versions[0]}, head v{versions[1]} ({reg.display_uri})")


@main.command("export-default")
@click.option("--out-dir", default=None, help="Default: registry/default_model/ (the model make serve registers on first run).")
@click.option("--command", "command", default="", help="The command that trained the champion (recorded in model.json).")
@click.option("--history", default=None, help="How the champion came to be, in words (recorded in model.json).")
@click.option("--not-trained-on", default=None, help="Data kept away from the champion, e.g. a benchmark's test set (recorded in model.json).")
@task_option
@uri_option
def export_default(out_dir, command, history, not_trained_on, task, tracking_uri):
    """Write the champion pair as the project's shipped model (safetensors + skops + model.json)."""
    from pathlib import Path

    from registry.shipped import DEFAULT_DIR, export_champion

    about = {"history": history, "not_trained_on": not_trained_on}
    out = export_champion(_registry(task, tracking_uri), Path(out_dir) if out_dir else DEFAULT_DIR, command,
                          {k: v for k, v in about.items() if v})
    click.echo(f"wrote {out}")


@main.command()
@task_option
@uri_option
def bundle(task, tracking_uri):
    """Copy the champion backbone and head of --task (default: every task in INFANTINO_TASKS)
    into BentoML's model store for `bentoml build`."""
    from infantino.settings import get_settings
    from registry.bundle import bundle_champions

    for name in [task] if task else get_settings().models.tasks:
        for tag in bundle_champions(_registry(name, tracking_uri)):
            click.echo(f"bundled {tag}")


@main.command("settings")
def settings_table():
    """Print every setting (environment variable, default, meaning) as the README's table."""
    from infantino.settings import markdown_table

    click.echo(markdown_table())


if __name__ == "__main__":
    sys.exit(main())
