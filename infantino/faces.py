"""Find faces in a picture and cut out the one the model should look at.

Training and serving crop with the *same* function (``crop_face``, called by
``infantino.regions.find_regions``), so the model sees faces framed identically in both places.

Detectors are pluggable behind the small ``FaceDetector`` protocol (``create_detector(name)``):

* ``"haar+cnn"`` (the default) - ``FallbackDetector``: Haar first, dlib's CNN on the photos
  where Haar finds nothing. On the 466 infant photos (bench/face_framing.py) Haar alone finds
  a face in 82 %, dlib's CNN alone in 86 %, the two together in 96 %, and Haar's speed
  stays where Haar finds a face.
* ``HaarDetector`` (``"haar"``) - OpenCV's frontal-face Haar cascade. The XML ships inside the
  ``opencv-python-headless`` wheel (``cv2.data.haarcascades``), so it works offline with
  nothing to download. Fast and dependency-free, but it only finds roughly frontal,
  upright faces.
* ``DlibCnnDetector`` (``"cnn"``) - dlib's MMOD CNN face detector; its weights come inside the
  ``face-recognition-models`` wheel, dlib inside ``dlib-bin``: offline too. Finds tilted and
  partly hidden faces Haar misses; ~0.3 s per photo on a CPU core.
* ``DlibHogDetector`` (``"hog"``) - dlib's HOG + linear SVM frontal detector (built into dlib).
* ``YuNetDetector`` - OpenCV's CNN detector ``cv2.FaceDetectorYN``. Much better on tilted,
  partial or small faces, but needs the ONNX weights, which are *not* shipped with OpenCV:
  download ``face_detection_yunet_2023mar.onnx`` from the OpenCV model zoo
  (https://github.com/opencv/opencv_zoo/tree/main/models/face_detection_yunet) and pass
  its path.
* ``NoFaceDetector`` (``"none"``) - never finds a face, so the whole image is classified:
  the behaviour without face detection.

Boxes are always ``(x, y, w, h)`` in the pixels of the image given to ``detect``, whatever
size the detector worked at internally, in **one framing convention**: the Haar cascade's
(brow to chin). dlib's boxes are tighter, so they are enlarged by ``DLIB_TO_HAAR_SCALE`` about
their centre; a crop margin then means the same thing whichever detector found the face.
Faces come back largest first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "DETECTORS",
    "DlibCnnDetector",
    "DlibHogDetector",
    "Face",
    "FaceDetector",
    "FallbackDetector",
    "HaarDetector",
    "NoFaceDetector",
    "YuNetDetector",
    "create_detector",
    "crop_face",
]

# Haar's box side over dlib's for the same face: the median over 324 infant photos where both
# detectors found it (interquartile range 1.06-1.26; centres agree within 4 % of the side).
DLIB_TO_HAAR_SCALE = 1.18

YUNET_MODEL_URL = (
    "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
    "face_detection_yunet_2023mar.onnx"
)


@dataclass(frozen=True)
class Face:
    """One detected face.

    ``box`` is ``(x, y, w, h)`` in the original image's pixels (x, y = top-left corner).
    ``score`` is detector-specific, higher = more confident: YuNet's confidence in [0, 1];
    for Haar the cascade's last-stage weight (see ``HaarDetector``).
    """

    box: tuple[int, int, int, int]
    score: float

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]

    def to_dict(self) -> dict:
        x, y, w, h = self.box
        return {"x": x, "y": y, "w": w, "h": h, "score": self.score}


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, img: Image.Image) -> list[Face]:
        """Faces in ``img`` (any PIL mode), largest first; ``[]`` if none."""
        ...


# ---- helpers ------------------------------------------------------------------------------------

def _grey_array(img: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """A uint8 grey copy whose long side is at most ``max_side``, and the factor it was shrunk by."""
    grey = np.asarray(img.convert("L"))
    return _shrink(grey, max_side)


def _shrink(arr: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = arr.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max(h, w) > 0 else 1.0
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr), scale


def _to_original(x: float, y: float, w: float, h: float, scale: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Map a box found on the shrunk copy back to original pixels, clipped to the image."""
    x0 = max(0, int(round(x / scale)))
    y0 = max(0, int(round(y / scale)))
    x1 = min(width, int(round((x + w) / scale)))
    y1 = min(height, int(round((y + h) / scale)))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def _largest_first(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (f.area, f.score), reverse=True)


