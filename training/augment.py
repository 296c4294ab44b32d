"""Training-time augmentation, and the lower-face occlusion used for both training and evaluation.

Faces in clinics are often half hidden (masks, pacifiers, hands), so the model is trained
with its lower face occluded some of the time and evaluated on fully occluded lower faces.

``AUGMENTATIONS`` names how far the training views range: ``"standard"`` (the shipped model's), or
``"wide"``, which also turns the face up to 20 degrees, scales it 0.8-1.25, blurs, sharpens and
stretches its contrast, so that the features meet faces unlike FER2013's (web photos of infants).
On the infant feedback half it lifts the model as it is by 2.6 points but the loop's reading after
the feedback by only 0.4, at FER2013 -0.7 (README "Status"), so it is not the default.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from infantino.images import Preprocessing


class LowerFaceOcclusion(torch.nn.Module):
    """With probability ``p``, cover a band of the lower face with a flat patch (a mask)."""

    def __init__(self, p: float = 0.2, top: tuple[float, float] = (0.5, 0.65)):
        super().__init__()
        self.p, self.top = p, top

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        y0 = int(h * torch.empty(()).uniform_(*self.top))
        x0, x1 = int(w * 0.12), int(w * 0.88)
        out = img.clone()
        out[..., y0:, x0:x1] = torch.empty(()).uniform_(-1.0, 1.0)  # any flat colour, in normalised units
        return out


def occlude_lower_face(x: torch.Tensor, top: float = 0.55) -> torch.Tensor:
    """Deterministic version for evaluation: normalised (N, 3, H, W) with the lower face flat."""
    h, w = x.shape[-2:]
    out = x.clone()
    out[..., int(h * top) :, int(w * 0.12) : int(w * 0.88)] = 0.0
    return out


# How far each named augmentation's views range: the affine turn, shift and scale, the brightness and
# contrast jitter, and whether the face is also blurred, sharpened and contrast-stretched at times.
_RANGES = {
    "standard": {"degrees": 10, "translate": 0.06, "scale": (0.9, 1.1), "jitter": 0.3, "appearance": False},
    "wide": {"degrees": 20, "translate": 0.1, "scale": (0.8, 1.25), "jitter": 0.4, "appearance": True},
}
AUGMENTATIONS = tuple(_RANGES)


def train_transform(prep: Preprocessing, occlusion_p: float = 0.2, erasing_p: float = 0.25, augment: str = "standard") -> v2.Compose:
    """uint8 (3, H, W) tensor -> augmented, normalised float tensor; ``augment``: one of ``AUGMENTATIONS``."""
    if augment not in _RANGES:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    r = _RANGES[augment]
    appearance = [v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.3), v2.RandomAdjustSharpness(2.0, p=0.3),
                  v2.RandomAutocontrast(p=0.3)] if r["appearance"] else []
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=r["degrees"], translate=(r["translate"],) * 2, scale=r["scale"]),
            *appearance,
            v2.ColorJitter(brightness=r["jitter"], contrast=r["jitter"], saturation=0.0 if prep.grayscale else 0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([prep.mean] * 3, [prep.std] * 3),
            LowerFaceOcclusion(occlusion_p),
            v2.RandomErasing(p=erasing_p, scale=(0.02, 0.15), value=0),
        ]
    )
