"""Tests for the procedural renderer and the `synthetic_scenes` TFDS builder (built once at the `tiny` size)."""

import ml_collections
import numpy as np
import pytest

from auxmtl_datasets.synthetic_scenes import builder as builder_module
from auxmtl_datasets.synthetic_scenes import render
from auxmtl_jax import input_pipeline


def _dataset_cfg(data_dir, config="tiny", prepare=True):
    cfg = ml_collections.ConfigDict()
    cfg.name, cfg.config, cfg.data_dir, cfg.manual_dir = "synthetic_scenes", config, str(data_dir), None
    cfg.prepare, cfg.train_split, cfg.eval_split = prepare, "train", "test"
    return cfg


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    cfg = _dataset_cfg(tmp_path_factory.mktemp("tfds"))
    input_pipeline.prepare_dataset(cfg)
    return input_pipeline.get_builder(cfg)


def _rays(height, width):
    camera = render.intrinsics(height, width)
    v, u = np.mgrid[0:height, 0:width] + 0.5
    return np.stack([(u - camera["cx"]) / camera["fx"], (v - camera["cy"]) / camera["fy"], np.ones_like(u)], -1)


def test_render_is_deterministic_per_seed_split_and_index():
    first = render.render_example(3, "train", 7, 24, 32)
    again = render.render_example(3, "train", 7, 24, 32)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], render.render_example(3, "train", 8, 24, 32)["image"])
    assert not np.array_equal(first["image"], render.render_example(3, "test", 7, 24, 32)["image"])


def test_scenes_have_three_to_eight_objects_of_several_classes():
    scenes = [render.sample_scene(np.random.default_rng(index)) for index in range(40)]
    counts = [len(scene.objects) for scene in scenes]
    assert min(counts) >= 3 and max(counts) <= 8
    assert {o.class_id for scene in scenes for o in scene.objects} == set(render.OBJECT_CLASSES)


def test_ground_truth_is_geometrically_exact():
    height, width = 40, 56
    floor_pixels_checked = 0
    for index in range(4):
        rng = np.random.default_rng([11, index])
        scene = render.sample_scene(rng)
        example = render.render(scene, height, width, rng)
        depth, normal, segmentation = example["depth"][..., 0], example["normal"], example["segmentation"]
        valid = depth > 0
        assert valid.mean() > 0.8
        assert np.all(np.isfinite(depth)) and np.all(depth[valid] < np.linalg.norm(scene.room_size))
        np.testing.assert_array_equal(np.any(normal != 0, axis=-1), valid)
        np.testing.assert_allclose(np.linalg.norm(normal[valid], axis=-1), 1.0, atol=1e-5)
        labels = set(np.unique(segmentation)) - {render.IGNORE_LABEL}
        assert labels <= set(range(len(render.CLASS_NAMES))) and render.WALL in labels

        rays = _rays(height, width)
        # Every visible surface faces the camera.
        assert np.all(np.einsum("ijk,ijk->ij", normal, rays)[valid] < 0)
        points_world = (depth[..., None] * rays) @ scene.camera_rotation.T + scene.camera_position
        floor = valid & (segmentation == render.FLOOR)
        floor_pixels_checked += floor.sum()
        np.testing.assert_allclose(points_world[floor][:, 1], 0.0, atol=1e-6)
        up_in_camera = scene.camera_rotation.T @ np.array([0.0, 1.0, 0.0])
        np.testing.assert_allclose(normal[floor], np.broadcast_to(up_in_camera, normal[floor].shape), atol=1e-5)
        walls = valid & (segmentation == render.WALL)
        on_a_wall = np.minimum(np.abs(points_world[..., [0, 2]]),
                               np.abs(points_world[..., [0, 2]] - scene.room_size[[0, 2]])).min(-1)
        np.testing.assert_allclose(on_a_wall[walls], 0.0, atol=1e-6)
    assert floor_pixels_checked > 100


def test_builder_metadata_and_records(tiny_builder):
    info = tiny_builder.info
    assert info.metadata["num_classes"] == len(render.CLASS_NAMES)
    assert list(info.metadata["class_names"]) == list(render.CLASS_NAMES)
    assert list(info.metadata["tasks"]) == ["segmentation", "depth", "normal"]
    assert info.splits["train"].num_examples == 24 and info.splits["test"].num_examples == 8
    source = tiny_builder.as_data_source(split="test")
    record = source[5]
    assert record["image"].shape == (48, 64, 3) and record["image"].dtype == np.uint8
    assert record["segmentation"].shape == (48, 64) and record["segmentation"].dtype == np.uint8
    assert record["depth"].shape == (48, 64, 1) and record["depth"].dtype == np.float32
    assert record["normal"].shape == (48, 64, 3) and record["normal"].dtype == np.float32
    split, index = record["id"].decode().split("/")
    expected = render.render_example(tiny_builder.builder_config.seed, split, int(index), 48, 64)
    for key in ("image", "segmentation", "depth", "normal"):
        np.testing.assert_array_equal(record[key], expected[key])


def test_rebuild_gives_identical_files(tiny_builder, tmp_path):
    cfg = _dataset_cfg(tmp_path)
    input_pipeline.prepare_dataset(cfg)
    rebuilt = input_pipeline.get_builder(cfg)
    files = sorted(path.name for path in tiny_builder.data_path.iterdir() if "array_record" in path.name)
    assert files
    for name in files:
        assert (rebuilt.data_path / name).read_bytes() == (tiny_builder.data_path / name).read_bytes()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_render(seed, split, index, height, width):
        if split == "test" and index == 3:
            raise RuntimeError("renderer crashed")
        return real_render(seed, split, index, height, width)

    real_render = render.render_example
    monkeypatch.setattr(builder_module.render, "render_example", failing_render)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        input_pipeline.prepare_dataset(_dataset_cfg(tmp_path / "data"))
    assert not (tmp_path / "data" / "synthetic_scenes").exists()


def test_unprepared_dataset_error_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m auxmtl_jax.input_pipeline --dataset=synthetic_scenes --config=tiny"):
        input_pipeline.prepare_dataset(_dataset_cfg(tmp_path, prepare=False))
    assert not any(tmp_path.iterdir())
