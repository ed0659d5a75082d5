"""NYUv2 builder: tiny inputs in the real formats (v7.3 .mat, mtan .npy, expansion PNGs) built into a temporary
data_dir and read back with tfds.data_source; the embedded class tables against the real NYUv2 metadata files.
"""

import os
import pathlib
import re

import h5py
import numpy as np
import pytest

import builder_test_utils
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from auxmtl_datasets.nyu_v2 import NyuV2, NyuV2Config
from auxmtl_datasets.nyu_v2 import builder_support as support
from auxmtl_datasets.nyu_v2 import nyu_v2_dataset_builder as nyu
from auxmtl_jax import geometry

META = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "nyuv2-meta"
needs_meta = pytest.mark.skipif(not META.is_dir(), reason=f"real NYUv2 metadata not found at {META}")
SMALL = (48, 64)
MTAN_SHAPE = nyu.MTAN_SIZE


def _build(config, manual_dir, data_dir):
    return builder_test_utils.build(NyuV2, config, manual_dir, data_dir)


_records = builder_test_utils.records_by_id
_assert_nothing_built = builder_test_utils.assert_nothing_built


def _plane_depth(normal, distance, intrinsics, shape):
    rows, cols = np.indices(shape, dtype=np.float64)
    rays = np.stack([cols, rows, np.ones_like(cols)], axis=-1) @ np.linalg.inv(intrinsics).T
    return (-distance / (rays @ normal)).astype(np.float32)


# ---------------------------------------------------------------- class tables against the real files


@needs_meta
def test_embedded_tables_match_the_real_metadata_files():
    mapping40 = scipy.io.loadmat(META / "classMapping40.mat")
    assert tuple(str(name[0]) for name in mapping40["className"].ravel()) == nyu.NYU40_CLASS_NAMES
    mapping13 = scipy.io.loadmat(META / "class13Mapping.mat")["classMapping13"][0, 0]
    np.testing.assert_array_equal(mapping13["labels13"].ravel(), nyu.NYU40_TO_13)
    assert tuple(str(name[0]) for name in mapping13["classNames"].ravel()) == nyu.NYU13_CLASS_NAMES


@needs_meta
def test_real_splits_and_class_map_parse():
    splits = nyu.labeled_splits(META / "splits.mat")
    assert {split: len(indices) for split, indices in splits.items()} == nyu.LABELED_SPLIT_SIZES
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(1, 1450))
    map_class = support.load_mat(META / "classMapping40.mat", ["mapClass"])["mapClass"]
    lookup = nyu.raw_label_lookup(map_class, 13, META / "classMapping40.mat")
    assert lookup.shape == (895,) and lookup[0] == 255
    raw = map_class.ravel()
    # Raw class 3 ('cabinet' in 40 classes) -> 13-class 'furniture'; raw 1 -> 40-class 40 'otherprop' -> 'objects'.
    assert (
        nyu.NYU13_CLASS_NAMES[lookup[3]]
        == nyu.NYU13_CLASS_NAMES[nyu.NYU40_TO_13[raw[2] - 1] - 1]
        == "furniture"
    )
    assert nyu.NYU13_CLASS_NAMES[lookup[1]] == "objects"


# ---------------------------------------------------------------- mtan layout


