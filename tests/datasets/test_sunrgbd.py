"""SUN RGB-D builder: a tiny SUNRGBD tree (JPEG images, bit-rotated 16-bit depth PNGs, intrinsics.txt, label
PNGs, split lists) built into a temporary data_dir and read back; the split lists and class tables against the
real metadata files."""

import os
import pathlib
import re

import numpy as np
import pytest

import builder_test_utils
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from auxmtl_datasets.nyu_v2 import builder_support as support
from auxmtl_datasets.sunrgbd import Sunrgbd, SunrgbdConfig
from auxmtl_datasets.sunrgbd import sunrgbd_dataset_builder as sun
from auxmtl_jax import geometry

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
SUN_META, NYU_META = SHARED / "sunrgbd-meta", SHARED / "nyuv2-meta"
SMALL = (48, 64)
PLANE_NORMAL = np.array([-0.2, 0.5, -0.84]) / np.linalg.norm([-0.2, 0.5, -0.84])
# (list line, frame (height, width), intrinsics); the kv2 frame is not 48x64 and gets resized.
SAMPLES = {
    "test": [
        ("SUNRGBD/kv1/NYUdata/NYU0001/image/NYU0001.jpg", (48, 64), (52.0, 52.0, 32.5, 24.0)),
        (
            "SUNRGBD/kv2/align_kv2/2014-12-18_14-11-02_260595134347//image/0000104.jpg",
            (53, 73),
            (53.0, 53.0, 36.5, 26.5),
        ),
    ],
    "train": [
        ("SUNRGBD/xtion/xtion_align_data/2014_12_05/image/0000001.jpg", (48, 64), (57.0, 57.0, 31.5, 23.5)),
        (
            "SUNRGBD/realsense/lg/2014_10_26-15_39_06-1311000073/image/0000111.jpg",
            (48, 64),
            (69.0, 69.0, 33.0, 22.0),
        ),
        ("SUNRGBD/kv1/b3dodata/img_0063/image/img_0063.jpg", (48, 64), (52.0, 52.0, 32.5, 24.0)),
    ],
}


def _plane_depth(normal, distance, intrinsics, shape):
    rows, cols = np.indices(shape, dtype=np.float64)
    rays = np.stack([cols, rows, np.ones_like(cols)], axis=-1) @ np.linalg.inv(intrinsics).T
    return -distance / (rays @ normal)


def _write_tree(root, rng=None):
    """Writes the manual_dir of a 5-sample SUN RGB-D; returns {list line: (image, depth metres, labels)}."""
    rng = rng or np.random.default_rng(3)
    written = {}
    label_names = sun.label_file_names(len(SAMPLES["test"]), len(SAMPLES["train"]))
    (root / sun.LABELS_FOLDER).mkdir(parents=True)
    for split in ("test", "train"):
        lines = []
        for (entry, shape, (fx, fy, cx, cy)), label_name in zip(SAMPLES[split], label_names[split]):
            lines.append(entry)
            image_path = root / os.path.normpath(entry)
            sample_dir = image_path.parent.parent
            (sample_dir / "image").mkdir(parents=True)
            (sample_dir / "depth").mkdir()
            image = np.full(shape + (3,), 90, np.uint8)
            image[:16] = [200, 40, 10]  # flat regions split on a JPEG block edge: decoded almost exactly
            Image.fromarray(image).save(image_path, quality=95, subsampling=0)
            intrinsics = geometry.intrinsics_matrix(fx, fy, cx, cy)
            (sample_dir / "intrinsics.txt").write_text(
                "\n".join(" ".join(f"{v:.6f}" for v in row) for row in intrinsics) + "\n"
            )
            if entry.startswith("SUNRGBD/kv1/NYUdata"):
                depth = _plane_depth(PLANE_NORMAL, 2.0, intrinsics, shape)
            elif "kv2" in entry:
                depth = np.full(shape, 2.5)  # fronto-parallel: normal (0, 0, -1) survives the resize
            else:
                depth = rng.uniform(0.5, 9.5, shape)  # some beyond the 8 m clip
            depth[-3:, :5] = 0.0
            png_values = geometry.encode_sunrgbd_depth(depth)
            Image.fromarray(png_values).save(sample_dir / "depth" / f"{image_path.stem}.png")
            labels = rng.integers(0, 38, shape).astype(np.uint8)
            Image.fromarray(labels).save(root / sun.LABELS_FOLDER / label_name)
            written[entry] = (image, geometry.decode_sunrgbd_depth(png_values), labels)
        (root / sun.SPLIT_LISTS[split]).write_text("\n".join(lines) + "\n")
    return written


