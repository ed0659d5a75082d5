"""Deformable 3x3 convolution (Dai et al. 2017, v1) in plain JAX: learned per-pixel offsets, bilinear sampling.

``deformable_conv2d(x, offsets, kernel)`` is the pure function: output pixel (i, j) sums, over the kernel taps
(r, c), ``kernel[r, c]`` times the input bilinearly sampled at

    (i + (r - (k-1)/2)·dilation + dy[i, j, tap],  j + (c - (k-1)/2)·dilation + dx[i, j, tap]),  tap = r·k + c,

where ``offsets[..., 2·tap] = dy`` and ``offsets[..., 2·tap + 1] = dx``. Positions outside the image read zeros
(each of the four bilinear corners separately), as torchvision's ``deform_conv2d`` does, so with zero offsets it
is exactly a stride-1 'same' convolution. Sampling is four gathers (one per bilinear corner, all taps at once),
then one contraction with the kernel; the gradient reaches the offsets through the bilinear weights.

``DeformableConv`` predicts the offsets with a 3x3 conv of its input (zero-initialised, so it starts as a plain
conv); ``DeformableConvBN`` adds BN + ReLU, the search space's ``deform_conv3x3`` operation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.models.layers import batch_norm, conv_kernel_init, symmetric_padding

Dtype = Any


def bilinear_sample(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Samples NHWC ``x`` at float positions ``rows``/``cols`` [B, ...] -> [B, ..., C]; outside the image reads 0."""
    batch, height, width, channels = x.shape
    flat = x.reshape(batch, height * width, channels)
    top, left = jnp.floor(rows), jnp.floor(cols)
    row_weight, col_weight = rows - top, cols - left
    top, left = top.astype(jnp.int32), left.astype(jnp.int32)
    gather_rows = jax.vmap(lambda image, index: image[index])
    sampled = jnp.zeros((*rows.shape, channels), x.dtype)
    for row_offset, row_part in ((0, 1 - row_weight), (1, row_weight)):
        for col_offset, col_part in ((0, 1 - col_weight), (1, col_weight)):
            row, col = top + row_offset, left + col_offset
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
            index = jnp.clip(row, 0, height - 1) * width + jnp.clip(col, 0, width - 1)
            values = gather_rows(flat, index.reshape(batch, -1)).reshape(*rows.shape, channels)
            weight = jnp.where(inside, row_part * col_part, 0).astype(x.dtype)
            sampled = sampled + values * weight[..., None]
    return sampled


def deformable_conv2d(x: jax.Array, offsets: jax.Array, kernel: jax.Array, *, dilation: int = 1) -> jax.Array:
    """Stride-1 'same' deformable convolution: x [B,H,W,Cin], offsets [B,H,W,2·k·k], kernel [k,k,Cin,Cout]."""
    size = kernel.shape[0]
    batch, height, width, channels = x.shape
    if kernel.shape[1] != size or offsets.shape != (batch, height, width, 2 * size * size):
        raise ValueError(f"deformable_conv2d: kernel {kernel.shape} must be square and offsets {offsets.shape} must "
                         f"be {(batch, height, width, 2 * size * size)}")
    taps = (jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2) * dilation
    offsets = offsets.astype(jnp.float32).reshape(batch, height, width, size * size, 2)
    # [B, H, W, k*k] sampling positions, taps in row-major order
    rows = jnp.arange(height, dtype=jnp.float32)[:, None, None] + jnp.repeat(taps, size)[None, None, :]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :, None] + jnp.tile(taps, size)[None, None, :]
    sampled = bilinear_sample(x, rows + offsets[..., 0], cols + offsets[..., 1])  # [B, H, W, k*k, Cin]
    return jnp.einsum("bhwtc,tco->bhwo", sampled, kernel.reshape(size * size, channels, -1).astype(x.dtype))


class DeformableConv(nn.Module):
    """k x k deformable conv (no bias); offsets from a zero-initialised k x k conv of the input (with bias)."""

    features: int
    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        offsets = nn.Conv(2 * self.kernel_size ** 2, (self.kernel_size, self.kernel_size),
                          padding=symmetric_padding(self.kernel_size, self.dilation),
                          kernel_dilation=(self.dilation, self.dilation), dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="offsets")(x)
        kernel = self.param("kernel", conv_kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1],
                                                         self.features), jnp.float32)
        return deformable_conv2d(x, offsets, kernel.astype(self.dtype), dilation=self.dilation)


class DeformableConvBN(nn.Module):
    """Deformable conv + BN + ReLU; params ``{'conv': {'offsets', 'kernel'}, 'bn'}``."""

    features: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = DeformableConv(self.features, self.kernel_size, dtype=self.dtype, name="conv")(x)
        return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))
