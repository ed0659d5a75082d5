"""Tests for the grain input pipeline on the `tiny` synthetic_scenes build (48x64, 24 train / 8 test)."""

import json
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from auxmtl_jax import augment, input_pipeline

TASKS = ("segmentation", "depth", "normal")
MEAN, STD = (120.0, 110.0, 100.0), (50.0, 60.0, 70.0)


@pytest.fixture(scope="module")
def dataset_cfg(tmp_path_factory):
    cfg = ml_collections.ConfigDict()
    cfg.name, cfg.config, cfg.manual_dir = "synthetic_scenes", "tiny", None
    cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg.prepare, cfg.train_split, cfg.eval_split = True, "train", "test"
    input_pipeline.prepare_dataset(cfg)
    return cfg


def _input_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(crop_size=(40, 56), scale_range=(0.5, 2.0), flip=True, eval_size=None,
                                         num_workers=0, mean=MEAN, std=STD))
    cfg.update(overrides)
    return cfg


def _hand_made_example(height=4, width=6):
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(height, width, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[0, 0] = 0.0
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "segmentation": rng.integers(0, 7, (height, width), dtype=np.uint8),
        "depth": rng.uniform(0.5, 5.0, (height, width, 1)).astype(np.float32),
        "normal": normal,
    }


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])


def test_flip_mirrors_and_negates_normal_x():
    example = _hand_made_example()
    flipped = augment.flip_horizontal(example)
    for key in ("image", "segmentation", "depth"):
        np.testing.assert_array_equal(flipped[key], example[key][:, ::-1])
    np.testing.assert_array_equal(flipped["normal"][..., 0], -example["normal"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normal"][..., 1:], example["normal"][:, ::-1, 1:])
    assert not np.any(flipped["normal"][0, -1])


def test_rescale_uses_nearest_labels_and_divides_depth():
    example = _hand_made_example()
    out = augment.resize_window(example, 2.0, 0, 0, (8, 12), image_fill=MEAN)
    np.testing.assert_array_equal(out["segmentation"], np.repeat(np.repeat(example["segmentation"], 2, 0), 2, 1))
    np.testing.assert_allclose(out["depth"], np.repeat(np.repeat(example["depth"], 2, 0), 2, 1) / 2.0)
    np.testing.assert_array_equal(out["normal"], np.repeat(np.repeat(example["normal"], 2, 0), 2, 1))
    assert out["segmentation"].dtype == np.int32 and out["image"].dtype == np.float32
    uniform = dict(example, image=np.full((4, 6, 3), 77, np.uint8))
    np.testing.assert_allclose(augment.resize_window(uniform, 0.5, 0, 0, (2, 3), image_fill=MEAN)["image"],
                               77.0)
    kept = augment.resize_window(example, 2.0, 0, 0, (8, 12), image_fill=MEAN, divide_depth=False)
    np.testing.assert_allclose(kept["depth"], np.repeat(np.repeat(example["depth"], 2, 0), 2, 1))


def test_window_outside_the_image_is_padding():
    example = _hand_made_example()
    out = augment.resize_window(example, 1.0, -2, -1, (7, 8), image_fill=MEAN)
    inside = np.zeros((7, 8), bool)
    inside[2:6, 1:7] = True
    np.testing.assert_array_equal(out["segmentation"][2:6, 1:7], example["segmentation"])
    np.testing.assert_array_equal(out["image"][2:6, 1:7], example["image"])
    assert np.all(out["segmentation"][~inside] == 255)
    assert np.all(out["depth"][~inside] == 0) and np.all(out["normal"][~inside] == 0)
    np.testing.assert_array_equal(out["image"][~inside], np.broadcast_to(MEAN, (int((~inside).sum()), 3)))
    normalised = augment.normalise_image(out["image"], MEAN, STD)
    assert np.all(normalised[~inside] == 0)


def test_train_batches_follow_the_contract(dataset_cfg):
    iterator = input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(crop_size=(64, 80)), tasks=TASKS,
                                                    global_batch_size=4, seed=0)
    padding_pixels = 0
    for batch in _take(iterator, 3):
        assert set(batch) == {"image", *TASKS}
        assert batch["image"].shape == (4, 64, 80, 3) and batch["image"].dtype == np.float32
        assert batch["segmentation"].shape == (4, 64, 80) and batch["segmentation"].dtype == np.int32
        assert batch["depth"].shape == (4, 64, 80, 1) and batch["depth"].dtype == np.float32
        assert batch["normal"].shape == (4, 64, 80, 3) and batch["normal"].dtype == np.float32
        seg = batch["segmentation"]
        assert np.all((seg == 255) | ((seg >= 0) & (seg < 7)))
        valid_normal = np.any(batch["normal"] != 0, axis=-1)
        np.testing.assert_allclose(np.linalg.norm(batch["normal"][valid_normal], axis=-1), 1.0, atol=1e-5)
        assert np.all(batch["depth"] >= 0)
        # Scales below 64/48 leave part of the crop outside the image: zero (mean) image, ignore/invalid labels.
        padded = np.all(batch["image"] == 0, axis=-1)
        padding_pixels += padded.sum()
        assert np.all(seg[padded] == 255) and np.all(batch["depth"][padded] == 0)
        assert np.all(batch["normal"][padded] == 0)
    assert padding_pixels > 0
    depth_only = input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(), tasks=("depth",),
                                                      global_batch_size=2, seed=0)
    assert set(next(depth_only)) == {"image", "depth"}