# ---- detectors ----------------------------------------------------------------------------------

class _PerThreadState:
    """OpenCV detectors are not thread-safe: each thread keeps its own in ``self._local``.

    threading.local cannot be pickled (e.g. into DataLoader workers): it is rebuilt instead.
    """

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


class HaarDetector(_PerThreadState):
    """OpenCV's frontal-face Haar cascades, shipped in the opencv-python(-headless) 4.x wheel.

    Detection runs on a grey copy shrunk so its long side is at most ``max_side`` (the
    cascade is scale-invariant, and this bounds the cost: a 12-megapixel photo costs the
    same as a 640 px one); boxes are mapped back to the original pixels and clipped to it.

    * ``scale_factor``: step between pyramid scales (smaller = slower, finds more sizes).
    * ``min_neighbors``: overlapping raw hits needed to keep a box (higher = fewer false
      positives, more misses).
    * ``min_size``: smallest face, as a fraction of the image's shorter side.

    Passes, stopping at the first that finds a face (so a clear frontal face costs one):

    1. ``haarcascade_frontalface_default.xml``;
    2. ``haarcascade_frontalface_alt2.xml`` (if ``alt2_fallback``);
    3. and 4. the same two on a copy with a replicated border of ``pad_fallback`` x the
       shorter side (if > 0). Close-ups often have a face that touches or overflows the
       frame, and the cascade must fit its whole window (brow to chin) in the picture.
       These passes only look for faces of at least ``pad_min_size`` x the shorter side:
       a face that overflows the frame is a close-up, and on the real photos the smaller
       windows found there were false positives and cost 6x the time (147 vs 24 ms).

    Measured on the 466 photos of ../shared/data/infant_faces (bench/face_detection.py;
    min_neighbors=5): the default cascade alone finds a face in 347; alt2 adds 21
    (19 real faces on inspection), the padded passes 16 more (15 real), i.e. 384 images
    (82 %). The fallbacks cost time only on images where the earlier passes found nothing.

    ``score`` is the cascade's level weight (the sum of the last stage's weak classifiers
    for the best window in the group; higher = more confidently a face; roughly -1..12 on
    real photos, not a probability, not comparable between cascades). Should OpenCV give
    no weight, the score is the face's area relative to the image's.

    A cascade object holds per-call scratch buffers, so each thread gets its own copies
    (loaded lazily); one detector can be shared by serving threads.
    """

    name = "haar"
    CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: float = 0.1,
        max_side: int = 640,
        alt2_fallback: bool = True,
        pad_fallback: float = 0.3,
        pad_min_size: float = 0.35,
    ):
        if not scale_factor > 1.0:
            raise ValueError(f"scale_factor must be > 1 (got {scale_factor})")
        if min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0 (got {min_neighbors})")
        if not 0.0 <= min_size < 1.0:
            raise ValueError(f"min_size is a fraction of the shorter side, in [0, 1) (got {min_size})")
        if max_side < 32:
            raise ValueError(f"max_side must be >= 32 pixels (got {max_side})")
        if not 0.0 <= pad_fallback <= 1.0:
            raise ValueError(f"pad_fallback is a fraction of the shorter side, in [0, 1] (got {pad_fallback})")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = float(min_size)
        self.max_side = int(max_side)
        self.alt2_fallback = bool(alt2_fallback)
        if not 0.0 <= pad_min_size < 1.0:
            raise ValueError(f"pad_min_size is a fraction of the shorter side, in [0, 1) (got {pad_min_size})")
        self.pad_fallback = float(pad_fallback)
        self.pad_min_size = float(pad_min_size)
        self._local = threading.local()
        for cascade in self._cascade_names():
            self._cascade(cascade)  # fail now, not at the first request, if an XML is missing

    def __repr__(self) -> str:
        return (
            f"HaarDetector(scale_factor={self.scale_factor}, min_neighbors={self.min_neighbors}, "
            f"min_size={self.min_size}, max_side={self.max_side}, alt2_fallback={self.alt2_fallback}, "
            f"pad_fallback={self.pad_fallback}, pad_min_size={self.pad_min_size})"
        )

    def _cascade_names(self) -> tuple[str, ...]:
        return self.CASCADES if self.alt2_fallback else self.CASCADES[:1]

    def _cascade(self, filename: str) -> cv2.CascadeClassifier:
        cache = getattr(self._local, "cascades", None)
        if cache is None:
            cache = self._local.cascades = {}
        cascade = cache.get(filename)
        if cascade is None:
            path = Path(cv2.data.haarcascades) / filename
            if not path.is_file():
                raise FileNotFoundError(
                    f"OpenCV's Haar cascade {path} is missing; install opencv-python-headless>=4.8,<5 "
                    "(the 4.x wheels ship the cascade files in cv2.data.haarcascades)"
                )
            cascade = cv2.CascadeClassifier(str(path))
            if cascade.empty():
                raise RuntimeError(f"OpenCV could not load the Haar cascade {path}")
            cache[filename] = cascade
        return cascade

    def detect(self, img: Image.Image) -> list[Face]:
        width, height = img.size
        grey, scale = _grey_array(img, self.max_side)
        short = min(grey.shape[:2])
        if short < 24:  # smaller than the cascades' 24x24 / 20x20 windows: nothing to find
            return []
        passes = [(grey, 0, max(24, int(round(self.min_size * short))))]
        if self.pad_fallback > 0:
            border = max(1, int(round(self.pad_fallback * short)))
            side = max(24, int(round(max(self.min_size, self.pad_min_size) * short)))
            passes.append((None, border, side))  # the padded copy is made only if needed
        for arr, border, side in passes:
            if arr is None:
                arr = cv2.copyMakeBorder(grey, border, border, border, border, cv2.BORDER_REPLICATE)
            for filename in self._cascade_names():
                faces = self._run(self._cascade(filename), arr, border, side, scale, width, height)
                if faces:
                    return _largest_first(faces)
        return []

    def _run(self, cascade, grey, border, side, scale, width, height) -> list[Face]:
        boxes, _levels, weights = cascade.detectMultiScale3(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        faces = []
        for i, (x, y, w, h) in enumerate(np.asarray(boxes).reshape(-1, 4)):
            box = _to_original(x - border, y - border, w, h, scale, width, height)
            if box is None:
                continue
            score = float(weights[i]) if i < len(weights) else box[2] * box[3] / float(width * height)
            faces.append(Face(box=box, score=score))
        return faces


class YuNetDetector(_PerThreadState):
    """OpenCV's CNN face detector ``cv2.FaceDetectorYN`` with user-supplied YuNet weights.

    ``model_path`` is the ONNX file ``face_detection_yunet_2023mar.onnx`` from the OpenCV
    model zoo (see ``YUNET_MODEL_URL``); it is not part of the OpenCV wheel, so a missing
    file raises ``FileNotFoundError`` at construction.

    How it runs: the image is converted to BGR uint8 (what OpenCV models expect), shrunk
    so its long side is at most ``max_side``, the detector's input size is set to that
    exact size (``setInputSize``, required before every ``detect`` whose size changed),
    and ``detect`` returns ``(ok, faces)`` where ``faces`` is ``None`` or an N x 15 float
    array: ``x, y, w, h``, five landmarks (x, y), then the confidence score. Boxes are
    scaled back to the original pixels; ``score`` is that confidence, in [0, 1].

    ``score_threshold`` drops weaker candidates, ``nms_threshold`` merges overlapping ones,
    ``top_k`` caps candidates before NMS. The network object is not thread-safe, so each
    thread gets its own instance.
    """

    name = "yunet"

    def __init__(
        self,
        model_path: str | Path,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        max_side: int = 640,
    ):
        if model_path is None or str(model_path).strip() == "":
            raise ValueError(
                "the 'yunet' face detector needs model_path: the ONNX file face_detection_yunet_2023mar.onnx "
                f"(download it from {YUNET_MODEL_URL})"
            )
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"YuNet model file not found: {path} - download face_detection_yunet_2023mar.onnx from "
                f"{YUNET_MODEL_URL} and pass its path"
            )
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1] (got {score_threshold})")
        if max_side < 32:
            raise ValueError(f"max_side must be >= 32 pixels (got {max_side})")
        self.model_path = path.resolve()
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self._local = threading.local()
        self._net((320, 320))  # load now so a corrupt file fails at start-up, not per request

    def __repr__(self) -> str:
        return f"YuNetDetector(model_path={str(self.model_path)!r}, score_threshold={self.score_threshold})"

    def _net(self, size: tuple[int, int]):
        net = getattr(self._local, "net", None)
        if net is None:
            try:
                net = cv2.FaceDetectorYN.create(
                    str(self.model_path), "", size, self.score_threshold, self.nms_threshold, self.top_k
                )
            except cv2.error as exc:
                raise ValueError(f"OpenCV could not load the YuNet model {self.model_path}: {exc}") from None
            self._local.net = net
        net.setInputSize(size)
        return net

    def detect(self, img: Image.Image) -> list[Face]:
        width, height = img.size
        rgb = np.asarray(img.convert("RGB"))
        small, scale = _shrink(rgb, self.max_side)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        h, w = bgr.shape[:2]
        _ok, found = self._net((w, h)).detect(bgr)  # input size is (width, height)
        if found is None:
            return []
        faces = []
        for row in np.asarray(found).reshape(-1, 15):
            box = _to_original(row[0], row[1], row[2], row[3], scale, width, height)
            if box is not None:
                faces.append(Face(box=box, score=float(row[14])))
        return _largest_first(faces)


