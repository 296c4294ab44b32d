"""A second opinion pretrained on more varied faces: face-api.js's expression network, in torch.

    .venv/bin/python -m bench.face_api [--check-tfjs]    # ~3 min; fetches the weights with npm once

The one lever left on the infant benchmark is features that start nearer infants than FER2013's
(bench/domain_memory_levers.py). Pretrained weights can't be downloaded here, but the npm
registry can be reached, and ``@vladmandic/face-api`` (MIT, the maintained fork of face-api.js)
ships its models inside the package: among them ``face_expression_model``, a 0.32 M-parameter
network of four dense blocks of depthwise-separable convolutions on 112 px colour crops,
answering the same seven expressions. Its authors trained it "on a variety of images from
publicly available datasets as well as images scraped from the web"; so it is *not* trained on
FER2013 alone, as the shipped model must be, and web photos such as the infant ones may be among
its training images (this can't be checked). That is why it is measured here, as a lever and as a
reference, and not shipped.

The network is ported layer by layer from face-api's source (``src/faceFeatureExtractor``):
TensorFlow's 'same' padding (the extra pixel of a stride-2 convolution goes bottom-right), the
mean RGB it subtracts, its 7x7 average pool, and its weight manifest (uint8-quantised
weights: ``q * scale + min``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import copy
import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.inference import embed_images
from bench.common import DOMAIN, FER_CLASSES, infant_split, write_result
from bench.face_framing import detected, framed
from bench.infant_adaptation import paired_gain, scores
from heads import configure_online, domain_memory, predict_proba, teach
from heads.feedback import memory_input
from infantino import EMBEDDING_DIM
from infantino.images import Preprocessing
from infantino.settings import OnlineSettings
from registry.shipped import shipped_backbone, shipped_head, shipped_meta

PACKAGE = "@vladmandic/face-api@1.7.15"
MODEL = "face_expression_model"
INPUT_SIZE = 112
MEAN_RGB = (122.782, 117.001, 104.298)
LABELS = {"angry": "angry", "disgust": "disgusted", "fear": "fearful", "happy": "happy", "sad": "sad",
          "surprise": "surprised", "neutral": "neutral"}  # ours -> face-api's
FACE_API_ORDER = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
TFJS = ("@tensorflow/tfjs@4.22.0", "@tensorflow/tfjs-backend-wasm@4.22.0")  # what face-api's Node build needs, for --check-tfjs
MARGINS = (-0.1, 0.0, 0.1, 0.2)
# Chosen on the feedback half: its best framing on its own (the sweep in main), and for the domain
# memory's features and the weight of its answer in the blend (bench/domain_memory_levers.py's folds).
ANSWER_MARGIN, FEATURE_MARGIN, ANSWER_WEIGHT = 0.0, 0.1, 0.3
CACHE = Path(os.environ.get("INFANTINO_FACE_API_DIR", Path.home() / ".cache" / "infantino" / PACKAGE.replace("/", "_")))


def weights_dir(cache: Path = CACHE) -> Path:
    """The folder holding the expression model's manifest and weights: fetched once with ``npm pack``."""
    if (cache / f"{MODEL}-weights_manifest.json").exists() and (cache / "face-api.node-wasm.js").exists():
        return cache
    if shutil.which("npm") is None:
        raise RuntimeError(f"face-api's weights are not in {cache} and npm is not installed to fetch {PACKAGE}; "
                           f"install npm, or unpack the package's model/{MODEL}* files there (INFANTINO_FACE_API_DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", tmp], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {PACKAGE} failed (is the npm registry reachable?): {done.stderr.strip()[-400:]}")
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
            members = [m for m in tar.getmembers()  # the model, and the Node build for --check-tfjs
                       if m.name.startswith(f"package/model/{MODEL}") or m.name == "package/dist/face-api.node-wasm.js"]
            cache.mkdir(parents=True, exist_ok=True)
            for m in members:
                (cache / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        (cache / "package.json").write_text("{}")  # so that node resolves TF.js from this folder (--check-tfjs)
    return cache


def read_manifest(manifest: Path) -> dict[str, np.ndarray]:
    """A TF.js weights manifest and its shards -> {name: float32 array}, dequantised."""
    tensors = {}
    for group in json.loads(manifest.read_text()):
        blob, at = b"".join((manifest.parent / p).read_bytes() for p in group["paths"]), 0
        for w in group["weights"]:
            n, q = int(np.prod(w["shape"])), w.get("quantization")
            dtype = np.dtype(q["dtype"] if q else w["dtype"])
            raw = np.frombuffer(blob, dtype, n, at).astype(np.float32)
            at += n * dtype.itemsize
            tensors[w["name"]] = (raw * q["scale"] + q["min"] if q else raw).reshape(w["shape"])
    return tensors


def _pad_same(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow's 'same' padding for a 3x3 kernel: a stride-2 layer's odd pixel goes bottom-right."""
    size = x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


class _SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(_pad_same(x, self.stride)))


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2)

    def forward(self, x):
        return self.conv(_pad_same(x, 2))


class _DenseBlock(nn.Module):
    """face-api's denseBlock4: four convolutions, each fed the sum of the ones before it."""

    def __init__(self, cin: int, cout: int, first: bool = False):
        super().__init__()
        self.convs = nn.ModuleList([_Conv(cin, cout) if first else _SeparableConv(cin, cout, 2)]
                                   + [_SeparableConv(cout, cout, 1) for _ in range(3)])

    def forward(self, x):
        outs = [F.relu(self.convs[0](x))]
        for conv in self.convs[1:]:
            outs.append(conv(F.relu(sum(outs))))  # the first is already rectified: relu changes it not
        return F.relu(sum(outs))


class FaceExpressionNet(nn.Module):
    """``features``: the 256-d bottleneck of RGB uint8 crops (N, 112, 112, 3); ``classify``: its logits in FER_CLASSES order."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_DenseBlock(3, 32, first=True), _DenseBlock(32, 64), _DenseBlock(64, 128), _DenseBlock(128, 256))
        self.fc = nn.Linear(256, 7)
        self.register_buffer("order", torch.tensor([FACE_API_ORDER.index(LABELS[c]) for c in FER_CLASSES]))

    def features(self, rgb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float()
        x = (x - torch.tensor(MEAN_RGB).view(1, 3, 1, 1)) / 255
        return F.avg_pool2d(self.blocks(x), 7, 2).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)[:, self.order]

    def forward(self, rgb: np.ndarray) -> torch.Tensor:
        return self.classify(self.features(rgb))

    @classmethod
    def pretrained(cls, folder: Path | None = None) -> FaceExpressionNet:
        w, net = read_manifest((folder or weights_dir()) / f"{MODEL}-weights_manifest.json"), cls()
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        with torch.no_grad():
            for b, block in enumerate(net.blocks):
                for c, conv in enumerate(block.convs):
                    name = f"dense{b}/conv{c}/"
                    if isinstance(conv, _Conv):  # TF [h, w, in, out] -> torch [out, in, h, w]
                        conv.conv.weight.copy_(t(w[name + "filters"].transpose(3, 2, 0, 1)))
                        conv.conv.bias.copy_(t(w[name + "bias"]))
                    else:  # depthwise [h, w, in, 1] -> [in, 1, h, w]
                        conv.depthwise.weight.copy_(t(w[name + "depthwise_filter"].transpose(2, 3, 0, 1)))
                        conv.pointwise.weight.copy_(t(w[name + "pointwise_filter"].transpose(3, 2, 0, 1)))
                        conv.pointwise.bias.copy_(t(w[name + "bias"]))
            net.fc.weight.copy_(t(w["fc/weights"].T))
            net.fc.bias.copy_(t(w["fc/bias"]))
        return net.eval()


def face_api_reading(net: FaceExpressionNet, rgb: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(256-d features, class probabilities in FER_CLASSES order) of RGB crops (N, 112, 112, 3)."""
    feats, proba = [], []
    with torch.no_grad():
        for i in range(0, len(rgb), batch):
            f = net.features(rgb[i:i + batch])
            feats.append(f.numpy())
            proba.append(net.classify(f).softmax(1).numpy())
    return np.concatenate(feats), np.concatenate(proba)


def crops(images, faces, prep: Preprocessing, margin: float) -> np.ndarray:
    """Each photo's largest face (``faces[i]``, found earlier), framed at ``margin``, as face-api reads it: 112 px colour."""
    return framed(images, faces, dataclasses.replace(prep, input_size=INPUT_SIZE, grayscale=False), margin)


def check_against_tfjs(net: FaceExpressionNet, rgb: np.ndarray) -> dict:
    """face-api's own code (its Node build, TF.js on the CPU) on ``rgb``, against the port: the largest gap in probability."""
    if shutil.which("node") is None:
        raise RuntimeError("--check-tfjs needs node and npm")
    folder = weights_dir()
    if not (folder / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder), *TFJS], check=True, timeout=900)
    with tempfile.TemporaryDirectory() as tmp:
        np.ascontiguousarray(rgb, np.uint8).tofile(Path(tmp) / "crops.bin")
        done = subprocess.run(["node", str(Path(__file__).with_name("face_api_tfjs.mjs")), str(folder), tmp],
                              capture_output=True, text=True, timeout=900, cwd=folder)
        if done.returncode != 0:
            raise RuntimeError(f"face-api's TF.js run failed: {done.stderr.strip()[-600:]}")
        tfjs = json.loads((Path(tmp) / "proba.json").read_text())
    theirs = np.array(tfjs["proba"])[:, [tfjs["labels"].index(LABELS[c]) for c in FER_CLASSES]]
    ours = face_api_reading(net, rgb)[1]
    return {"crops": len(rgb), "tfjs": tfjs["version"], "max_abs_probability_gap": float(np.abs(theirs - ours).max()),
            "same_answer": int(np.sum(theirs.argmax(1) == ours.argmax(1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-tfjs", action="store_true", help="also run face-api's own TF.js code on 32 feedback crops (needs node, npm)")
    args = ap.parse_args()
    net = FaceExpressionNet.pretrained()
    prep, defaults = Preprocessing.from_dict(shipped_meta()["preprocessing"]), OnlineSettings()
    s_files, s_y, t_files, t_y = infant_split()
    feedback, test = detected(s_files, s_y), detected(t_files, t_y)
    result = {"command": "python -m bench.face_api" + (" --check-tfjs" if args.check_tfjs else ""), "package": PACKAGE, "model": MODEL,
              "parameters": sum(p.numel() for p in net.parameters()), "detector": feedback[3].name}
    if args.check_tfjs:
        result["port_against_tfjs"] = check_against_tfjs(net, crops(*feedback[:2], prep, ANSWER_MARGIN)[:32])
        print(result["port_against_tfjs"])
    # 1. framing, on the feedback half only
    result["as_is_on_feedback_half_by_margin"] = {
        m: float(np.mean(face_api_reading(net, crops(*feedback[:2], prep, m))[1].argmax(1) == s_y)) for m in MARGINS}
    # 2. the test half, each reading taught the whole feedback half (offline: the loop's last state, not its HTTP path)
    backbone = shipped_backbone()

    def reading(images, faces):
        served = embed_images(backbone, framed(images, faces, prep), prep, stage_features=True)
        api_features = face_api_reading(net, crops(images, faces, prep, FEATURE_MARGIN))[0]
        return served, memory_input(served, EMBEDDING_DIM, defaults.update_domain_memory_features), api_features, \
            face_api_reading(net, crops(images, faces, prep, ANSWER_MARGIN))[1]

    (s_served, s_stages, s_api, _), (t_served, t_stages, t_api, t_answer) = reading(*feedback[:2]), reading(*test[:2])
    no_memory = configure_online(copy.deepcopy(shipped_head()), defaults).set_params(domain_memory=0.0)
    as_is = predict_proba(no_memory, t_served)
    base = predict_proba(teach(copy.deepcopy(no_memory), s_served, s_y, DOMAIN), t_served, DOMAIN)

    def taught(teach_x, answer_x):
        return domain_memory(defaults).fit(teach_x, s_y, DOMAIN).blend(base, answer_x, DOMAIN)

    shipped = taught(s_stages, t_stages)
    with_features = taught(np.c_[s_stages, s_api], np.c_[t_stages, t_api])
    rows = {"as is: the shipped head": as_is, "as is: face-api": t_answer, "as is: both averaged": (as_is + t_answer) / 2,
            "taught: the shipped loop": shipped, "taught: + face-api features": with_features,
            "taught: + face-api features and answer": (1 - ANSWER_WEIGHT) * with_features + ANSWER_WEIGHT * t_answer}
    pred = {name: proba.argmax(1) for name, proba in rows.items()}
    result["test_half"] = {name: scores(p, t_y) | {"right": int(np.sum(p == t_y)), "of": len(t_y)} for name, p in pred.items()}
    result["test_half_gains"] = {  # points, with a 95% bootstrap interval and McNemar's test
        "the shipped loop over the shipped head as is": paired_gain(pred["as is: the shipped head"], pred["taught: the shipped loop"], t_y),
        "with face-api, over the shipped head as is": paired_gain(pred["as is: the shipped head"],
                                                                  pred["taught: + face-api features and answer"], t_y),
        "with face-api, over both averaged as is": paired_gain(pred["as is: both averaged"],
                                                               pred["taught: + face-api features and answer"], t_y)}
    result["settings"] = {"feature_margin": FEATURE_MARGIN, "answer_margin": ANSWER_MARGIN, "answer_weight": ANSWER_WEIGHT,
                          "chosen_on": "the feedback half (bench/domain_memory_levers.py folds and the margin sweep above)"}
    for key in ("as_is_on_feedback_half_by_margin", "test_half_gains"):
        print(key, json.dumps(result[key], indent=1))
    print(f"wrote {write_result('face_api', result)}")


if __name__ == "__main__":
    main()
