"""Deformable 3x3 conv: a plain conv at zero offsets, an independent NumPy bilinear reference, offset gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax.models.deformable import DeformableConv, DeformableConvBN, deformable_conv2d
from auxmtl_jax.models.layers import symmetric_padding


def plain_conv(x, kernel, dilation=1):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), symmetric_padding(kernel.shape[0], dilation),
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def numpy_deformable_conv(x, offsets, kernel, dilation=1):
    """Direct loops: every output pixel, tap and bilinear corner, zeros outside the image."""
    batch, height, width, _ = x.shape
    size = kernel.shape[0]
    out = np.zeros((batch, height, width, kernel.shape[-1]))

    def pixel(b, row, col):
        if 0 <= row < height and 0 <= col < width:
            return x[b, row, col]
        return np.zeros(x.shape[-1])

    for b in range(batch):
        for i in range(height):
            for j in range(width):
                for r in range(size):
                    for c in range(size):
                        tap = r * size + c
                        y = i + (r - (size - 1) / 2) * dilation + offsets[b, i, j, 2 * tap]
                        z = j + (c - (size - 1) / 2) * dilation + offsets[b, i, j, 2 * tap + 1]
                        y0, z0 = int(np.floor(y)), int(np.floor(z))
                        wy, wz = y - y0, z - z0
                        value = ((1 - wy) * (1 - wz) * pixel(b, y0, z0) + (1 - wy) * wz * pixel(b, y0, z0 + 1)
                                 + wy * (1 - wz) * pixel(b, y0 + 1, z0) + wy * wz * pixel(b, y0 + 1, z0 + 1))
                        out[b, i, j] += value @ kernel[r, c]
    return out


@pytest.mark.parametrize("dilation", [1, 2])
def test_zero_offsets_give_a_plain_conv(dilation):
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    offsets = jnp.zeros((2, 7, 9, 18))
    np.testing.assert_allclose(deformable_conv2d(x, offsets, kernel, dilation=dilation),
                               plain_conv(x, kernel, dilation), rtol=1e-5, atol=1e-5)


def test_offsets_match_a_numpy_bilinear_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    # fractional offsets up to +-2.5 pixels: interior, border and fully-outside samples
    offsets = rng.uniform(-2.5, 2.5, size=(2, 5, 6, 18)).astype(np.float32)
    offsets[0, 0, 0, :2] = (-7.0, 9.0)  # far outside: reads zero
    offsets[1, 2, 3, 8:10] = (1.0, -2.0)  # integer offset: lands on a pixel exactly
    ours = deformable_conv2d(jnp.asarray(x), jnp.asarray(offsets), jnp.asarray(kernel))
    np.testing.assert_allclose(ours, numpy_deformable_conv(x, offsets, kernel), rtol=1e-4, atol=1e-4)


def test_offset_gradients_are_finite_and_non_zero():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    offsets = jax.random.uniform(jax.random.key(2), (2, 6, 6, 18), minval=-1.5, maxval=1.5)
    grad = jax.grad(lambda o: jnp.sum(jnp.sin(deformable_conv2d(x, o, kernel))))(offsets)
    assert np.all(np.isfinite(grad))
    # samples wholly outside the 6x6 image read a constant zero and have no gradient; the others all do
    inside = np.abs(np.asarray(grad)) > 0
    assert inside.mean() > 0.5, inside.mean()
    # and at zero offsets, where the module starts
    grad_at_zero = jax.grad(lambda o: jnp.sum(jnp.sin(deformable_conv2d(x, o, kernel))))(jnp.zeros_like(offsets))
    assert np.all(np.isfinite(grad_at_zero)) and np.any(np.asarray(grad_at_zero) != 0)


def test_module_starts_as_a_plain_conv_and_learns_offsets():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 4))
    module = DeformableConv(5)
    variables = module.init(jax.random.key(1), x)
    np.testing.assert_allclose(module.apply(variables, x), plain_conv(x, variables["params"]["kernel"]),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x))))(variables["params"])
    assert np.any(np.asarray(grads["offsets"]["kernel"]) != 0)
    assert np.all(np.isfinite(np.asarray(grads["offsets"]["kernel"])))
    layer = DeformableConvBN(5)
    layer_variables = layer.init(jax.random.key(1), x, train=False)
    assert set(layer_variables["params"]) == {"conv", "bn"}
    assert layer.apply(layer_variables, x, train=False).shape == (2, 6, 7, 5)
