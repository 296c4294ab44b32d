"""Training-time augmentation, and the lower-face occlusion used for both training and evaluation.

Faces in clinics are often half hidden (masks, pacifiers, hands), so the model is trained
with its lower face occluded some of the time and evaluated on fully occluded lower faces.
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


def train_transform(prep: Preprocessing, occlusion_p: float = 0.2, erasing_p: float = 0.25) -> v2.Compose:
    """uint8 (3, H, W) tensor -> augmented, normalised float tensor."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.0 if prep.grayscale else 0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([prep.mean] * 3, [prep.std] * 3),
            LowerFaceOcclusion(occlusion_p),
            v2.RandomErasing(p=erasing_p, scale=(0.02, 0.15), value=0),
        ]
    )
