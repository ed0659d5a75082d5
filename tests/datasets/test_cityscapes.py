"""Cityscapes builder (mtan / LibMTL preprocessed layout): fake samples at the real 128x256 size written in the
real .npy layout ({train,val}/{image,label_7,label_19,depth}/{i}.npy), built into a temporary data_dir, read back
with tfds.data_source, and fed through the input pipeline with the tasks segmentation + depth (no normals)."""

import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import builder_test_utils
from auxmtl_datasets.cityscapes import Cityscapes
from auxmtl_datasets.cityscapes import cityscapes_dataset_builder as cityscapes
from auxmtl_datasets.nyu_v2 import builder_support as support
from auxmtl_jax import augment, input_pipeline

SHAPE = cityscapes.IMAGE_SIZE
COUNTS = {"train": 3, "val": 2}
# trainId (0..18) -> Cityscapes category (0..6, categoryId - 1), to write label_7 consistent with label_19.
TRAIN_ID_TO_CATEGORY = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6])

_records = builder_test_utils.records_by_id
_assert_nothing_built = builder_test_utils.assert_nothing_built


def _write_release(root, rng=None):
    """Writes the mtan release layout; returns {(folder, i): {kind: array as written}}. Sample val/1 stores its
    image as float64, its labels as int64 and its depth as (H, W), the other accepted forms."""
    rng = rng or np.random.default_rng(0)
    arrays = {}
    for folder, count in COUNTS.items():
        for kind in ("image", "label_7", "label_19", "depth"):
            (root / folder / kind).mkdir(parents=True)
        for index in range(count):
            image = rng.uniform(0, 1, SHAPE + (3,)).astype(np.float32)
            image[0, 0], image[0, 1], image[0, 2] = 0.0, 1.0, 1.0 + 5e-4  # the ends, and rounding past 1
            label19 = rng.integers(-1, 19, SHAPE)
            label7 = np.where(label19 < 0, -1, TRAIN_ID_TO_CATEGORY[np.maximum(label19, 0)])
            depth = rng.uniform(1e-3, 0.4922, SHAPE + (1,)).astype(np.float32)
            depth[-8:] = 0.0  # invalid: no disparity measured
            sample = {"image": image, "label_7": label7.astype(np.float32), "label_19": label19.astype(np.float32),
                      "depth": depth}
            if (folder, index) == ("val", 1):
                sample = {"image": image.astype(np.float64), "label_7": label7.astype(np.int64),
                          "label_19": label19.astype(np.int64), "depth": depth[..., 0]}
            for kind, array in sample.items():
                np.save(root / folder / kind / f"{index}.npy", array)
            arrays[(folder, index)] = sample
    return arrays


