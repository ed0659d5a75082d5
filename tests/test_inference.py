"""Reading image files for inference: every input the CLI accepts becomes uint8 RGB in the range it was meant."""

import numpy as np
import pytest
from PIL import Image

from auxmtl_jax import inference


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 48).round().astype(np.uint16).reshape(40, 48)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    image = inference.read_image(tmp_path / "depth16.png")
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(image[..., 0], expected)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert (image == 255).mean() < 0.01


def test_eight_bit_images_are_read_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(inference.read_image(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(inference.read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, -1))


def test_float_images_are_refused_with_one_clear_line(tmp_path):
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"float\.tiff: a floating-point image \(mode F\); expected an 8- or 16-bit"):
        inference.read_image(tmp_path / "float.tiff")


def test_predictor_refuses_arrays_that_are_not_uint8():
    predictor = inference.Predictor(model=None, variables=None,
                                    export_config={"input": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    with pytest.raises(ValueError, match=r"images: dtype uint16; expected uint8 RGB"):
        predictor.normalise(np.zeros((1, 4, 4, 3), np.uint16))
    assert predictor.normalise(np.full((1, 4, 4, 3), 7, np.uint8)).max() == 7.0
