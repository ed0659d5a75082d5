"""uint8 images on the wire, normalised on the device (`augment.model_input`), and the input pipeline's thread and
worker sizing (`input_sizing`).

Tolerances. Pillow resamples uint8 images and rounds, so the augmented pixels were integers on the old float32
path already; only the crop's padding changes: it held the mean exactly and now holds the mean rounded to uint8,
at most 0.5 away on the 0-255 scale, i.e. at most 0.5 / std per channel after normalisation. `model_input` looks
each byte up in a table `normalise_image` computed, so its float32 values are `normalise_image`'s bit for bit.
So (a) against the old float path rounded the same way (`to_uint8` before normalising) every pixel is equal
(the stated tolerance is float32 rounding, FLOAT32_TOL = a few ulp of values below 3; what we get is exact),
and (b) against the unrounded old path the difference is at most 0.5 / std on the padding and the same as (a)
elsewhere.
"""

import dataclasses
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax import augment, inference, input_pipeline, input_sizing
from auxmtl_jax.augment import IMAGE_MEAN, IMAGE_STD, model_input, normalise_image
from auxmtl_jax.errors import UserError
from auxmtl_jax.training import steps

TASKS = ("segmentation", "depth", "normal")
FLOAT32_TOL = 1e-6
PADDING_TOL = 0.5 / np.asarray(IMAGE_STD, np.float32) + FLOAT32_TOL


def _record(seed, height=48, width=64):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(height, width, 3)).astype(np.float32)
    return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "segmentation": rng.integers(0, 7, (height, width), dtype=np.uint8),
            "depth": rng.uniform(0.5, 5.0, (height, width, 1)).astype(np.float32),
            "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True)}


def _old_float_image(record, seed, crop, scale_range):
    """The float32 image of the old path: the same random draws as `TrainTransform`, the augmentation in float
    (padding = the exact mean), no rounding."""
    rng = np.random.default_rng(seed)
    example = {"image": record["image"]}
    if rng.random() < 0.5:
        example = augment.flip_horizontal(example)
    scale = float(rng.uniform(*scale_range))
    height, width = example["image"].shape[:2]
    top = augment.crop_offset(rng, max(1, round(height * scale)), crop[0])
    left = augment.crop_offset(rng, max(1, round(width * scale)), crop[1])
    return augment.resize_window(example, scale, top, left, crop, image_fill=IMAGE_MEAN,
                                 image_dtype=np.float32)["image"]


def test_uint8_normalised_on_device_matches_the_old_float_path():
    crop, scale_range = (40, 56), (0.5, 2.0)
    transform = augment.TrainTransform(TASKS, crop, scale_range, True, IMAGE_MEAN, IMAGE_STD)
    seeds = range(12)
    records = [_record(seed) for seed in seeds]
    shipped = np.stack([transform(record, np.random.default_rng(seed))["image"] for seed, record in
                        zip(seeds, records)])
    assert shipped.dtype == np.uint8
    on_device = np.asarray(jax.jit(model_input)(jnp.asarray(shipped)))
    assert on_device.dtype == np.float32

    old_float = np.stack([_old_float_image(record, seed, crop, scale_range) for seed, record in zip(seeds, records)])
    assert np.abs(augment.to_uint8(old_float) - old_float).max() <= 0.5
    # (a) the float path rounded the same way: equal to float32 rounding (in fact bit for bit).
    rounded_old = normalise_image(augment.to_uint8(old_float), IMAGE_MEAN, IMAGE_STD)
    np.testing.assert_allclose(on_device, rounded_old, rtol=0, atol=FLOAT32_TOL)
    np.testing.assert_array_equal(on_device, rounded_old)
    # (b) the old, unrounded path: within 0.5 / std on the padding, float32 rounding elsewhere.
    old = normalise_image(old_float, IMAGE_MEAN, IMAGE_STD)
    difference = np.abs(on_device - old)
    padding = np.all(old_float == np.asarray(IMAGE_MEAN, np.float32), axis=-1)
    assert padding.any() and not padding.all()
    assert np.all(difference <= PADDING_TOL)
    assert difference[~padding].max() <= FLOAT32_TOL
    assert difference[padding].max() > FLOAT32_TOL  # the rounding of the mean is visible, and bounded above