def _build(config, manual_dir, data_dir):
    return builder_test_utils.build(Sunrgbd, config, manual_dir, data_dir)


_records = builder_test_utils.records_by_id
_assert_nothing_built = builder_test_utils.assert_nothing_built


# ---------------------------------------------------------------- real metadata


@pytest.mark.skipif(not SUN_META.is_dir(), reason=f"real SUN RGB-D split lists not found at {SUN_META}")
def test_real_split_lists_parse_and_number_the_label_files():
    entries = {split: sun.read_split_list(SUN_META / name) for split, name in sun.SPLIT_LISTS.items()}
    assert {split: len(lines) for split, lines in entries.items()} == sun.SPLIT_SIZES
    assert not set(entries["train"]) & set(entries["test"])
    assert {line.split("/")[1] for line in entries["test"]} == {"kv1", "kv2", "realsense", "xtion"}
    names = sun.label_file_names(len(entries["test"]), len(entries["train"]))
    assert (names["test"][0], names["test"][-1]) == ("img-000001.png", "img-005050.png")
    assert (names["train"][0], names["train"][-1]) == ("img-005051.png", "img-010335.png")


@pytest.mark.skipif(
    not (SUN_META / "README.md").is_file() or not NYU_META.is_dir(), reason="real metadata absent"
)
def test_class_names_and_37_to_13_table_match_the_real_metadata():
    readme = (SUN_META / "README.md").read_text()
    seg37list = re.findall(r"\[1,(\d+)\] = (\w+)", readme)
    assert [int(i) for i, _ in seg37list] == list(range(1, 38))
    assert tuple(name for _, name in seg37list) == sun.SUN37_CLASS_NAMES
    mapping13 = scipy.io.loadmat(NYU_META / "class13Mapping.mat")["classMapping13"][0, 0]
    np.testing.assert_array_equal(mapping13["labels13"].ravel()[:37], sun.SUN37_TO_13)
    nyu40 = [str(n[0]) for n in scipy.io.loadmat(NYU_META / "classMapping40.mat")["className"].ravel()]
    same_class = {"floor_mat": "floor mat", "fridge": "refridgerator", "tv": "television"}
    assert [same_class.get(n, n.replace("_", " ")) for n in sun.SUN37_CLASS_NAMES] == nyu40[:37]


def test_split_list_with_a_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("SUNRGBD/kv1/NYUdata/NYU0001/image/NYU0001.jpg\nkv1/NYU0002/depth/NYU0002.png\n")
    with pytest.raises(support.ManualInputError, match=r"list\.txt:2: expected a path like SUNRGBD/"):
        sun.read_split_list(path)


# ---------------------------------------------------------------- building a tiny tree


