"""``plain_deep``: a plain deep encoder without skip connections, the benchmark's positive control (issue 30).

Why it exists: the benchmark's MobileNetV2 is residual and starts from a pre-trained encoder, which is not the
regime where extra supervision of intermediate layers is known to help. Deep supervision was proposed for deep
convolutional networks *without* shortcuts trained *from scratch*, to give their early layers a more direct
gradient than the top loss's, which weakens on its way down the chain (Lee et al. 2015, "Deeply-Supervised
Nets", AISTATS). This encoder is that regime: 14 plain 3x3 conv + BN + ReLU layers in a chain, each reading only
the previous one's output, trained from scratch. If not even deep supervision beats Joint with it (experiment
``positive_control``), the pipeline cannot detect an aux-module effect at that size. BatchNorm is kept (as in
every encoder and decoder here), which eases plain training, so this is a mild positive control, not the
hardest case.

Layout (width multiplier 1.0; channels scale like the other encoders', rounded to multiples of 8): five stages
of 3x3 conv + BN + ReLU layers ``conv1`` .. ``conv14``, the first layer of each stage at stride 2; each stage
is sown after its last layer, so aux modules, deep supervision and every decoder read it as they read the
other encoders' stages.

| stage  | nominal stride | channels | layers          |
|--------|----------------|----------|-----------------|
| stage1 | 2              | 16       | conv1, conv2    |
| stage2 | 4              | 16       | conv3 .. conv5  |
| stage3 | 8              | 24       | conv6 .. conv8  |
| stage4 | 16             | 32       | conv9 .. conv11 |
| stage5 | 32             | 32       | conv12 .. conv14|

``output_stride`` (8, 16 or 32) replaces a stage's first stride by dilation as ResNet-50's does (torchvision's
convention): that layer keeps the previous dilation at stride 1, the stage's other layers use the doubled one.
There is no ImageNet conversion (``pretrained``): it trains from scratch; a weight file as
``model.encoder_init`` stops with one error naming the encoders that have one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.models.layers import ConvBN
from auxmtl_jax.models.stages import DilationSchedule, StageSpec, make_divisible, sow_stage

Dtype = Any

# (channels at width 1.0, conv layers) of stage1 .. stage5; 14 layers in all.
PLAIN_DEEP_STAGES = ((16, 2), (16, 3), (24, 3), (32, 3), (32, 3))


@dataclasses.dataclass(frozen=True)
class PlainConvSpec:
    """Static layout of one layer (``conv{index}``): a 3x3 conv + BN + ReLU."""

    index: int
    out_channels: int
    stride: int
    dilation: int
    stage: str | None  # the stage name sown after this layer, if any


def plain_deep_layers(width_multiplier: float, output_stride: int) -> tuple[PlainConvSpec, ...]:
    """The 14 layers for a width multiplier and output stride."""
    schedule = DilationSchedule(output_stride, initial_stride=1)
    layers = []
    for number, (channels, depth) in enumerate(PLAIN_DEEP_STAGES, start=1):
        out_channels = make_divisible(channels * width_multiplier)
        first_stride, first_dilation = schedule.step(2)
        for position in range(depth):
            layers.append(PlainConvSpec(
                index=len(layers) + 1, out_channels=out_channels, stride=first_stride if position == 0 else 1,
                dilation=first_dilation if position == 0 else schedule.dilation,
                stage=f"stage{number}" if position == depth - 1 else None))
    return tuple(layers)


def plain_deep_stages(width_multiplier: float, output_stride: int) -> tuple[StageSpec, ...]:
    """The five sown stages with their effective strides and channels."""
    return tuple(StageSpec(layer.stage, min(2 ** int(layer.stage[5:]), output_stride), layer.out_channels)
                 for layer in plain_deep_layers(width_multiplier, output_stride) if layer.stage is not None)


class PlainDeep(nn.Module):
    """A chain of 3x3 conv + BN + ReLU layers without skip connections; returns and sows ``stage1`` .. ``stage5``."""

    width_multiplier: float = 1.0
    output_stride: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        x = images.astype(self.dtype)
        stages = {}
        for spec in plain_deep_layers(self.width_multiplier, self.output_stride):
            x = ConvBN(spec.out_channels, 3, stride=spec.stride, dilation=spec.dilation, dtype=self.dtype,
                       name=f"conv{spec.index}")(x, train)
            if spec.stage is not None:
                sow_stage(self, spec.stage, x)
                stages[spec.stage] = x
        return stages