def test_train_iterator_is_deterministic_for_a_seed(dataset_cfg):
    make = lambda seed: input_pipeline.create_train_iterator(  # noqa: E731
        dataset_cfg, _input_cfg(), tasks=TASKS, global_batch_size=4, seed=seed)
    # 8 batches of 4 cover more than one epoch of the 24 training examples.
    _assert_batches_equal(_take(make(5), 8), _take(make(5), 8))
    assert not np.array_equal(next(make(5))["image"], next(make(6))["image"])


def test_set_state_resumes_exactly(dataset_cfg):
    make = lambda: input_pipeline.create_train_iterator(  # noqa: E731
        dataset_cfg, _input_cfg(), tasks=TASKS, global_batch_size=4, seed=1)
    uninterrupted = _take(make(), 9)
    first = make()
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), uninterrupted[4:])
    assert resumed.get_state()["next_batch"] == 9
    other_seed = input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(), tasks=TASKS,
                                                      global_batch_size=4, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)


def test_worker_processes_give_the_same_batches(dataset_cfg):
    make = lambda workers: input_pipeline.create_train_iterator(  # noqa: E731
        dataset_cfg, _input_cfg(num_workers=workers), tasks=TASKS, global_batch_size=4, seed=3)
    in_process = _take(make(0), 3)
    with_worker = make(1)
    try:
        _assert_batches_equal(_take(with_worker, 3), in_process)
    finally:
        with_worker.close()


def test_hosts_get_disjoint_interleaved_shares_of_each_global_batch(dataset_cfg):
    make = lambda index, count: input_pipeline.create_train_iterator(  # noqa: E731
        dataset_cfg, _input_cfg(), tasks=TASKS, global_batch_size=4, seed=0, process_index=index,
        process_count=count)
    whole = _take(make(0, 1), 2)
    host0, host1 = _take(make(0, 2), 2), _take(make(1, 2), 2)
    for full, part0, part1 in zip(whole, host0, host1):
        for key in full:
            assert part0[key].shape[0] == 2
            np.testing.assert_array_equal(full[key][0::2], part0[key])
            np.testing.assert_array_equal(full[key][1::2], part1[key])
    with pytest.raises(ValueError, match="multiple of the process count"):
        make(0, 3)


def test_eval_pads_the_last_batch_with_invalid_examples(dataset_cfg):
    evaluation = input_pipeline.create_eval_dataset(dataset_cfg, _input_cfg(), tasks=TASKS, global_batch_size=3)
    assert len(evaluation) == 3
    batches = list(evaluation)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (3, 48, 64, 3)
    last = batches[-1]
    assert np.any(last["segmentation"][1] != 255) and np.any(last["depth"][1] > 0)
    # 8 test examples in 3 batches of 3: the last slot is padding.
    assert np.all(last["image"][2] == 0) and np.all(last["segmentation"][2] == 255)
    assert np.all(last["depth"][2] == 0) and np.all(last["normal"][2] == 0)
    source = input_pipeline.get_builder(dataset_cfg).as_data_source(split="test")
    record = source[7]
    np.testing.assert_array_equal(last["segmentation"][1], record["segmentation"])
    np.testing.assert_array_equal(last["depth"][1], record["depth"])
    np.testing.assert_allclose(last["image"][1], (record["image"] - np.array(MEAN)) / np.array(STD), rtol=1e-6)
    _assert_batches_equal(batches, list(evaluation))


