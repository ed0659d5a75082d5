"""Encoders (MobileNetV2, ResNet-50, and ``plain_deep``, the plain positive control of ``plain_encoder``) that
return and sow their down-sampling stage outputs (ResNet-50 also sows each residual block's output as
``layer{l}_block{b}``, selectable as an aux input).

The encoders take float32 NHWC images and return ``{stage_name: feature}`` in shallow-to-deep order. When the
``intermediates`` collection is mutable they also sow each stage output under the same name (keep-last), which
is how the auxiliary modules and deep-supervision heads receive them during training.

Stage names are shared by the encoders: ``stageK`` has nominal stride 2**K. ``output_stride`` (8, 16 or 32)
replaces the strides of the later stages by dilation, so their effective stride is ``min(2**K, output_stride)``.

Stages (width multiplier 1.0; ``encoder_stages`` lists them for any setting without running the network):

| encoder      | stage  | nominal stride | channels | taken after                           |
|--------------|--------|----------------|----------|---------------------------------------|
| mobilenet_v2 | stage1 | 2              | 16       | block1  (torchvision ``features.1``)  |
| mobilenet_v2 | stage2 | 4              | 24       | block3  (``features.3``)              |
| mobilenet_v2 | stage3 | 8              | 32       | block6  (``features.6``)              |
| mobilenet_v2 | stage4 | 16             | 96       | block13 (``features.13``)             |
| mobilenet_v2 | stage5 | 32             | 320      | block17 (``features.17``)             |
| resnet50     | stage2 | 4              | 256      | layer1                                |
| resnet50     | stage3 | 8              | 512      | layer2                                |
| resnet50     | stage4 | 16             | 1024     | layer3                                |
| resnet50     | stage5 | 32             | 2048     | layer4                                |
| plain_deep   | stage1 | 2              | 16       | conv2                                 |
| plain_deep   | stage2 | 4              | 16       | conv5                                 |
| plain_deep   | stage3 | 8              | 24       | conv8                                 |
| plain_deep   | stage4 | 16             | 32       | conv11                                |
| plain_deep   | stage5 | 32             | 32       | conv14                                |

MobileNetV2 drops torchvision's final 1x1 conv to 1280 channels (``features.18``): it only serves the ImageNet
classifier, and without it the paper's parameter counts (Table 1) are matched. ResNet-50 has no stride-2 stage
output (its stem ends in a max-pool at stride 4).

Parameter trees (flax kernels are HWIO; a torchvision importer transposes OIHW -> HWIO and maps BN
``weight/bias/running_mean/running_var`` to ``scale/bias`` (params) and ``mean/var`` (batch_stats)):

* ``MobileNetV2``: ``stem/{conv,bn}`` = ``features.0``; ``block{i}`` = ``features.{i}`` for i = 1..17, each with
  ``expand/{conv,bn}`` (absent when the expansion ratio is 1, i.e. block1), ``depthwise/{conv,bn}`` and
  ``project/{conv,bn}`` (``conv.0``/``conv.1``/``conv.2``+``conv.3`` in torchvision order).
* ``ResNet50``: ``conv1``, ``bn1``, ``layer{l}_{b}`` = ``layer{l}.{b}`` with ``conv1..conv3``, ``bn1..bn3`` and
  on the first block of each layer ``downsample_conv``/``downsample_bn`` (``downsample.0``/``downsample.1``).
* ``PlainDeep``: ``conv{i}/{conv,bn}`` for i = 1..14 (no ImageNet counterpart).

Dilation follows torchvision's ResNet convention: the first block of a dilated stage keeps the previous dilation
(with stride 1) and the remaining blocks use the new one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError
from auxmtl_jax.models.layers import ConvBN, batch_norm, conv2d, relu6
from auxmtl_jax.models.plain_encoder import PlainDeep, plain_deep_stages
from auxmtl_jax.models.stages import DilationSchedule, StageSpec, make_divisible, sow_stage

Dtype = Any

ENCODERS = ("mobilenet_v2", "resnet50", "plain_deep")
OUTPUT_STRIDES = (8, 16, 32)


# torchvision's MobileNetV2 inverted residual setting: (expansion t, channels c, repeats n, first stride s).
_MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))
_MOBILENET_V2_STEM_CHANNELS = 32


@dataclasses.dataclass(frozen=True)
class InvertedResidualSpec:
    """Static layout of one MobileNetV2 block (``block{index}``)."""

    index: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int
    dilation: int
    residual: bool
    stage: str | None  # the stage name sown after this block, if any


def mobilenet_v2_blocks(width_multiplier: float, output_stride: int) -> tuple[InvertedResidualSpec, ...]:
    """The 17 inverted residual blocks for a width multiplier and output stride (torchvision channel rounding)."""
    schedule = DilationSchedule(output_stride, initial_stride=2)
    in_channels = make_divisible(_MOBILENET_V2_STEM_CHANNELS * width_multiplier)
    blocks = []
    for expand_ratio, channels, repeats, first_stride in _MOBILENET_V2_SETTING:
        out_channels = make_divisible(channels * width_multiplier)
        for repeat in range(repeats):
            nominal_stride = first_stride if repeat == 0 else 1
            stride, dilation = schedule.step(nominal_stride)
            blocks.append(InvertedResidualSpec(
                index=len(blocks) + 1, in_channels=in_channels, out_channels=out_channels,
                expand_ratio=expand_ratio, stride=stride, dilation=dilation,
                residual=nominal_stride == 1 and in_channels == out_channels, stage=None))
            in_channels = out_channels
    return _mark_stage_ends(blocks)


def _mark_stage_ends(blocks: list[InvertedResidualSpec]) -> tuple[InvertedResidualSpec, ...]:
    """Name the last block before each nominal stride change (and the last block) ``stage1``..``stage5``."""
    # Nominal strides come from the setting table, independent of dilation.
    nominal_strides = []
    stride = 2
    for _, _, repeats, first_stride in _MOBILENET_V2_SETTING:
        for repeat in range(repeats):
            stride *= first_stride if repeat == 0 else 1
            nominal_strides.append(stride)
    marked = []
    for position, block in enumerate(blocks):
        is_last = position == len(blocks) - 1
        if is_last or nominal_strides[position + 1] != nominal_strides[position]:
            block = dataclasses.replace(block, stage=f"stage{int(math.log2(nominal_strides[position]))}")
        marked.append(block)
    return tuple(marked)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, linear 1x1 projection, identity shortcut."""

    spec: InvertedResidualSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        hidden = int(round(spec.in_channels * spec.expand_ratio))
        y = x
        if spec.expand_ratio != 1:
            y = ConvBN(hidden, 1, activation=relu6, dtype=self.dtype, name="expand")(y, train)
        y = ConvBN(hidden, 3, stride=spec.stride, dilation=spec.dilation, groups=hidden, activation=relu6,
                   dtype=self.dtype, name="depthwise")(y, train)
        y = ConvBN(spec.out_channels, 1, activation=None, dtype=self.dtype, name="project")(y, train)
        return x + y if spec.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (torchvision layout, without the 1280-channel head conv)."""

    width_multiplier: float = 1.0
    output_stride: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        stem_channels = make_divisible(_MOBILENET_V2_STEM_CHANNELS * self.width_multiplier)
        x = ConvBN(stem_channels, 3, stride=2, activation=relu6, dtype=self.dtype, name="stem")(
            images.astype(self.dtype), train)
        stages = {}
        for spec in mobilenet_v2_blocks(self.width_multiplier, self.output_stride):
            x = InvertedResidual(spec, dtype=self.dtype, name=f"block{spec.index}")(x, train)
            if spec.stage is not None:
                sow_stage(self, spec.stage, x)
                stages[spec.stage] = x
        return stages


_RESNET50_DEPTHS = (3, 4, 6, 3)
_RESNET_BASE_WIDTHS = (64, 128, 256, 512)
_RESNET_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    """Static layout of one ResNet bottleneck block (``layer{layer}_{index}``)."""

    layer: int
    index: int
    width: int
    out_channels: int
    stride: int
    dilation: int
    downsample: bool


def resnet_stem_channels(width_multiplier: float) -> int:
    return make_divisible(64 * width_multiplier)


def resnet50_blocks(width_multiplier: float, output_stride: int) -> tuple[BottleneckSpec, ...]:
    """The 16 bottleneck blocks of ResNet-50 (v1.5: stride on the 3x3) for a width multiplier and output stride."""
    schedule = DilationSchedule(output_stride, initial_stride=4)
    in_channels = resnet_stem_channels(width_multiplier)
    blocks = []
    for layer, (depth, base_width) in enumerate(zip(_RESNET50_DEPTHS, _RESNET_BASE_WIDTHS), start=1):
        width = make_divisible(base_width * width_multiplier)
        out_channels = width * _RESNET_EXPANSION
        first_stride, first_dilation = schedule.step(1 if layer == 1 else 2)
        for index in range(depth):
            blocks.append(BottleneckSpec(
                layer=layer, index=index, width=width, out_channels=out_channels,
                stride=first_stride if index == 0 else 1,
                dilation=first_dilation if index == 0 else schedule.dilation,
                downsample=index == 0 and (first_stride != 1 or in_channels != out_channels)))
            in_channels = out_channels
    return tuple(blocks)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided, dilated), 1x1 expand, projection shortcut if needed."""

    spec: BottleneckSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        y = conv2d(spec.width, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv2d(spec.width, 3, stride=spec.stride, dilation=spec.dilation, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv2d(spec.out_channels, 1, dtype=self.dtype, name="conv3")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
        shortcut = x
        if spec.downsample:
            shortcut = conv2d(spec.out_channels, 1, stride=spec.stride, dtype=self.dtype, name="downsample_conv")(x)
            shortcut = batch_norm(train, dtype=self.dtype, name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor (torchvision layout, no classifier); ``width_multiplier`` scales all widths."""

    width_multiplier: float = 1.0
    output_stride: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        x = conv2d(resnet_stem_channels(self.width_multiplier), 7, stride=2, dtype=self.dtype, name="conv1")(
            images.astype(self.dtype))
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = {}
        blocks = resnet50_blocks(self.width_multiplier, self.output_stride)
        for position, spec in enumerate(blocks):
            x = Bottleneck(spec, dtype=self.dtype, name=f"layer{spec.layer}_{spec.index}")(x, train)
            sow_stage(self, resnet_block_feature(spec), x)  # each block's output is a selectable aux input too
            if position == len(blocks) - 1 or blocks[position + 1].layer != spec.layer:
                stage = f"stage{spec.layer + 1}"
                sow_stage(self, stage, x)
                stages[stage] = x
        return stages


def encoder_module(encoder: str, *, width_multiplier: float, output_stride: int, dtype: Dtype) -> nn.Module:
    """Instantiate an encoder by name (names are validated by ``build_model`` before this is called)."""
    cls = {"mobilenet_v2": MobileNetV2, "resnet50": ResNet50, "plain_deep": PlainDeep}[encoder]
    return cls(width_multiplier=width_multiplier, output_stride=output_stride, dtype=dtype, name="encoder")


def resnet_block_feature(block: BottleneckSpec) -> str:
    """The name a ResNet-50 block's output is sown under (its parameters are ``layer{l}_{b}``)."""
    return f"layer{block.layer}_block{block.index}"


def encoder_features(encoder: str, *, width_multiplier: float = 1.0, output_stride: int = 32) -> tuple[str, ...]:
    """Every feature an aux module may read (``aux.features``), shallow to deep: the stages and, for ResNet-50,
    each residual block's output (``layer{l}_block{b}`` = torchvision's ``layer{l}.{b}``; a stage is its layer's
    last block)."""
    stages = encoder_stages(encoder, width_multiplier=width_multiplier, output_stride=output_stride)
    if encoder != "resnet50":
        return tuple(stage.name for stage in stages)
    names = []
    blocks = resnet50_blocks(width_multiplier, output_stride)
    for position, block in enumerate(blocks):
        names.append(resnet_block_feature(block))
        if position == len(blocks) - 1 or blocks[position + 1].layer != block.layer:
            names.append(f"stage{block.layer + 1}")
    return tuple(names)


def encoder_stages(encoder: str, *, width_multiplier: float = 1.0, output_stride: int = 32) -> tuple[StageSpec, ...]:
    """The stages an encoder sows, with effective strides and channels, computed without running it."""
    if encoder not in ENCODERS:
        raise UserError(f"model.encoder: unknown encoder {encoder!r}; expected one of {ENCODERS}")
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f"model.output_stride: got {output_stride!r}; expected one of {OUTPUT_STRIDES}")
    if encoder == "plain_deep":
        return plain_deep_stages(width_multiplier, output_stride)
    if encoder == "mobilenet_v2":
        blocks = mobilenet_v2_blocks(width_multiplier, output_stride)
        return tuple(StageSpec(block.stage, min(2 ** int(block.stage[5:]), output_stride), block.out_channels)
                     for block in blocks if block.stage is not None)
    blocks = resnet50_blocks(width_multiplier, output_stride)
    last_per_layer = {block.layer: block for block in blocks}
    return tuple(StageSpec(f"stage{layer + 1}", min(2 ** (layer + 1), output_stride), block.out_channels)
                 for layer, block in sorted(last_per_layer.items()))
