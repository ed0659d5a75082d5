"""Task decoders of the main network: Baseline heads, the shared ASPP of Context, and the U-shape decoder.

Each decoder returns the raw (pre-``to_task_output``) prediction of one task at its own resolution; the main
network upsamples it to the input size. Everything here is per task except the ASPP, which is shared.

* ``baseline``: a two-layer head (3x3 conv + BN + ReLU, 1x1 conv) on the last encoder feature (stride 8 by
  default), then bilinear upsampling to the input size.
* ``context``: a shared ASPP on the last encoder feature (DeepLabv3 rates, 12/24/36 at stride 8; branch width
  ``head_channels``, output width that of the feature), then the Baseline heads.
* ``ushape``: per task a U-Net-style top-down path that upsamples 2x, concatenates the next shallower encoder
  stage and fuses them with a 3x3 conv + BN + ReLU (width halving at each step, ``head_channels`` at the
  shallowest sown stage), then the two-layer head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.models.layers import ConvBN, PredictionHead, SeparableConvBN, resize_bilinear

Dtype = Any

DECODERS = ("baseline", "context", "ushape")
# The paper runs Baseline/Context at stride 8 ("8x bilinear upsampling"); a U-shape decoder wants the full pyramid.
DEFAULT_OUTPUT_STRIDE = {"baseline": 8, "context": 8, "ushape": 32}
# Chosen so that MobileNetV2 (width 1.0) with segmentation (40 classes) + depth matches the paper's Table 1.
DEFAULT_HEAD_CHANNELS = {"baseline": 256, "context": 256, "ushape": 28}
_DEEPLAB_RATES_AT_STRIDE_16 = (6, 12, 18)


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLabv3's atrous rates, scaled to the output stride (6/12/18 at 16, 12/24/36 at 8, 3/6/9 at 32)."""
    return tuple(max(1, rate * 16 // output_stride) for rate in _DEEPLAB_RATES_AT_STRIDE_16)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three separable atrous 3x3 and image-pooling branches, then a 1x1 fuse.

    The atrous branches are depthwise-separable (as in DeepLabv3+) and the fuse projects back to the input's
    width, so Context = Baseline heads on an ASPP-refined feature; both keep it near the paper's parameter count.
    """

    channels: int
    rates: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        branches = [ConvBN(self.channels, 1, dtype=self.dtype, name="branch_1x1")(x, train)]
        for rate in self.rates:
            branches.append(SeparableConvBN(self.channels, 3, dilation=rate, dtype=self.dtype,
                                            name=f"branch_rate{rate}")(x, train))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBN(self.channels, 1, dtype=self.dtype, name="branch_pool")(pooled, train)
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.channels,)))
        return ConvBN(x.shape[-1], 1, dtype=self.dtype, name="project")(jnp.concatenate(branches, -1), train)


class UShapeDecoder(nn.Module):
    """U-Net-style top-down decoder for one task: upsample, concatenate the skip stage, fuse; then a task head.

    Like U-Net, the width halves at each step towards the input resolution and ends at ``channels`` at the
    shallowest stage (e.g. 8c, 4c, 2c, c for MobileNetV2's stage4..stage1), which keeps the high-resolution
    levels cheap. Parameters: ``fuse_{stage}`` per skip stage and ``head``.
    """

    out_channels: int
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, stages: Mapping[str, jax.Array], train: bool) -> jax.Array:
        names = list(stages)  # shallow to deep
        x = stages[names[-1]]
        skip_names = names[:-1]
        for level, name in enumerate(reversed(skip_names)):
            skip = stages[name]
            width = self.channels * 2 ** (len(skip_names) - 1 - level)
            x = resize_bilinear(x, skip.shape[1], skip.shape[2])
            x = ConvBN(width, 3, dtype=self.dtype, name=f"fuse_{name}")(
                jnp.concatenate([x, skip.astype(x.dtype)], -1), train)
        return PredictionHead(self.out_channels, self.channels, dtype=self.dtype, name="head")(x, train)