def test_model_input_is_normalise_image_for_every_byte_and_passes_floats_through():
    every_byte = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 1, 3))
    for mean, std in ((IMAGE_MEAN, IMAGE_STD), ((120.0, 110.0, 100.0), (50.0, 60.0, 70.0))):
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: model_input(x, mean, std))(every_byte)),
                                      normalise_image(every_byte.astype(np.float32), mean, std))
    floats = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    assert model_input(floats) is floats
    for dtype in (jnp.float32, jnp.bfloat16):
        value = jnp.asarray(floats, dtype)
        passed = model_input(value)
        assert passed.dtype == dtype and np.array_equal(np.asarray(passed), np.asarray(value))
    with pytest.raises(UserError, match=r"^images: dtype int32; expected uint8"):
        model_input(np.zeros((1, 2, 2, 3), np.int32))


class _Seen(Exception):
    """Raised by the fake model with the images the step handed it."""


class _FakeModel:
    def apply(self, variables, images, **kwargs):
        raise _Seen(images)

    def predict(self, variables, images):
        raise _Seen(images)


def test_steps_normalise_uint8_batches_before_the_model():
    images = np.random.default_rng(1).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    expected = normalise_image(images.astype(np.float32), IMAGE_MEAN, IMAGE_STD)
    calls = {"loss_terms": lambda batch: steps.loss_terms(_FakeModel(), None, {}, {}, batch),
             "eval_step": lambda batch: steps.eval_step({}, {}, batch, model=_FakeModel())}
    for name, call in calls.items():
        with pytest.raises(_Seen) as seen:
            call({"image": jnp.asarray(images)})
        assert seen.value.args[0].dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(seen.value.args[0]), expected)
    # Every model call in the steps reads the batch's images through model_input.
    source = pathlib.Path(steps.__file__).read_text()
    assert source.count('batch["image"]') == source.count('model_input(batch["image"])') >= 3


@dataclasses.dataclass(frozen=True)
class _EchoModel:
    def predict(self, variables, images):
        return {"depth": images}


def test_predictor_normalises_on_the_device_like_on_the_host():
    predictor = inference.Predictor(model=_EchoModel(), variables={},
                                    export_config={"input": {"mean": [120.0, 110.0, 100.0], "std": [50.0, 60.0, 70.0]}})
    images = np.random.default_rng(2).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predictor.predict(images)["depth"], predictor.normalise(images))


@pytest.fixture(scope="module")
def dataset_cfg(tmp_path_factory):
    cfg = types.SimpleNamespace(name="synthetic_scenes", config="tiny", manual_dir=None, prepare=True,
                                train_split="train", eval_split="test", data_dir=str(tmp_path_factory.mktemp("tfds")))
    input_pipeline.prepare_dataset(cfg)
    return cfg


def _input_cfg(**overrides):
    fields = dict(crop_size=(40, 56), scale_range=(0.5, 2.0), flip=True, eval_size=None, num_workers=0,
                  num_threads=None, mean=IMAGE_MEAN, std=IMAGE_STD)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def test_pipeline_yields_uint8_images(dataset_cfg):
    iterator = input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(), tasks=TASKS, global_batch_size=4,
                                                    seed=0)
    batch = next(iterator)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 40, 56, 3)
    assert batch["segmentation"].dtype == np.int32 and batch["depth"].dtype == np.float32
    assert batch["normal"].dtype == np.float32
    eval_batches = list(input_pipeline.create_eval_dataset(dataset_cfg, _input_cfg(), tasks=TASKS,
                                                           global_batch_size=3))
    assert all(batch["image"].dtype == np.uint8 for batch in eval_batches)
    # 8 test images in batches of 3: the last one padded with an all-invalid example whose image is the mean.
    np.testing.assert_array_equal(eval_batches[-1]["image"][-1], np.broadcast_to(np.round(IMAGE_MEAN), (48, 64, 3)))
    assert np.all(eval_batches[-1]["segmentation"][-1] == 255)
    # Another mean/std than model_input applies: normalised on the host, as before.
    other = _input_cfg(mean=(120.0, 110.0, 100.0), std=(50.0, 60.0, 70.0))
    host_normalised = next(input_pipeline.create_train_iterator(dataset_cfg, other, tasks=TASKS, global_batch_size=4,
                                                                seed=0))
    assert host_normalised["image"].dtype == np.float32