def _input_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(crop_size=(96, 192), scale_range=(0.5, 2.0), flip=True, eval_size=None,
                                         num_workers=0, num_threads=1, mean=augment.IMAGE_MEAN,
                                         std=augment.IMAGE_STD))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(manual_dir, arrays as written, dataset config of `cityscapes/mtan` built through prepare_dataset)."""
    manual = tmp_path_factory.mktemp("cityscapes_manual")
    arrays = _write_release(manual)
    cfg = ml_collections.ConfigDict(dict(name="cityscapes", config="mtan", manual_dir=os.fspath(manual),
                                         data_dir=os.fspath(tmp_path_factory.mktemp("tfds")), prepare=True,
                                         train_split="train", eval_split="test"))
    input_pipeline.prepare_dataset(cfg)
    return manual, arrays, cfg


def _expected_record(sample, label_kind):
    image = np.clip(sample["image"].astype(np.float64), 0.0, 1.0)
    label = sample[label_kind]
    return {
        "image": np.round(image * 255).astype(np.uint8),
        "segmentation": np.where(label < 0, 255, label).astype(np.uint8),
        "depth": sample["depth"].astype(np.float32).reshape(SHAPE + (1,)),
    }


def _assert_records_match(records, arrays, config, label_kind):
    assert len(records) == len(arrays)
    for (folder, index), sample in arrays.items():
        record = records[f"cityscapes_{config}/{folder}/{index}"]
        for key, expected in _expected_record(sample, label_kind).items():
            assert record[key].dtype == expected.dtype and record[key].shape == expected.shape, key
            np.testing.assert_array_equal(record[key], expected, err_msg=f"{folder}/{index} {key}")


# ---------------------------------------------------------------- building and reading back


def test_mtan_builds_two_tasks_and_round_trips_the_values(release):
    manual, arrays, cfg = release
    builder = input_pipeline.get_builder(cfg)
    metadata = builder.info.metadata
    assert metadata["num_classes"] == 7
    assert metadata["class_names"] == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert metadata["tasks"] == ["segmentation", "depth"]
    assert metadata["label_folder"] == "label_7" and "not metres" in metadata["depth_unit"]
    assert set(builder.info.features) == {"image", "segmentation", "depth", "id"}
    sources = tfds.data_source("cityscapes/mtan", data_dir=cfg.data_dir)
    assert {split: len(source) for split, source in sources.items()} == {"train": 3, "test": 2}
    train, test = _records(sources["train"]), _records(sources["test"])
    assert set(train) == {f"cityscapes_mtan/train/{i}" for i in range(3)}
    assert set(test) == {"cityscapes_mtan/val/0", "cityscapes_mtan/val/1"}  # test = the val/ folder
    _assert_records_match({**train, **test}, arrays, "mtan", "label_7")
    record = test["cityscapes_mtan/val/0"]
    assert list(record["image"][0, :3, 0]) == [0, 255, 255]  # 0 -> 0, 1 -> 255, 1 + 5e-4 clipped to 255
    assert np.all(record["segmentation"][arrays[("val", 0)]["label_7"] < 0] == 255)
    assert np.all(record["depth"][-8:] == 0) and np.all(record["depth"][:-8] > 0)


def test_mtan19_reads_label_19_with_the_19_training_classes(release, tmp_path):
    manual, arrays, _ = release
    builder = builder_test_utils.build(Cityscapes, "mtan19", manual, tmp_path)
    assert builder.info.metadata["num_classes"] == 19
    assert builder.info.metadata["class_names"][:3] == ["road", "sidewalk", "building"]
    assert builder.info.metadata["class_names"][-1] == "bicycle"
    assert builder.info.metadata["tasks"] == ["segmentation", "depth"]
    sources = tfds.data_source("cityscapes/mtan19", data_dir=os.fspath(tmp_path))
    records = {**_records(sources["train"]), **_records(sources["test"])}
    _assert_records_match(records, arrays, "mtan19", "label_19")
    assert max(int(r["segmentation"][r["segmentation"] != 255].max()) for r in records.values()) == 18


def test_libmtl_label_folder_is_read_when_label_7_is_absent(release, tmp_path):
    manual, arrays, _ = release
    libmtl = tmp_path / "cityscapes2"
    for folder in COUNTS:
        for kind, name in (("image", "image"), ("label_7", "label"), ("depth", "depth")):
            shutil.copytree(manual / folder / kind, libmtl / folder / name)
    builder = builder_test_utils.build(Cityscapes, "mtan", libmtl, tmp_path / "data")
    assert builder.info.metadata["label_folder"] == "label"
    sources = tfds.data_source("cityscapes/mtan", data_dir=os.fspath(tmp_path / "data"))
    records = {**_records(sources["train"]), **_records(sources["test"])}
    _assert_records_match(records, arrays, "mtan", "label_7")
    # mtan19 has no such fallback: LibMTL's label/ holds the 7 categories.
    with pytest.raises(support.ManualInputError, match=r"train/label_19: expected an existing directory"):
        builder_test_utils.build(Cityscapes, "mtan19", libmtl, tmp_path / "data19")
    _assert_nothing_built(tmp_path / "data19")


# ---------------------------------------------------------------- bad inputs


def _save(relative, array):
    return lambda root: np.save(root / relative, array)


def _edit(relative, edit):
    def damage(root):
        array = np.load(root / relative)
        edit(array)
        np.save(root / relative, array)
    return damage


def _set(index, value):
    def edit(array):
        array[index] = value
    return edit


BAD_INPUTS = {
    "missing_folder": (lambda root: shutil.rmtree(root / "val" / "depth"),
                       r"val/depth: expected an existing directory, found nothing"),
    "missing_label_folder": (lambda root: shutil.rmtree(root / "train" / "label_7"),
                             r"train/label_7: expected an existing directory \(or LibMTL's label/\), found nothing"),
    "missing_file": (lambda root: (root / "train" / "label_7" / "1.npy").unlink(),
                     r"train/label_7/1\.npy: expected an existing file: 3 samples 0\.npy\.\.2\.npy \(as many as "
                     r"image/ holds\), found nothing"),
    "extra_index": (_save("val/depth/2.npy", np.zeros(SHAPE + (1,), np.float32)),
                    r"val/depth/2\.npy: expected no such file: 2 samples 0\.npy\.\.1\.npy .*found an extra file"),
    "image_chw": (_save("val/image/1.npy", np.zeros((3,) + SHAPE, np.float32)),
                  r"val/image/1\.npy: expected an mtan Cityscapes image as a float array of shape \(128, 256, 3\), "
                  r"found float32 \(3, 128, 256\)"),
    "image_uint8": (_save("val/image/1.npy", np.zeros(SHAPE + (3,), np.uint8)),
                    r"val/image/1\.npy: expected an mtan Cityscapes image as a float array .*found uint8"),
    "image_0_255": (_edit("val/image/1.npy", _set((5, 5, 0), 255.0)),
                    r"val/image/1\.npy: expected image values in \[0, 1\] \(mtan stores floats\), found \[0, 255\]"),
    "depth_wrong_size": (_save("val/depth/1.npy", np.zeros((256, 512, 1), np.float32)),
                         r"val/depth/1\.npy: expected an mtan Cityscapes depth map as a float array of shape "
                         r"\(128, 256, 1\) or \(128, 256\), found float32 \(256, 512, 1\)"),
    "label_id_7": (_edit("val/label_7/1.npy", _set((3, 4), 7)),
                   r"val/label_7/1\.npy: expected class ids 0\.\.6 or -1 \(ignore\), found values \[7\]"),
    "label_255_as_ignore": (_edit("val/label_7/1.npy", _set(slice(0, 2), 255)),
                            r"val/label_7/1\.npy: expected class ids 0\.\.6 or -1 .*found values \[255\]"),
    "label_fraction": (_edit("val/label_7/0.npy", _set((0, 0), 2.5)),
                       r"val/label_7/0\.npy: expected class ids 0\.\.6 or -1 .*found values \[2\.5\]"),
    "depth_nan": (_edit("val/depth/0.npy", _set((1, 1, 0), np.nan)),
                  r"val/depth/0\.npy: expected finite depth values >= 0 \(0 = invalid\), found 1 NaN/inf values"),
    "depth_negative": (_edit("val/depth/0.npy", _set(slice(0, 1), -1.0)),
                       r"val/depth/0\.npy: expected depth values >= 0 \(0 = invalid\), found values \[-1\]"),
    "not_npy": (lambda root: (root / "val" / "label_7" / "1.npy").write_bytes(b"garbage"),
                r"val/label_7/1\.npy: expected a NumPy \.npy file, found an unreadable file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_before_any_record(case, release, tmp_path, monkeypatch):
    manual, _, _ = release
    damaged = tmp_path / "manual"
    shutil.copytree(manual, damaged)
    damage, pattern = BAD_INPUTS[case]
    damage(damaged)
    started = []
    generate = Cityscapes._generate

    def spy(self, samples):
        started.append(True)
        yield from generate(self, samples)

    monkeypatch.setattr(Cityscapes, "_generate", spy)
    with pytest.raises(support.ManualInputError) as raised:
        builder_test_utils.build(Cityscapes, "mtan", damaged, tmp_path / "data")
    message = str(raised.value)
    assert re.search(pattern, message), message
    assert message.startswith(os.fspath(damaged)) and "\n" not in message
    assert started == [], "records were being written before the bad file was found"
    _assert_nothing_built(tmp_path / "data")


def test_missing_manual_dir_names_the_layout(tmp_path):
    with pytest.raises(support.ManualInputError, match=r"expected the folder holding "
                       r"\{train,val\}/\{image,label_7,depth\}/<i>\.npy \(--manual_dir=DIR"):
        builder_test_utils.build(Cityscapes, "mtan", tmp_path / "absent", tmp_path / "data")
    _assert_nothing_built(tmp_path / "data")


def test_command_line_help_and_one_line_error(release, tmp_path, capsys):
    with pytest.raises(SystemExit, match="^0$"):
        support.build_main(Cityscapes, ["--help"])
    help_text = capsys.readouterr().out
    assert "label_7/{i}.npy" in help_text and "NOT metres" in help_text and "{mtan,mtan19}" in help_text
    manual = tmp_path / "manual"
    shutil.copytree(release[0], manual)
    (manual / "train" / "image" / "2.npy").unlink()
    argv = ["--config", "mtan", "--manual_dir", os.fspath(manual), "--data_dir", os.fspath(tmp_path / "data")]
    with pytest.raises(SystemExit, match="^1$"):
        support.build_main(Cityscapes, argv)
    error = capsys.readouterr().err.strip()
    # image/ holds 0.npy and 1.npy now, so the other folders' 2.npy are the extra-indexed files.
    assert re.fullmatch(r"error: \S*train/label_7/2\.npy: expected no such file: 2 samples .*", error), error
    _assert_nothing_built(tmp_path / "data")


# ---------------------------------------------------------------- input pipeline without normals


def test_input_pipeline_serves_segmentation_and_depth_without_normals(release):
    _, _, cfg = release
    info = input_pipeline.dataset_info(cfg)
    assert info.tasks == ("segmentation", "depth") and info.image_size == SHAPE and info.num_classes == 7
    assert info.splits == {"train": 3, "test": 2}
    with pytest.raises(ValueError, match=r"'cityscapes' has no task 'normal'"):
        input_pipeline.create_train_iterator(cfg, _input_cfg(), tasks=("segmentation", "depth", "normal"),
                                             global_batch_size=3, seed=0)
    tasks = ("segmentation", "depth")
    stored = {split: input_pipeline.get_builder(cfg).as_data_source(split=split) for split in ("train", "test")}

    augmented = input_pipeline.create_train_iterator(cfg, _input_cfg(), tasks=tasks, global_batch_size=3, seed=0)
    for _ in range(2):
        batch = next(augmented)
        assert set(batch) == {"image", "segmentation", "depth"}
        assert batch["image"].shape == (3, 96, 192, 3) and batch["image"].dtype == np.uint8
        assert batch["segmentation"].shape == (3, 96, 192) and batch["segmentation"].dtype == np.int32
        assert batch["depth"].shape == (3, 96, 192, 1) and batch["depth"].dtype == np.float32
        seg = batch["segmentation"]
        assert np.all((seg == 255) | ((seg >= 0) & (seg < 7))) and np.any(seg != 255)
        assert np.all(batch["depth"] >= 0) and np.any(batch["depth"] > 0)

    # Without flip and rescale a full-size crop is a stored record, unchanged.
    plain = input_pipeline.create_train_iterator(cfg, _input_cfg(crop_size=SHAPE, scale_range=(1.0, 1.0),
                                                                 flip=False), tasks=tasks, global_batch_size=3,
                                                 seed=0)
    batch = next(plain)
    train = [stored["train"][i] for i in range(3)]
    for k in range(3):
        match = [r for r in train if np.array_equal(r["segmentation"], batch["segmentation"][k])]
        assert len(match) == 1
        np.testing.assert_array_equal(batch["image"][k], match[0]["image"])
        np.testing.assert_array_equal(batch["depth"][k], match[0]["depth"])

    evaluation = input_pipeline.create_eval_dataset(cfg, _input_cfg(), tasks=tasks, global_batch_size=2)
    batches = list(evaluation)
    assert len(evaluation) == len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"image", "segmentation", "depth"}
    for k in range(2):  # eval at the stored 128x256: the records as stored, in order
        record = stored["test"][k]
        np.testing.assert_array_equal(batch["image"][k], record["image"])
        np.testing.assert_array_equal(batch["segmentation"][k], record["segmentation"])
        np.testing.assert_array_equal(batch["depth"][k], record["depth"])