def _write_mtan(root, counts=None, rng=None):
    rng = rng or np.random.default_rng(0)
    counts = counts or {"train": 3, "val": 2}
    arrays = {}
    for folder, count in counts.items():
        for kind in nyu.MTAN_KINDS:
            (root / folder / kind).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = rng.uniform(0, 1, MTAN_SHAPE + (3,)).astype(np.float32)
            label = rng.integers(-1, 13, MTAN_SHAPE).astype(np.float32)
            depth = rng.uniform(0.5, 9.0, MTAN_SHAPE + (1,)).astype(np.float32)
            depth[0, :5] = 0.0
            normal = rng.normal(size=MTAN_SHAPE + (3,)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[label < 0] = 0.0
            record = {"image": image, "label": label, "depth": depth, "normal": normal}
            for kind, array in record.items():
                np.save(root / folder / kind / f"{index}.npy", array)
            arrays[(folder, index)] = record
    return arrays


def test_mtan_layout_builds_and_reads_back(tmp_path):
    arrays = _write_mtan(tmp_path / "manual")
    builder = _build("mtan", tmp_path / "manual", tmp_path / "data")
    assert builder.info.metadata["num_classes"] == 13
    assert builder.info.metadata["tasks"] == ["segmentation", "depth", "normal"]
    sources = tfds.data_source("nyu_v2/mtan", data_dir=os.fspath(tmp_path / "data"))
    assert {split: len(source) for split, source in sources.items()} == {"train": 3, "test": 2}

    records = _records(sources["test"])
    expected = arrays[("val", 1)]
    record = records["nyu_v2_mtan/val/1"]
    assert record["image"].dtype == np.uint8 and record["image"].shape == MTAN_SHAPE + (3,)
    np.testing.assert_array_equal(record["image"], np.round(expected["image"] * 255).astype(np.uint8))
    ignore = expected["label"] < 0
    assert np.all(record["segmentation"][ignore] == 255)
    np.testing.assert_array_equal(
        record["segmentation"][~ignore], expected["label"][~ignore].astype(np.uint8)
    )
    np.testing.assert_array_equal(record["depth"], expected["depth"])
    assert np.all(record["depth"][0, :5] == 0)
    np.testing.assert_allclose(record["normal"], expected["normal"], atol=1e-6)
    assert np.all(record["normal"][ignore] == 0)


def test_mtan_missing_file_names_it_and_leaves_nothing(tmp_path):
    _write_mtan(tmp_path / "manual", counts={"train": 2, "val": 1})
    missing = tmp_path / "manual" / "train" / "depth" / "1.npy"
    missing.unlink()
    with pytest.raises(support.ManualInputError, match=str(missing)):
        _build("mtan", tmp_path / "manual", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


def test_mtan_malformed_file_names_it_and_leaves_nothing(tmp_path):
    _write_mtan(tmp_path / "manual", counts={"train": 2, "val": 1})
    wrong_shape = tmp_path / "manual" / "val" / "normal" / "0.npy"
    np.save(wrong_shape, np.zeros((3,) + MTAN_SHAPE, np.float32))
    with pytest.raises(
        support.ManualInputError, match=r"normal/0\.npy: expected an mtan normal .*\(288, 384, 3\)"
    ):
        _build("mtan", tmp_path / "manual", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


def test_mtan_bad_label_values_fail_during_generation_and_leave_nothing(tmp_path):
    _write_mtan(tmp_path / "manual", counts={"train": 2, "val": 1})
    bad_label = tmp_path / "manual" / "train" / "label" / "1.npy"
    np.save(bad_label, np.full(MTAN_SHAPE, 13.0, np.float32))
    with pytest.raises(support.ManualInputError, match=r"label/1\.npy: expected class ids 0..12 or -1"):
        _build("mtan", tmp_path / "manual", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


# ---------------------------------------------------------------- official labeled .mat (v7.3 / HDF5)

NUM_FRAMES = 4
MAP_CLASS = (np.arange(nyu.NUM_RAW_CLASSES) * 7 % 40 + 1).astype(np.uint8)  # any 894 -> 40 map
PLANE_NORMAL = np.array([0.3, -0.4, -0.866])
PLANE_NORMAL = PLANE_NORMAL / np.linalg.norm(PLANE_NORMAL)


def _write_v73_mat(path, arrays):
    """Writes `arrays` (MATLAB-order shapes) the way MATLAB v7.3 does: HDF5, 512-byte MATLAB header
    userblock, every array stored transposed."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        for key, array in arrays.items():
            handle.create_dataset(key, data=np.ascontiguousarray(np.asarray(array).T))
    with open(path, "r+b") as handle:
        handle.write(
            b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
        )


def _write_labeled(root, rng=None):
    """Writes a 4-frame nyu_depth_v2_labeled.mat plus splits.mat and classMapping40.mat; returns the frames
    in row-major [H, W] order."""
    rng = rng or np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    height, width = SMALL
    images = rng.integers(0, 256, (NUM_FRAMES, height, width, 3), dtype=np.uint8)
    labels = rng.integers(0, nyu.NUM_RAW_CLASSES + 1, (NUM_FRAMES, height, width)).astype(np.uint16)
    labels[:, :4] = 0
    intrinsics = geometry.scale_intrinsics(geometry.KINECT_V1_INTRINSICS, (480, 640), SMALL)
    depths = rng.uniform(1.0, 4.0, (NUM_FRAMES, height, width)).astype(np.float32)
    depths[2] = _plane_depth(PLANE_NORMAL, 2.5, intrinsics, SMALL)
    # MATLAB order: images H x W x 3 x N, depths/labels H x W x N; h5py then sees (N,3,W,H) and (N,W,H).
    _write_v73_mat(
        root / nyu.LABELED_FILE,
        {
            "images": images.transpose(1, 2, 3, 0),
            "depths": depths.transpose(1, 2, 0),
            "labels": labels.transpose(1, 2, 0),
        },
    )
    scipy.io.savemat(
        root / nyu.SPLITS_FILE,
        {"trainNdxs": np.array([[1], [3], [4]], np.uint16), "testNdxs": np.array([[2]], np.uint16)},
    )
    scipy.io.savemat(root / nyu.CLASS_MAP_FILE, {"mapClass": MAP_CLASS[None, :]})
    return {"images": images, "depths": depths, "labels": labels}


def _small(name, source="labeled", num_classes=40):
    return NyuV2Config(name=name, source=source, num_classes=num_classes, image_size=SMALL)


def _read_built(data_dir, config_name):
    builder = tfds.builder_from_directory(
        os.fspath(pathlib.Path(data_dir) / "nyu_v2" / config_name / "1.0.0")
    )
    return builder, builder.as_data_source()


def test_fake_v73_file_has_the_real_transposed_layout(tmp_path):
    _write_labeled(tmp_path)
    with h5py.File(tmp_path / nyu.LABELED_FILE, "r") as handle:
        assert handle["images"].shape == (NUM_FRAMES, 3, 64, 48)
        assert handle["labels"].shape == (NUM_FRAMES, 64, 48)
    assert open(tmp_path / nyu.LABELED_FILE, "rb").read(10) == b"MATLAB 7.3"


@pytest.mark.parametrize("num_classes", [40, 13])
def test_labeled_mat_builds_with_mapped_labels_and_plane_normals(tmp_path, num_classes):
    frames = _write_labeled(tmp_path / "manual")
    builder = _build(
        _small(f"small{num_classes}", num_classes=num_classes), tmp_path / "manual", tmp_path / "data"
    )
    assert builder.info.metadata["normals_source"].startswith("computed from depth")
    _, sources = _read_built(tmp_path / "data", f"small{num_classes}")
    assert {split: len(source) for split, source in sources.items()} == {"train": 3, "test": 1}
    records = {**_records(sources["train"]), **_records(sources["test"])}
    assert set(records) == {f"nyu_v2/{i:04d}" for i in range(1, NUM_FRAMES + 1)}
    assert _records(sources["test"]).keys() == {"nyu_v2/0002"}

    for index in range(1, NUM_FRAMES + 1):
        record, frame = records[f"nyu_v2/{index:04d}"], index - 1
        np.testing.assert_array_equal(record["image"], frames["images"][frame])
        np.testing.assert_array_equal(record["depth"][..., 0], frames["depths"][frame])
        raw = frames["labels"][frame].astype(np.int64)
        class40 = MAP_CLASS[np.maximum(raw, 1) - 1]
        trained = class40 - 1 if num_classes == 40 else nyu.NYU40_TO_13[class40 - 1] - 1
        np.testing.assert_array_equal(record["segmentation"], np.where(raw == 0, 255, trained))
        assert record["segmentation"].max() < num_classes or record["segmentation"].max() == 255

    plane = records["nyu_v2/0003"]["normal"]
    np.testing.assert_allclose(
        plane[1:-1, 1:-1], np.broadcast_to(PLANE_NORMAL, plane[1:-1, 1:-1].shape), atol=1e-4
    )
    assert np.all(plane[0] == 0), "border pixels lack neighbours and are invalid"


def test_labeled_uses_a_supplied_normals_file(tmp_path):
    _write_labeled(tmp_path / "manual")
    normals = np.zeros((NUM_FRAMES, *SMALL, 3), np.float32)
    normals[..., 0] = 2.0  # not unit length: stored normals are re-normalised
    normals[:, :3] = 0.0
    with h5py.File(tmp_path / "manual" / nyu.NORMALS_FILE, "w") as handle:
        handle.create_dataset("normals", data=normals)
    builder = _build(_small("small13", num_classes=13), tmp_path / "manual", tmp_path / "data")
    assert builder.info.metadata["normals_source"] == f"file {nyu.NORMALS_FILE}"
    _, sources = _read_built(tmp_path / "data", "small13")
    record = _records(sources["test"])["nyu_v2/0002"]
    np.testing.assert_array_equal(
        record["normal"][3:], np.broadcast_to([1.0, 0.0, 0.0], record["normal"][3:].shape)
    )
    assert np.all(record["normal"][:3] == 0)


@pytest.mark.parametrize(
    "damage, pattern",
    [
        (lambda root: (root / nyu.SPLITS_FILE).unlink(), r"splits\.mat: expected an existing file"),
        (
            lambda root: (root / nyu.LABELED_FILE).write_bytes(b"not a mat file"),
            r"labeled\.mat: expected a MATLAB v7\.3 \(HDF5\)",
        ),
        (
            lambda root: scipy.io.savemat(root / nyu.SPLITS_FILE, {"trainNdxs": np.array([[1], [9]])}),
            r"splits\.mat: expected a MATLAB variable 'testNdxs'",
        ),
        (
            lambda root: scipy.io.savemat(
                root / nyu.SPLITS_FILE, {"trainNdxs": [[1], [5]], "testNdxs": [[2]]}
            ),
            r"splits\.mat: expected 1-based frame indices in \[1, 4\]",
        ),
        (
            lambda root: scipy.io.savemat(root / nyu.CLASS_MAP_FILE, {"mapClass": MAP_CLASS[None, :40]}),
            r"classMapping40\.mat: expected 'mapClass' with 894 entries",
        ),
        (
            lambda root: _write_v73_mat(
                root / nyu.LABELED_FILE, {"images": np.zeros((48, 64, 3, 4), np.uint8)}
            ),
            r"labeled\.mat: expected variable 'depths' of shape \(N,64,48\), found no such variable",
        ),
        (
            lambda root: h5py.File(root / nyu.NORMALS_FILE, "w").close(),
            r"nyu_normals\.h5: expected HDF5 dataset 'normals' of shape \(4, 48, 64, 3\)",
        ),
    ],
    ids=[
        "missing-splits",
        "not-hdf5",
        "missing-variable",
        "index-out-of-range",
        "short-class-map",
        "no-depths",
        "empty-normals",
    ],
)
def test_labeled_bad_inputs_name_the_file_and_leave_nothing(tmp_path, damage, pattern):
    _write_labeled(tmp_path / "manual")
    damage(tmp_path / "manual")
    with pytest.raises(support.ManualInputError, match=pattern):
        _build(_small("small40"), tmp_path / "manual", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


def test_missing_manual_dir_says_what_it_must_hold(tmp_path):
    with pytest.raises(
        support.ManualInputError,
        match=r"^\S*absent: expected the manual_dir of nyu_v2, found nothing; expected the folder holding "
        r"nyu_depth_v2_labeled\.mat, splits\.mat and classMapping40\.mat .*--manual_dir=DIR",
    ) as raised:
        _build("labeled13", tmp_path / "absent", tmp_path / "data")
    assert "\n" not in str(raised.value)
    _assert_nothing_built(tmp_path / "data")


def test_run_preparing_without_manual_dir_names_the_flag_and_the_files_in_one_line(tmp_path):
    from types import SimpleNamespace

    from auxmtl_jax import input_pipeline

    config = SimpleNamespace(name="nyu_v2", config="labeled40", data_dir=os.fspath(tmp_path / "data"),
                             manual_dir=None, prepare=True, train_split="train", eval_split="test")
    message = (r"^nyu_v2: no manual_dir given; expected the folder holding nyu_depth_v2_labeled\.mat, "
               r"splits\.mat and classMapping40\.mat.*--config\.dataset\.manual_dir=DIR")
    with pytest.raises(ValueError, match=message) as raised:
        input_pipeline.prepare_dataset(config)
    assert "\n" not in str(raised.value)
    _assert_nothing_built(tmp_path / "data")


def test_command_line_without_manual_dir_names_the_flag_and_the_files_in_one_line(tmp_path, capsys):
    argv = ["--config", "expansion40", "--data_dir", os.fspath(tmp_path / "data")]
    with pytest.raises(SystemExit) as raised:
        support.build_main(NyuV2, argv)
    assert raised.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: nyu_v2: no manual_dir given; expected the folder holding image/, depth/ and "
                              "label/ folders of PNG frames (--manual_dir=DIR")
    assert "\n" not in message and "Traceback" not in message
    _assert_nothing_built(tmp_path / "data")


# ---------------------------------------------------------------- expansion frames (PNG directory)


def _write_expansion(root, rng=None):
    rng = rng or np.random.default_rng(2)
    for folder in ("image", "depth", "label"):
        (root / folder).mkdir(parents=True)
    frames = {}
    intrinsics = geometry.scale_intrinsics(geometry.KINECT_V1_INTRINSICS, (480, 640), SMALL)
    for name in ("frame_a", "frame_b"):
        image = rng.integers(0, 256, SMALL + (3,), dtype=np.uint8)
        depth_mm = np.round(rng.uniform(500, 6000, SMALL)).astype(np.uint16)
        if name == "frame_b":
            depth_mm = np.round(_plane_depth(PLANE_NORMAL, 2.5, intrinsics, SMALL) * 1000).astype(np.uint16)
        depth_mm[:2, :2] = 0
        labels = rng.integers(0, 41, SMALL).astype(np.uint8)
        Image.fromarray(image).save(root / "image" / f"{name}.png")
        Image.fromarray(depth_mm).save(root / "depth" / f"{name}.png")
        Image.fromarray(labels).save(root / "label" / f"{name}.png")
        frames[name] = (image, depth_mm, labels)
    return frames


@pytest.mark.parametrize("num_classes", [40, 13])
def test_expansion_pngs_build_into_train(tmp_path, num_classes):
    frames = _write_expansion(tmp_path / "manual")
    _build(
        _small(f"expansion_small{num_classes}", "expansion", num_classes),
        tmp_path / "manual",
        tmp_path / "data",
    )
    _, sources = _read_built(tmp_path / "data", f"expansion_small{num_classes}")
    assert set(sources) == {"train"}
    records = _records(sources["train"])
    for name, (image, depth_mm, labels) in frames.items():
        record = records[f"nyu_v2_expansion/{name}"]
        np.testing.assert_array_equal(record["image"], image)
        np.testing.assert_allclose(record["depth"][..., 0], depth_mm / 1000.0, rtol=1e-6)
        assert np.all(record["depth"][:2, :2] == 0) and np.all(record["normal"][:2, :2] == 0)
        expected = nyu.nyu40_lookup(num_classes)[labels]
        np.testing.assert_array_equal(record["segmentation"], expected)
        assert np.all(record["segmentation"][labels == 0] == 255)
    if num_classes == 13:
        assert nyu.nyu40_lookup(13)[4] == nyu.NYU13_CLASS_NAMES.index("bed")  # 40-class 'bed' (id 4)
    plane = records["nyu_v2_expansion/frame_b"]["normal"][3:-1, 3:-1]
    angles = np.degrees(np.arccos(np.clip(plane @ PLANE_NORMAL, -1.0, 1.0)))
    assert np.mean(angles) < 0.5 and np.max(angles) < 3.0, "only millimetre rounding may tilt them"


def test_expansion_missing_label_names_it_and_leaves_nothing(tmp_path):
    _write_expansion(tmp_path / "manual")
    (tmp_path / "manual" / "label" / "frame_b.png").unlink()
    with pytest.raises(support.ManualInputError, match=r"label/frame_b\.png: expected an existing file"):
        _build(_small("expansion_small40", "expansion", 40), tmp_path / "manual", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


def test_command_line_builds_and_reports_bad_input_in_one_line(tmp_path, capsys):
    _write_mtan(tmp_path / "manual", counts={"train": 1, "val": 1})
    argv = [
        "--config",
        "mtan",
        "--manual_dir",
        os.fspath(tmp_path / "manual"),
        "--data_dir",
        os.fspath(tmp_path / "data"),
    ]
    support.build_main(NyuV2, argv)
    assert "built nyu_v2/mtan" in capsys.readouterr().out
    assert len(tfds.data_source("nyu_v2/mtan", data_dir=os.fspath(tmp_path / "data"))["test"]) == 1

    (tmp_path / "manual" / "val" / "image" / "0.npy").write_bytes(b"garbage")
    argv[-1] = os.fspath(tmp_path / "data2")
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^1$"):
        support.build_main(NyuV2, argv)
    assert re.match(r"^error: .*val/image/0\.npy: expected a NumPy \.npy file", capsys.readouterr().err)
    _assert_nothing_built(tmp_path / "data2")