class _DlibDetector(_PerThreadState):
    """Shared by dlib's detectors: a shrunk RGB copy in, boxes enlarged to the Haar convention out."""

    name = "dlib"

    def __init__(self, max_side: int, upsample: int):
        if max_side < 32:
            raise ValueError(f"max_side must be >= 32 pixels (got {max_side})")
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0 (got {upsample})")
        self.max_side, self.upsample = int(max_side), int(upsample)
        self._local = threading.local()
        self._detector()  # fail now, not at the first request, if dlib or the weights are missing

    def _detector(self):
        det = getattr(self._local, "detector", None)
        if det is None:
            det = self._local.detector = self._load()
        return det

    def _load(self):
        raise NotImplementedError

    def _raw(self, det, rgb: np.ndarray) -> list[tuple[object, float]]:
        """(dlib rectangle, score) pairs."""
        raise NotImplementedError

    def detect(self, img: Image.Image) -> list[Face]:
        width, height = img.size
        small, scale = _shrink(np.asarray(img.convert("RGB")), self.max_side)
        faces = []
        for rect, score in self._raw(self._detector(), small):
            w, h = rect.right() - rect.left(), rect.bottom() - rect.top()
            grow_w, grow_h = w * (DLIB_TO_HAAR_SCALE - 1) / 2, h * (DLIB_TO_HAAR_SCALE - 1) / 2
            box = _to_original(rect.left() - grow_w, rect.top() - grow_h, w + 2 * grow_w, h + 2 * grow_h, scale, width, height)
            if box is not None:
                faces.append(Face(box=box, score=float(score)))
        return _largest_first(faces)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_side={self.max_side}, upsample={self.upsample})"


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise ImportError("the dlib face detectors need dlib: pip install dlib-bin") from None
    return dlib


