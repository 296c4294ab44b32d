"""The backbone network: any timm model, topped with a 64-d embedding layer.

``create_backbone`` is the factory (in the spirit of ``timm.create_model``). The network
maps a normalised image batch to 64-d embeddings; a linear classifier sits on top only
while the backbone is trained, the served classifier is the scikit-learn head (heads/).

What it serves (``served_rows``) is each image's embedding followed by its *stage features*: the
average-pooled maps of the network's last two stages (768 numbers for resnet18), from the same
forward pass. The head's classifier reads the embedding; a named domain's memory
(heads/domain.py) reads the stage features, which the 64-d projection, trained for FER2013, has
not narrowed to FER2013's distinctions: on the infant feedback half (4-fold CV, 5 seeds) the
service's head with a domain classifier on them reads 62.3%, on the embedding 59.8% at best,
the model as it is 51.9% (bench/domain_memory_features.py). Pooling three stages, max- or
GeM-pooling, flipped views: no better (scratch probes, 2026-12-07); the two stages pooled on a 2x2
grid, so the memory knows where on the face: 1.4 points worse (bench/domain_memory_levers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from infantino import EMBEDDING_DIM


STAGE_FEATURE_STAGES = 2  # how many of the last stages' pooled maps follow the embedding in served rows


class BackboneError(RuntimeError):
    """The backbone cannot be built as asked (unknown name, weights unavailable...)."""


def feature_width(features: nn.Module) -> int:
    """What a timm model without classifier outputs: its pre-logits width where it has one (VGG), else num_features."""
    return int(getattr(features, "head_hidden_size", None) or features.num_features)


class EmbeddingNet(nn.Module):
    """timm features -> Linear -> BatchNorm -> 64-d embedding (+ a training-only classifier)."""

    def __init__(self, features: nn.Module, n_classes: int, embedding_dim: int = EMBEDDING_DIM, drop_rate: float = 0.2):
        super().__init__()
        self.features = features
        self.embed = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(feature_width(features), embedding_dim), nn.BatchNorm1d(embedding_dim)
        )
        self.classifier = nn.Linear(embedding_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> embeddings; this is what the registry stores and the runner serves."""
        return self.embed(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward(x))

    def served_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> rows of [64-d embedding | stage features] (see the module's docstring), in one pass."""
        stages = getattr(self.features, "forward_intermediates", None)
        if stages is None:  # a timm model without intermediates: its pooled features stand in
            pooled = self.features(x)
            return torch.cat([self.embed(pooled), pooled], dim=1)
        final, last_two = stages(x, indices=STAGE_FEATURE_STAGES)
        pooled = [m.mean(dim=(2, 3)) if m.ndim == 4 else m.mean(dim=1) for m in last_two]  # NCHW maps, or tokens (ViT)
        return torch.cat([self.embed(self.features.forward_head(final)), *pooled], dim=1)


def create_backbone(
    name: str = "efficientnet_b0",
    n_classes: int = 7,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    embedding_dim: int = EMBEDDING_DIM,
    drop_rate: float = 0.2,
    drop_path_rate: float = 0.0,
    **timm_args,
) -> EmbeddingNet:
    """Build an EmbeddingNet over ``timm.create_model(name)``.

    ``pretrained`` downloads timm's weights (needs a network); ``checkpoint`` loads a local
    weights file for the timm model instead, which is the offline way to start pretrained.
    ``timm_args`` go to ``timm.create_model`` as they are (e.g. ``mlp_ratio`` for VGG).
    """
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise BackboneError(f"unknown timm model {name!r}; see timm.list_models() for accepted names")
    # drop_path_rate only when asked: some families (VGG) have no stochastic depth and refuse it.
    kwargs: dict = dict(num_classes=0, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}), **timm_args)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise BackboneError(f"checkpoint {checkpoint} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    elif pretrained:
        kwargs.update(pretrained=True)
    try:
        features = timm.create_model(name, **kwargs)
    except Exception as exc:  # timm raises many kinds when weights cannot be fetched
        if pretrained and checkpoint is None:
            raise BackboneError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "Without a network, pass a local weights file with --checkpoint PATH, or train from scratch without --pretrained."
            ) from exc
        raise BackboneError(f"could not build {name!r}: {exc}") from exc
    return EmbeddingNet(features, n_classes, embedding_dim, drop_rate)
