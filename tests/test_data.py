"""training.data.load_dataset: folders, FER2013 CSVs and .npz files, the odd and the broken."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testkit.faces import TINY_CLASSES, draw_face, face_arrays, make_image_folder
from infantino import FER_CLASSES
from training.data import DatasetError, LabelledImages, load_dataset, stratified_split


def assert_batch(data: LabelledImages, n: int, size: int, grey: bool = True) -> None:
    assert data.x.shape == (n, size, size, 3)
    assert data.x.dtype == np.uint8
    assert data.y.shape == (n,) and data.y.dtype == np.int64
    assert len(data) == n
    if grey:
        assert (data.x[..., 0] == data.x[..., 1]).all() and (data.x[..., 1] == data.x[..., 2]).all()


# ---- image folders --------------------------------------------------------------------------------

def _odd_files(label: int, rng) -> dict[str, bytes]:
    """One face of class ``label`` in every odd format the decoder supports."""
    face = draw_face(label, 48, rng)

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgba = face.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 8
    sixteen = Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257)
    palette = face.convert("P", palette=Image.Palette.ADAPTIVE, colors=15)
    transparent = palette.copy()
    transparent.putpixel((0, 0), 15)  # the one pixel using index 15, which is transparent
    return {
        "a.jpg": enc(face, "JPEG"),
        "b.png": enc(face, "PNG"),
        "c.webp": enc(face, "WEBP"),
        "d.png": enc(face.convert("L"), "PNG"),
        "e.png": enc(rgba, "PNG"),
        "f.png": enc(palette, "PNG"),
        "g.gif": enc(transparent, "GIF", transparency=15),
        "h.jpg": enc(face.convert("CMYK"), "JPEG"),
        "i.png": enc(sixteen, "PNG"),
        "j.jpeg": enc(face.transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif),
        "k.bmp": enc(face, "BMP"),
        "L.TIFF": enc(face, "TIFF"),
    }


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    for label, name in enumerate(TINY_CLASSES):
        (root / name).mkdir(parents=True)
        for fname, data in _odd_files(label, rng).items():
            (root / name / fname).write_bytes(data)
    # One corrupt image, one text file, a nested sub-folder and hidden files.
    good_jpeg = (root / "happy" / "a.jpg").read_bytes()
    (root / "happy" / "broken.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (root / "sad" / "README.txt").write_text("these are sad faces\n")
    (root / "surprise" / "more").mkdir()
    draw_face(2, 48, rng).save(root / "surprise" / "more" / "nested.png")
    (root / "sad" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"junk")
    return root


def test_folder_with_odd_formats_skips_bad_files(odd_folder):
    data = load_dataset(odd_folder, image_size=32, classes=TINY_CLASSES)
    n_formats = 12
    assert_batch(data, 3 * n_formats + 1, 32)
    assert data.classes == list(TINY_CLASSES)
    assert data.class_counts().tolist() == [n_formats, n_formats, n_formats + 1]
    assert data.skipped == 2  # broken.jpg and README.txt; hidden files are not even tried
    joined = " ".join(data.skipped_examples)
    assert "broken.jpg" in joined and "README.txt" in joined and "DS_Store" not in joined


def test_folder_odd_formats_all_look_like_faces(odd_folder):
    """Each decoded variant (rotated, CMYK, 16-bit, palette...) matches the plain PNG of the same face."""
    data = load_dataset(odd_folder, image_size=32, classes=TINY_CLASSES)
    happy = data.x[data.y == 0][..., 0].astype(int)  # files sorted: L.TIFF, a.jpg, b.png, ...
    names = sorted(_odd_files(0, np.random.default_rng(0)))
    reference = happy[names.index("b.png")]
    assert len(names) == len(happy)
    for name, img in zip(names, happy):
        # correlation, not equality: 16-bit input is stretched to its own maximum, jpeg is lossy
        corr = np.corrcoef(img.ravel(), reference.ravel())[0, 1]
        assert corr > 0.95, f"{name} decodes differently from the PNG (correlation {corr:.3f})"
    upside_down = np.corrcoef(happy[names.index("j.jpeg")][::-1].ravel(), reference.ravel())[0, 1]
    assert upside_down < 0.9  # the test can tell a wrongly oriented face apart


def test_folder_classes_none_takes_sorted_folder_names(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("zebra", "apple", "mango"), per_class=3)
    data = load_dataset(root, image_size=16, classes=None)
    assert data.classes == ["apple", "mango", "zebra"]
    assert_batch(data, 9, 16)
    assert data.class_counts().tolist() == [3, 3, 3]


def test_folder_label_set_order_is_kept(tiny_folder):
    order = ["surprise", "happy", "sad"]
    data = load_dataset(tiny_folder, image_size=16, classes=order)
    assert data.classes == order
    again = load_dataset(tiny_folder, image_size=16, classes=None)
    # the same images, labelled through a different order
    for image, label in zip(again.x[:: 12], again.y[:: 12]):
        i = int(np.flatnonzero((data.x == image).all(axis=(1, 2, 3)))[0])
        assert data.classes[data.y[i]] == again.classes[label]


def test_folder_colour_keeps_channels(tmp_path):
    root = tmp_path / "colour"
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), colour).save(root / name / f"{i}.png")
    data = load_dataset(root, image_size=8, grayscale=False, classes=None)
    assert_batch(data, 4, 8, grey=False)
    assert data.classes == ["blue", "red"]
    assert data.x[data.y == 1][0, 4, 4].tolist() == [220, 20, 20]
    assert data.x[data.y == 0][0, 4, 4].tolist() == [20, 20, 220]


def test_folder_with_a_subset_of_fer_classes_uses_default_fer_label_set(tmp_path):
    root = make_image_folder(tmp_path / "fer", classes=FER_CLASSES, per_class=2, size=24)
    data = load_dataset(root, image_size=24)  # classes default to the 7 FER names
    assert data.classes == list(FER_CLASSES)
    assert data.class_counts().tolist() == [2] * 7


def test_folder_empty_class(tiny_folder):
    (tiny_folder / "neutral").mkdir()
    with pytest.raises(DatasetError, match=r"\['neutral'\].*no readable images"):
        load_dataset(tiny_folder, image_size=16, classes=None)


def test_folder_class_with_only_unreadable_files(tiny_folder):
    bad = tiny_folder / "neutral"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"\['neutral'\].*no readable images"):
        load_dataset(tiny_folder, image_size=16, classes=None)


def test_folder_missing_class_of_label_set(tiny_folder):
    with pytest.raises(DatasetError, match=r"\['angry', 'disgust', 'fear', 'neutral'\] have no readable images"):
        load_dataset(tiny_folder, image_size=16)  # default FER label set; only 3 of 7 present


def test_folder_unknown_class_name(tiny_folder):
    (tiny_folder / "bored").mkdir()
    draw_face(0).save(tiny_folder / "bored" / "0.png")
    with pytest.raises(DatasetError, match=r"unknown label\(s\) \['bored'\]; accepted labels are \['happy', 'sad', 'surprise'\]"):
        load_dataset(tiny_folder, image_size=16, classes=TINY_CLASSES)


def test_folder_single_class(one_class_folder):
    with pytest.raises(DatasetError, match="at least two classes"):
        load_dataset(one_class_folder, image_size=16, classes=None)


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    draw_face(0).save(tmp_path / "flat" / "0.png")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(tmp_path / "flat", image_size=16)


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DatasetError, match="unknown data layout"):
        load_dataset(tmp_path / "data.json")


# ---- limit ----------------------------------------------------------------------------------------

def test_limit_is_stratified_and_reproducible(tiny_folder):
    full = load_dataset(tiny_folder, image_size=16, classes=None)
    small = load_dataset(tiny_folder, image_size=16, classes=None, limit=9, seed=3)
    assert_batch(small, 9, 16)
    assert small.class_counts().tolist() == [3, 3, 3]
    assert small.classes == full.classes
    # every kept image is one of the full set's, with the same label
    for image, label in zip(small.x, small.y):
        matches = np.flatnonzero((full.x == image).all(axis=(1, 2, 3)))
        assert matches.size and (full.y[matches] == label).all()
    again = load_dataset(tiny_folder, image_size=16, classes=None, limit=9, seed=3)
    other = load_dataset(tiny_folder, image_size=16, classes=None, limit=9, seed=4)
    assert again.fingerprint() == small.fingerprint()
    assert other.fingerprint() != small.fingerprint()
    assert load_dataset(tiny_folder, image_size=16, classes=None, limit=1000).fingerprint() == full.fingerprint()


def test_limit_keeps_skipped_count(odd_folder):
    data = load_dataset(odd_folder, image_size=16, classes=TINY_CLASSES, limit=6)
    assert len(data) == 6 and data.class_counts().tolist() == [2, 2, 2]
    assert data.skipped == 2


def test_limit_smaller_than_the_class_count(tiny_folder):
    with pytest.raises(DatasetError, match=r"limit 2 is smaller than the number of classes \(3\)"):
        load_dataset(tiny_folder, image_size=16, classes=None, limit=2)


@pytest.mark.parametrize("limit", [3, 34, 35])
def test_limit_where_sklearn_cannot_stratify(tiny_folder, limit):
    """Too few kept or left-out items to stratify: still a subset with every class, no sklearn ValueError."""
    data = load_dataset(tiny_folder, image_size=16, classes=None, limit=limit)
    assert len(data) == limit and data.class_counts().min() >= 1
    if limit == 3:
        assert data.class_counts().tolist() == [1, 1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_limit_with_a_single_image_class(tiny_folder, seed):
    for f in sorted((tiny_folder / "surprise").iterdir())[1:]:
        f.unlink()
    data = load_dataset(tiny_folder, image_size=16, classes=None, limit=20, seed=seed)
    assert len(data) == 20 and data.class_counts()[2] == 1


def test_stratified_split_is_fixed_and_covers_classes(tiny_folder):
    data = load_dataset(tiny_folder, image_size=16, classes=None)
    train, val = stratified_split(data, 0.25, seed=0)
    assert len(train) == 27 and len(val) == 9
    assert val.class_counts().tolist() == [3, 3, 3]
    train2, val2 = stratified_split(data, 0.25, seed=0)
    assert train2.fingerprint() == train.fingerprint() and val2.fingerprint() == val.fingerprint()
    # tiny edge: 6 items, 3 classes, 60 % validation leaves 2 for training -> random, no crash
    tiny = data.subset(np.array([0, 1, 12, 13, 24, 25]))
    tr, va = stratified_split(tiny, 0.6, seed=0)
    assert len(tr) + len(va) == 6 and len(va) == 4


# ---- FER2013 CSV ------------------------------------------------------------------------------------

def write_fer_csv(path: Path, rows: list[tuple], header=("emotion", "pixels", "Usage")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def fer_rows(n_per_class: int, n_classes: int = 3, size: int = 48, seed: int = 0) -> tuple[list[tuple], np.ndarray]:
    x, y = face_arrays(n_per_class, n_classes, size, seed)
    rows = [(int(label), " ".join(map(str, img.ravel().tolist())), "Training" if i % 3 else "PublicTest")
            for i, (img, label) in enumerate(zip(x, y))]
    return rows, x


def test_csv_loads_and_skips_malformed_rows(tmp_path):
    rows, x = fer_rows(4)
    bad = [
        (0, "1 2 3", "Training"),  # not a square
        (1, "10 20 x 40", "Training"),  # not a number
        (2, " ".join(["300"] * 4), "Training"),  # not 8-bit
        (0, "", "Training"),  # empty
    ]
    path = write_fer_csv(tmp_path / "fer.csv", rows[:6] + bad + rows[6:])
    with path.open("a") as fh:
        fh.write("1\n")  # a short row: no pixels column at all
    data = load_dataset(path, image_size=48, classes=TINY_CLASSES)
    assert_batch(data, 12, 48)
    assert data.skipped == 5
    assert data.class_counts().tolist() == [4, 4, 4]
    assert np.array_equal(data.x[..., 0], x)  # 48 -> 48: the pixels themselves
    assert any("row 8" in s for s in data.skipped_examples)  # header is row 1; the 1st bad row is row 8


def test_csv_resizes(tmp_path):
    rows, _ = fer_rows(2, size=20)
    data = load_dataset(write_fer_csv(tmp_path / "fer.csv", rows), image_size=32, classes=TINY_CLASSES)
    assert_batch(data, 6, 32)


def test_csv_usage_filter(tmp_path):
    rows, _ = fer_rows(6)
    path = write_fer_csv(tmp_path / "fer.csv", rows)
    n_public = sum(r[2] == "PublicTest" for r in rows)
    public = load_dataset(path, image_size=16, classes=TINY_CLASSES, usage="PublicTest")
    training = load_dataset(path, image_size=16, classes=TINY_CLASSES, usage="Training")
    everything = load_dataset(path, image_size=16, classes=TINY_CLASSES)
    assert len(public) == n_public == 6
    assert len(training) == 12 and len(everything) == 18


def test_csv_usage_filter_ignores_bad_rows_it_filters_out(tmp_path):
    rows, _ = fer_rows(2)
    path = write_fer_csv(tmp_path / "fer.csv", rows + [(9, "1 2 3 4", "PrivateTest")])
    assert len(load_dataset(path, image_size=16, classes=TINY_CLASSES, usage="Training")) == 4
    with pytest.raises(DatasetError):
        load_dataset(path, image_size=16, classes=TINY_CLASSES)


def test_csv_default_label_set_is_fer(tmp_path):
    x, _ = face_arrays(1, 7, size=8)
    rows = [(label, " ".join(map(str, img.ravel().tolist())), "Training") for label, img in enumerate(x)]
    data = load_dataset(write_fer_csv(tmp_path / "fer.csv", rows), image_size=8, classes=None)
    assert data.classes == list(FER_CLASSES)
    assert data.y.tolist() == list(range(7))


def test_csv_out_of_range_emotion(tmp_path):
    rows, _ = fer_rows(2)
    path = write_fer_csv(tmp_path / "fer.csv", rows + [(3, rows[0][1], "Training")])
    with pytest.raises(DatasetError, match=r"fer.csv:8: unknown label 3; accepted are 0..2"):
        load_dataset(path, image_size=16, classes=TINY_CLASSES)


def test_csv_non_integer_emotion(tmp_path):
    rows, _ = fer_rows(2)
    path = write_fer_csv(tmp_path / "fer.csv", [("happy", rows[0][1], "Training")] + rows)
    with pytest.raises(DatasetError, match=r"fer.csv:2: emotion 'happy' is not an integer"):
        load_dataset(path, image_size=16, classes=TINY_CLASSES)


def test_csv_missing_pixels_column(tmp_path):
    path = write_fer_csv(tmp_path / "fer.csv", [(0, "Training"), (1, "Training")], header=("emotion", "Usage"))
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['pixels'\]"):
        load_dataset(path, image_size=16, classes=TINY_CLASSES)


def test_csv_all_rows_malformed(tmp_path):
    path = write_fer_csv(tmp_path / "fer.csv", [(0, "1 2 3", "Training"), (1, "a", "Training")])
    with pytest.raises(DatasetError, match="no readable images"):
        load_dataset(path, image_size=16, classes=TINY_CLASSES)


# ---- .npz ---------------------------------------------------------------------------------------------

def test_npz_grey(tmp_path):
    x, y = face_arrays(3, size=48)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(TINY_CLASSES))
    data = load_dataset(tmp_path / "d.npz", image_size=48, classes=None)
    assert_batch(data, 9, 48)
    assert data.classes == list(TINY_CLASSES)
    assert data.y.tolist() == y.tolist()
    assert np.array_equal(data.x[..., 0], x)
    assert data.skipped == 0


def test_npz_colour_and_single_channel(tmp_path):
    x, y = face_arrays(2, size=24)
    colour = np.stack([x, x // 2, np.zeros_like(x)], axis=-1)  # N×H×W×3
    np.savez(tmp_path / "c.npz", x=colour, y=y, classes=np.array(TINY_CLASSES))
    data = load_dataset(tmp_path / "c.npz", image_size=24, grayscale=False, classes=TINY_CLASSES)
    assert_batch(data, 6, 24, grey=False)
    assert np.array_equal(data.x, colour)
    grey = load_dataset(tmp_path / "c.npz", image_size=12, grayscale=True, classes=TINY_CLASSES)
    assert_batch(grey, 6, 12)
    np.savez(tmp_path / "one.npz", x=x[..., None], y=y, classes=np.array(TINY_CLASSES))
    assert_batch(load_dataset(tmp_path / "one.npz", image_size=24, classes=TINY_CLASSES), 6, 24)


def test_npz_float_pixels_are_clipped(tmp_path):
    x, y = face_arrays(2, size=16)
    xf = x.astype(np.float32)
    xf[:, 0, 0] = 400.0
    xf[:, 0, 1] = -5.0
    np.savez(tmp_path / "f.npz", x=xf, y=y, classes=np.array(TINY_CLASSES))
    data = load_dataset(tmp_path / "f.npz", image_size=16, classes=TINY_CLASSES)
    assert (data.x[:, 0, 0, 0] == 255).all() and (data.x[:, 0, 1, 0] == 0).all()


def test_npz_labels_are_mapped_to_the_requested_order(tmp_path):
    x, y = face_arrays(2, size=16)
    stored = np.array(["sad", "surprise", "happy"])  # y indexes this order
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=stored)
    data = load_dataset(tmp_path / "d.npz", image_size=16, classes=TINY_CLASSES)
    assert data.classes == list(TINY_CLASSES)
    assert [data.classes[i] for i in data.y] == [str(stored[i]) for i in y]
    auto = load_dataset(tmp_path / "d.npz", image_size=16, classes=None)
    assert auto.classes == ["happy", "sad", "surprise"]
    assert [auto.classes[i] for i in auto.y] == [str(stored[i]) for i in y]


def test_npz_without_classes_uses_fer(tmp_path):
    x, _ = face_arrays(1, 7, size=8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(7))
    data = load_dataset(tmp_path / "d.npz", image_size=8)
    assert data.classes == list(FER_CLASSES) and data.y.tolist() == list(range(7))


def test_npz_bad_label(tmp_path):
    x, y = face_arrays(2, size=16)
    y = y.copy()
    y[0] = 5
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(TINY_CLASSES))
    with pytest.raises(DatasetError, match=r"unknown label\(s\) \[5\]; accepted are 0..2"):
        load_dataset(tmp_path / "d.npz", image_size=16, classes=TINY_CLASSES)
    y[0] = -1
    np.savez(tmp_path / "n.npz", x=x, y=y, classes=np.array(TINY_CLASSES))
    with pytest.raises(DatasetError, match=r"unknown label\(s\) \[-1\]"):
        load_dataset(tmp_path / "n.npz", image_size=16, classes=TINY_CLASSES)


def test_npz_stored_class_not_in_label_set(tmp_path):
    x, y = face_arrays(2, size=16)
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["happy", "sad", "bored"]))
    with pytest.raises(DatasetError, match=r"unknown label\(s\) \['bored'\]"):
        load_dataset(tmp_path / "d.npz", image_size=16, classes=TINY_CLASSES)


def test_npz_bad_shapes_and_missing_arrays(tmp_path):
    x, y = face_arrays(2, size=16)
    np.savez(tmp_path / "two_channels.npz", x=np.stack([x, x], -1), y=y)
    with pytest.raises(DatasetError, match="N×H×W or N×H×W×3"):
        load_dataset(tmp_path / "two_channels.npz", image_size=16, classes=TINY_CLASSES)
    np.savez(tmp_path / "short_y.npz", x=x, y=y[:-1])
    with pytest.raises(DatasetError, match="one label per image"):
        load_dataset(tmp_path / "short_y.npz", image_size=16, classes=TINY_CLASSES)
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(DatasetError, match=r"missing array\(s\) \['y'\]"):
        load_dataset(tmp_path / "no_y.npz", image_size=16, classes=TINY_CLASSES)


def test_npz_missing_class(tmp_path):
    x, y = face_arrays(2, size=16)
    keep = y != 2
    np.savez(tmp_path / "d.npz", x=x[keep], y=y[keep], classes=np.array(TINY_CLASSES))
    with pytest.raises(DatasetError, match=r"\['surprise'\] have no readable images"):
        load_dataset(tmp_path / "d.npz", image_size=16, classes=TINY_CLASSES)