@pytest.mark.parametrize("num_classes", [13, 37])
def test_tiny_tree_builds_with_decoded_depth_mapped_labels_and_normals(tmp_path, num_classes):
    written = _write_tree(tmp_path / "manual")
    config = SunrgbdConfig(name=f"small{num_classes}", num_classes=num_classes, image_size=SMALL)
    builder = _build(config, tmp_path / "manual", tmp_path / "data")
    assert builder.info.metadata["num_classes"] == num_classes
    assert len(builder.info.metadata["class_names"]) == num_classes
    sources = tfds.builder_from_directory(
        os.fspath(tmp_path / "data" / "sunrgbd" / config.name / "1.0.0")
    ).as_data_source()
    assert {split: len(source) for split, source in sources.items()} == {"train": 3, "test": 2}
    records = {**_records(sources["train"]), **_records(sources["test"])}
    assert set(records) == set(written)

    for entry, (image, depth, labels) in written.items():
        record = records[entry]
        assert record["image"].shape == SMALL + (3,) and record["segmentation"].shape == SMALL
        assert record["depth"].shape == SMALL + (1,) and record["normal"].shape == SMALL + (3,)
        if image.shape[:2] != SMALL:
            continue
        np.testing.assert_allclose(record["image"].astype(int), image, atol=12)  # JPEG
        np.testing.assert_allclose(record["depth"][..., 0], depth, atol=1e-6)
        trained = labels - 1 if num_classes == 37 else sun.SUN37_TO_13[np.maximum(labels, 1) - 1] - 1
        np.testing.assert_array_equal(record["segmentation"], np.where(labels == 0, 255, trained))

    clipped = records[SAMPLES["train"][0][0]]["depth"]
    assert clipped.max() == pytest.approx(geometry.SUNRGBD_MAX_DEPTH_METRES) and np.all(clipped[-3:, :5] == 0)
    plane = records[SAMPLES["test"][0][0]]["normal"]
    angles = np.degrees(np.arccos(np.clip(plane[1:-4, 1:-1] @ PLANE_NORMAL, -1.0, 1.0)))
    assert np.mean(angles) < 0.5 and np.max(angles) < 3.0, "only the PNG's millimetre rounding may tilt them"
    assert np.all(plane[-3:, :5] == 0), "invalid depth gives invalid normals"
    resized = records[SAMPLES["test"][1][0]]
    np.testing.assert_allclose(resized["depth"][:-4], 2.5, atol=1e-6)
    np.testing.assert_allclose(
        resized["normal"][1:-4, 1:-1],
        np.broadcast_to([0, 0, -1], resized["normal"][1:-4, 1:-1].shape),
        atol=1e-6,
    )


def _rewrite(path, text):
    pathlib.Path(path).write_text(text)


def _first_sample_dir(root):
    return root / os.path.normpath(SAMPLES["train"][0][0]).rsplit("/image/", 1)[0]


@pytest.mark.parametrize(
    "damage, pattern",
    [
        (
            lambda root: (_first_sample_dir(root) / "intrinsics.txt").unlink(),
            r"intrinsics\.txt: expected an existing file",
        ),
        (
            lambda root: _rewrite(_first_sample_dir(root) / "intrinsics.txt", "1 0 3\n0 1 2\n"),
            r"intrinsics\.txt: expected 9 numbers",
        ),
        (
            lambda root: (root / sun.LABELS_FOLDER / "img-000005.png").unlink(),
            r"img-000005\.png: expected an existing file",
        ),
        (
            lambda root: (root / sun.SPLIT_LISTS["test"]).unlink(),
            r"sunrgbd_testing_images\.txt: expected an existing file",
        ),
        (
            lambda root: next((_first_sample_dir(root) / "depth").iterdir()).unlink(),
            r"depth: expected exactly one 16-bit depth \.png, found 0",
        ),
        (
            lambda root: Image.fromarray(np.zeros((48, 64), np.uint8)).save(
                next((_first_sample_dir(root) / "depth").iterdir())
            ),
            r"0000001\.png: expected a 16-bit single-channel image, found mode L",
        ),
        (
            lambda root: Image.fromarray(np.full((48, 64), 40, np.uint8)).save(
                root / sun.LABELS_FOLDER / "img-000004.png"
            ),
            r"img-000004\.png: expected SUNRGBD-37 ids in \[0, 37\], found values in \[40, 40\]",
        ),
        (
            lambda root: Image.fromarray(np.zeros((40, 64), np.uint8)).save(
                root / sun.LABELS_FOLDER / "img-000001.png"
            ),
            r"img-000001\.png: expected the size of .*NYU0001\.jpg \(48, 64\), found \(40, 64\)",
        ),
    ],
    ids=[
        "no-intrinsics",
        "short-intrinsics",
        "no-label",
        "no-split-list",
        "no-depth",
        "8-bit-depth",
        "label-out-of-range",
        "label-size",
    ],
)
def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, damage, pattern):
    _write_tree(tmp_path / "manual")
    damage(tmp_path / "manual")
    with pytest.raises(support.ManualInputError, match=pattern):
        _build(
            SunrgbdConfig(name="small13", num_classes=13, image_size=SMALL),
            tmp_path / "manual",
            tmp_path / "data",
        )
    _assert_nothing_built(tmp_path / "data")


def test_registered_configs_use_the_documented_size():
    builder = tfds.builder("sunrgbd/classes37", data_dir="/nonexistent-unused")
    assert builder.info.features["image"].shape == sun.IMAGE_SIZE + (3,)
    assert builder.info.metadata["class_names"][19] == "floor_mat"