def test_eval_resizes_to_eval_size_and_shards_per_host(dataset_cfg):
    make = lambda index, count: input_pipeline.create_eval_dataset(  # noqa: E731
        dataset_cfg, _input_cfg(eval_size=(32, 32)), tasks=("depth",), global_batch_size=4, process_index=index,
        process_count=count)
    whole, host0, host1 = list(make(0, 1)), list(make(0, 2)), list(make(1, 2))
    assert len(whole) == len(host0) == len(host1) == 2
    for full, part0, part1 in zip(whole, host0, host1):
        assert full["depth"].shape == (4, 32, 32, 1)
        np.testing.assert_array_equal(full["depth"][0::2], part0["depth"])
        np.testing.assert_array_equal(full["depth"][1::2], part1["depth"])
    # 48x64 fits 32x32 at scale 0.5 as 24x32, centred: 4 rows of padding above and below.
    depth = whole[0]["depth"][..., 0]
    assert np.all(depth[:, :4] == 0) and np.all(depth[:, -4:] == 0) and np.mean(depth[:, 4:-4] > 0) > 0.8


def test_missing_task_split_and_dataset_errors(dataset_cfg):
    info = input_pipeline.DatasetInfo("nyu_v2", 13, tuple("abcdefghijklm"), ("segmentation", "depth"), {}, (4, 4))
    with pytest.raises(ValueError, match=r"'nyu_v2' has no task 'normal'.*\['segmentation', 'depth'\]"):
        input_pipeline.check_tasks(info, ("segmentation", "normal"))
    with pytest.raises(ValueError, match="Unknown task 'edges'"):
        input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(), tasks=("edges",), global_batch_size=2,
                                             seed=0)
    bad_split = ml_collections.ConfigDict(dataset_cfg.to_dict())
    bad_split.eval_split = "validation"
    with pytest.raises(ValueError, match=r"split='validation': dataset 'synthetic_scenes' has no such split; expected one of test, train"):
        input_pipeline.create_eval_dataset(bad_split, _input_cfg(), tasks=TASKS, global_batch_size=2)
    unknown = ml_collections.ConfigDict(dataset_cfg.to_dict())
    unknown.name = "imagenet"
    with pytest.raises(ValueError, match="Unknown dataset.name 'imagenet'.*synthetic_scenes, nyu_v2, sunrgbd"):
        input_pipeline.get_builder(unknown)
    info = input_pipeline.dataset_info(dataset_cfg)
    assert info.splits == {"train": 24, "test": 8} and info.image_size == (48, 64) and info.num_classes == 7


_BUILD_KILLED_MIDWAY = """
import os, signal, sys
from auxmtl_datasets.synthetic_scenes import builder
from auxmtl_jax import input_pipeline
import ml_collections

render = builder._render_record


def render_then_die(index, **kwargs):
    if kwargs["split"] == "test" and index == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
    return render(index, **kwargs)


builder._render_record = render_then_die
cfg = ml_collections.ConfigDict(dict(name="synthetic_scenes", config="tiny", manual_dir=None, data_dir=sys.argv[1],
                                     prepare=True, train_split="train", eval_split="test"))
input_pipeline.prepare_dataset(cfg)
"""


def _leftovers(data_dir):
    return sorted(path.name for path in data_dir.rglob("*")
                  if path.name.startswith((input_pipeline.TFDS_INCOMPLETE_PREFIX, input_pipeline.DOWNLOADS_PREFIX)))


@pytest.mark.slow
def test_next_build_removes_what_a_killed_build_left(tmp_path):
    data_dir = tmp_path / "tfds"
    killed = subprocess.run([sys.executable, "-c", _BUILD_KILLED_MIDWAY, str(data_dir)], capture_output=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert any(name.startswith(input_pipeline.TFDS_INCOMPLETE_PREFIX) for name in _leftovers(data_dir))
    assert any(name.startswith(input_pipeline.DOWNLOADS_PREFIX) for name in _leftovers(data_dir))

    cfg = ml_collections.ConfigDict(dict(name="synthetic_scenes", config="tiny", manual_dir=None,
                                         data_dir=str(data_dir), prepare=True, train_split="train",
                                         eval_split="test"))
    input_pipeline.prepare_dataset(cfg)
    assert input_pipeline.dataset_info(cfg).splits == {"train": 24, "test": 8}
    assert _leftovers(data_dir) == []
