"""Training and embedding-extraction throughput on this machine, and how cost grows.

    .venv/bin/python -m bench.training_throughput      # ~3 minutes on 2 CPU cores

For each backbone and input size: images/s of a full training step (augmentation, forward,
backward, AdamW) at batch 128, and of embedding extraction (inference) at batch 256. The cost
of an epoch is linear in the data size, so the table gives seconds per epoch for FER2013
(23,138 training images) and for the infant folder's size; the plot shows the growth with
input resolution.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from backbones.inference import embed_images
from backbones.model import create_backbone
from bench.common import RESULTS, write_result
from infantino.images import Preprocessing
from training.augment import train_transform


def train_rate(name: str, size: int, steps: int, batch: int = 128, precision: str = "fp32") -> float:
    model = create_backbone(name, 7).train().to(memory_format=torch.channels_last)  # as training/trainer.py
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    aug = train_transform(Preprocessing(input_size=size))
    raw = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 7, (batch,))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        x = torch.stack([aug(im) for im in raw]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as TrainConfig.precision
            logits = model.logits(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def embed_rate(name: str, size: int, batches: int, batch: int = 256) -> float:
    model = create_backbone(name, 7).eval()
    x = np.random.default_rng(0).integers(0, 255, (batch * batches, size, size, 3), dtype=np.uint8)
    prep = Preprocessing(input_size=size)
    embed_images(model, x[:batch], prep, batch)
    t = time.perf_counter()
    embed_images(model, x, prep, batch)
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,efficientnet_b0")
    ap.add_argument("--sizes", default="48,64,96")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (mixed precision, `infantino train --precision`)")
    ap.add_argument("--name", default="training_throughput", help="the result's name under bench/results")
    args = ap.parse_args()
    rows = []
    combos = [(b, int(s), p) for b in args.backbones.split(",") for s in args.sizes.split(",") for p in args.precisions.split(",")]
    for name, size, precision in tqdm(combos, desc="backbone x size x precision"):
        tr, em = train_rate(name, size, args.steps, precision=precision), embed_rate(name, size, 2)
        rows.append({"backbone": name, "size": size, "precision": precision, "train_img_per_s": tr, "embed_img_per_s": em,
                     "fer2013_epoch_s": 23138 / tr, "fer2013_embed_s": 25709 / em, "infant_466_epoch_s": 466 / tr})
        tqdm.write(str({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}))
    path = write_result(args.name, {"command": "python -m bench.training_throughput " + " ".join(sys.argv[1:]),
                                                 "threads": torch.get_num_threads(), "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in args.backbones.split(","):
        for precision in args.precisions.split(","):
            r = [x for x in rows if x["backbone"] == name and x["precision"] == precision]
            ax.plot([x["size"] for x in r], [x["train_img_per_s"] for x in r], "o-", label=f"{name} train {precision}")
        r = [x for x in rows if x["backbone"] == name and x["precision"] == args.precisions.split(",")[0]]
        ax.plot([x["size"] for x in r], [x["embed_img_per_s"] for x in r], "s--", label=f"{name} embed")
    ax.set_xlabel("input size (px)")
    ax.set_ylabel("images / s (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Throughput on this CPU ({torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