def test_sizing_defaults_follow_the_cores():
    unset = types.SimpleNamespace(num_workers=None, num_threads=None)
    assert input_sizing.resolve(unset, cores=1) == (0, 1, 2)
    assert input_sizing.resolve(unset, cores=2) == (0, 2, 2)
    assert input_sizing.resolve(unset, cores=4) == (2, 1, 1)
    assert input_sizing.resolve(unset, cores=16) == (8, 1, 1)
    assert input_sizing.resolve(unset, cores=96) == (input_sizing.MAX_AUTO_WORKERS, 1, 1)
    assert input_sizing.resolve(unset, cores=96, in_process=True) == (0, input_sizing.MAX_AUTO_THREADS, 8)
    assert input_sizing.resolve(None, cores=3) == (0, 3, 3)  # a config without the fields
    assert input_sizing.available_cores() >= 1


def test_sizing_honours_the_config(dataset_cfg):
    chosen = types.SimpleNamespace(num_workers=3, num_threads=4)
    assert input_sizing.resolve(chosen, cores=2) == (3, 4, 4)
    assert input_sizing.resolve(chosen, cores=64, in_process=True) == (0, 4, 4)
    assert input_sizing.resolve(types.SimpleNamespace(num_workers=0, num_threads=None), cores=16) == (0, 8, 8)
    iterator = input_pipeline.create_train_iterator(dataset_cfg, _input_cfg(num_workers=0, num_threads=1),
                                                    tasks=TASKS, global_batch_size=4, seed=0)
    assert iterator.sizing == (0, 1, 2)
    next(iterator)
    from auxmtl_configs import common  # the run config's fields: None by default, integers accepted

    config = common.base_config()
    assert config.input.num_workers is None and config.input.num_threads is None
    config.input.num_workers, config.input.num_threads = 2, 3
    assert input_sizing.resolve(config.input) == (2, 3, 3)


@pytest.mark.parametrize("key, value, shown", [("num_workers", -1, "-1"), ("num_threads", 0, "0"),
                                               ("num_workers", 1.5, "1.5"), ("num_threads", True, "True"),
                                               ("num_workers", "2", "'2'")])
def test_sizing_rejects_bad_values_with_one_line(key, value, shown):
    cfg = _input_cfg(**{key: value})
    with pytest.raises(UserError) as error:
        input_sizing.resolve(cfg, cores=2)
    message = str(error.value)
    assert "\n" not in message
    assert re.match(rf"config\.input\.{key}={re.escape(shown)}; expected None \(sized from this host's 2 cores\) "
                    rf"or an integer >= {0 if key == 'num_workers' else 1}\.$", message)
    # The pipeline checks before it touches the dataset.
    unreadable = types.SimpleNamespace(name="no_such_dataset")
    with pytest.raises(UserError, match=rf"^config\.input\.{key}="):
        input_pipeline.create_train_iterator(unreadable, cfg, tasks=TASKS, global_batch_size=4, seed=0)
    with pytest.raises(UserError, match=rf"^config\.input\.{key}="):
        input_pipeline.create_eval_dataset(unreadable, cfg, tasks=TASKS, global_batch_size=4)