def dlib_weights_path(filename: str = "mmod_human_face_detector.dat") -> Path:
    """One of dlib's model files shipped in the face-recognition-models wheel (by default the MMOD
    CNN face detector's; the wheel also holds the 68-point landmark predictor and the face
    descriptor network, which bench/domain_memory_levers.py measures).

    Found without importing that package (its ``__init__`` needs setuptools' pkg_resources).
    """
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(spec.origin).parent / "models" / filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"dlib's model file {filename} is missing: pip install face-recognition-models")
    return path


class DlibHogDetector(_DlibDetector):
    """dlib's frontal face detector (HOG features + a linear SVM), built into dlib itself."""

    name = "hog"

    def __init__(self, max_side: int = 640, upsample: int = 1):
        super().__init__(max_side, upsample)

    def _load(self):
        return _import_dlib().get_frontal_face_detector()

    def _raw(self, det, rgb):
        rects, scores, _ = det.run(rgb, self.upsample)
        return list(zip(rects, scores))


class DlibCnnDetector(_DlibDetector):
    """dlib's MMOD CNN face detector (weights from the face-recognition-models wheel).

    Works on a copy whose long side is at most ``max_side`` (400 px: faces that fill at least
    a fifth of a photo are found without upsampling; the cost grows with the area).
    """

    name = "cnn"

    def __init__(self, max_side: int = 400, upsample: int = 0):
        super().__init__(max_side, upsample)

    def _load(self):
        return _import_dlib().cnn_face_detection_model_v1(str(dlib_weights_path()))

    def _raw(self, det, rgb):
        return [(d.rect, d.confidence) for d in det(rgb, self.upsample)]


class FallbackDetector:
    """Several detectors in turn: the first one that finds a face answers."""

    def __init__(self, detectors: list):
        if not detectors:
            raise ValueError("a fallback chain needs at least one detector")
        self.detectors = list(detectors)
        self.name = "+".join(d.name for d in self.detectors)

    def detect(self, img: Image.Image) -> list[Face]:
        for detector in self.detectors:
            faces = detector.detect(img)
            if faces:
                return faces
        return []

    def __repr__(self) -> str:
        return f"FallbackDetector({self.detectors!r})"


class NoFaceDetector:
    """Face detection switched off: never finds a face, so crops keep the whole image."""

    name = "none"

    def detect(self, img: Image.Image) -> list[Face]:
        return []

    def __repr__(self) -> str:
        return "NoFaceDetector()"


DETECTORS = ("haar+cnn", "haar", "cnn", "hog", "yunet", "none")
DEFAULT_DETECTOR = "haar+cnn"  # chosen by bench/face_framing.py: found rate and infant accuracy


def create_detector(name: str = DEFAULT_DETECTOR, model_path: str | Path | None = None, **options) -> FaceDetector:
    """Build a detector by name: one of ``DETECTORS``; ``a+b`` chains detectors (the first that
    finds a face answers). ``"yunet"`` needs ``model_path``.

    ``options`` go to the detector's constructor (e.g. ``min_neighbors=6`` for Haar,
    ``score_threshold=0.8`` for YuNet; not for a chain). Unknown names raise ``ValueError``;
    YuNet without a model path raises ``ValueError``, with a path that does not exist
    ``FileNotFoundError``.
    """
    key = (name or "").strip().lower()
    if "+" in key:
        if options:
            raise ValueError(f"a chain of detectors takes no options (got {sorted(options)})")
        return FallbackDetector([create_detector(part, model_path) for part in key.split("+")])
    if key == "haar":
        return HaarDetector(**options)
    if key == "cnn":
        return DlibCnnDetector(**options)
    if key == "hog":
        return DlibHogDetector(**options)
    if key == "yunet":
        return YuNetDetector(model_path, **options)
    if key == "none":
        if options:
            raise ValueError(f"the 'none' face detector takes no options (got {sorted(options)})")
        return NoFaceDetector()
    raise ValueError(f"unknown face detector {name!r}; choose one of: {', '.join(DETECTORS)}, or a+b to chain them")


# ---- cropping -----------------------------------------------------------------------------------

def crop_face(img: Image.Image, face: Face, margin: float = 0.0) -> Image.Image:
    """A square crop centred on ``face``, each side extended by ``margin`` x the box's longer side
    (a negative margin cuts into the box).

    The square's side is ``round(max(w, h) * (1 + 2 * margin))`` and its centre is the
    box's centre, so a face always lands at the same place and scale in the crop, wherever
    it was in the photo. Where the square leaves the image, the missing pixels repeat the
    nearest edge pixel ("edge" padding) rather than being black, and the square is not
    shifted back inside: shifting would move the face off-centre only for faces near the
    border, and black bars are hard, high-contrast edges that exist in no training photo,
    which a CNN can latch onto; replicated edges are smooth and low-information. The box
    is first clipped to the image. Returns a new image in the input's mode (RGB, L or RGBA;
    other modes are converted to RGB).
    """
    if not -0.4 <= margin:
        raise ValueError(f"margin must be >= -0.4 (got {margin})")
    if img.mode not in ("RGB", "L", "RGBA"):
        img = img.convert("RGB")
    width, height = img.size
    x, y, w, h = (int(v) for v in face.box)
    # Clip the box to the image (a box from elsewhere may overhang); it must keep some area.
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"face box {face.box} does not overlap the {width}x{height} image")
    side = max(1, int(round(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    right, bottom = left + side, top + side
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return img.crop((left, top, right, bottom))
    # The part inside the image, then edge padding for the rest.
    inner = np.asarray(img.crop((max(0, left), max(0, top), min(width, right), min(height, bottom))))
    pads = [(max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width))]
    if inner.ndim == 3:
        pads.append((0, 0))
    return Image.fromarray(np.pad(inner, pads, mode="edge"))  # mode follows the array: L, RGB or RGBA
