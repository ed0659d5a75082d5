"""A PyTorch twin of auxmtl_jax's multi-task network, losses and optimiser, to check our speed claims against PyTorch.

``build_twin(...)`` builds in PyTorch (NCHW) the network that ``auxmtl_jax.models.build_model`` builds in flax
(NHWC): the same layers (kernel sizes, strides, dilations, symmetric padding, bias or not, BatchNorm placement,
torchvision's channel rounding), the same parameter counts for ``main`` and ``aux`` and the same computation.
Module names mirror the flax parameter paths, e.g. ``main.encoder.block3.depthwise.conv.weight`` is
``params['main']['encoder']['block3']['depthwise']['conv']['kernel']``, so ``load_flax_variables`` copies our
weights in and both networks then give the same outputs up to float rounding (tests/test_torch_twin.py checks it).

The layout (blocks, strides, dilations, channel rounding, sown stages, ASPP rates) is read from
``auxmtl_jax.models``, so only the layers are written twice. Pieces:

* ``build_twin`` / ``build_twin_from_config``: ``MultiTaskTwin`` with ``.main`` (what inference runs) and
  ``.aux`` (``{task: AuxiliaryTwin}``, train-only); ``twin(images) -> (main_outputs, aux_outputs)``.
* ``main_parameter_count`` / ``aux_parameter_count``.
* ``task_loss`` / ``total_loss``: auxmtl_jax/tasks.py's losses with their validity masks.
* ``make_optimizer``, ``make_train_step`` (forward, losses, backward, SGD step) and ``make_inference`` (``main``
  only, eval mode, no grad), each optionally through ``torch.compile`` and bfloat16 autocast.

Not mirrored: deep-supervision heads (not needed for the Joint / Auxi comparison). Known differences that do not
change the cost of a step: torch's BatchNorm updates ``running_var`` with the unbiased batch variance (flax: the
biased one), and the learning rate is constant (ours decays it with a poly schedule). torch's BatchNorm also
refuses a training batch of one image at the ASPP's pooled (1x1) branch, where flax returns zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from auxmtl_jax.models import (AGGREGATES, DECODERS, DEFAULT_HEAD_CHANNELS, DEFAULT_OUTPUT_STRIDE, ENCODERS,
                               OPERATIONS, OUTPUT_STRIDES, RESOLUTIONS)
from auxmtl_jax.models.decoders import aspp_rates
from auxmtl_jax.models.encoders import (StageSpec, encoder_stages, mobilenet_v2_blocks, resnet50_blocks,
                                        resnet_stem_channels)
from auxmtl_jax.models.layers import FIXED_TASK_CHANNELS
from auxmtl_jax.tasks import TASK_NAMES
from auxmtl_jax.tasks import SEGMENTATION_IGNORE_LABEL

ADAPTORS = tuple(OPERATIONS)

BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # torch's convention; flax's momentum=0.9 is the same running average
NORMAL_OUTPUT_EPSILON = 1e-6  # layers.to_task_output floors the normal's length here
LOSS_NORM_FLOOR = 1e-12  # tasks.unit_vectors floors the squared length here
_DEEPLAB_RATES_AT_STRIDE_16 = (6, 12, 18)


# ---------------------------------------------------------------------------------------------------------------
# Layers (layers.py)

_ACTIVATIONS: dict[str | None, Callable[[], nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
           groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """Conv with symmetric padding ``dilation * (k - 1) // 2`` and Kaiming-normal (fan_out) weights, like ours."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=dilation * (kernel_size - 1) // 2, dilation=dilation, groups=groups, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM)


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + optional activation ('relu', 'relu6' or None)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, activation: str | None = "relu"):
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.bn = batch_norm(out_channels)
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn(self.conv(x)))


class SeparableConvBN(nn.Module):
    """Depthwise (dilated) conv + BN, then pointwise conv + BN + optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dilation: int = 1,
                 activation: str | None = "relu"):
        super().__init__()
        self.depthwise = ConvBN(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels,
                                activation=None)
        self.pointwise = ConvBN(in_channels, out_channels, 1, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class PredictionHead(nn.Module):
    """3x3 conv + BN + ReLU, then a 1x1 conv with bias to the task's channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.hidden = ConvBN(in_channels, hidden_channels, 3)
        self.output = conv2d(hidden_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))


def resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and no antialiasing (``jax.image.resize(..., antialias=False)``)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def to_task_output(task: str, raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float32 upsampling to the input size, then logits / softplus depth / unit-length normals."""
    x = resize_bilinear(raw.float(), height, width)
    if task == "depth":
        return F.softplus(x)
    if task == "normal":
        squared_norm = torch.sum(x * x, dim=1, keepdim=True)
        return x * torch.rsqrt(torch.clamp(squared_norm, min=NORMAL_OUTPUT_EPSILON ** 2))
    return x


# ---------------------------------------------------------------------------------------------------------------
# Encoders (encoders.py)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, linear 1x1 projection, identity shortcut."""

    def __init__(self, layout):  # an encoders.InvertedResidualSpec
        super().__init__()
        hidden = int(round(layout.in_channels * layout.expand_ratio))
        self.residual = layout.residual
        self.expand = ConvBN(layout.in_channels, hidden, 1, activation="relu6") if layout.expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride=layout.stride, dilation=layout.dilation, groups=hidden,
                                activation="relu6")
        self.project = ConvBN(hidden, layout.out_channels, 1, activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 without the 1280-channel head conv; returns ``{stage: feature}`` shallow to deep."""

    def __init__(self, width_multiplier: float, output_stride: int):
        super().__init__()
        layout = mobilenet_v2_blocks(width_multiplier, output_stride)
        self.stem = ConvBN(3, layout[0].in_channels, 3, stride=2, activation="relu6")
        self.block_names, self.stage_after = [], {}
        for block in layout:
            name = f"block{block.index}"
            self.add_module(name, InvertedResidual(block))
            self.block_names.append(name)
            if block.stage:
                self.stage_after[name] = block.stage

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return run_blocks(self, self.stem(images))


def run_blocks(encoder: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Runs ``encoder.block_names`` in order; returns ``{stage: output}`` after the blocks in ``stage_after``."""
    stages = {}
    for name in encoder.block_names:
        x = getattr(encoder, name)(x)
        if name in encoder.stage_after:
            stages[encoder.stage_after[name]] = x
    return stages


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided, dilated), 1x1 expand, projection shortcut if needed."""

    def __init__(self, layout, in_channels: int):  # an encoders.BottleneckSpec
        super().__init__()
        self.conv1 = conv2d(in_channels, layout.width, 1)
        self.bn1 = batch_norm(layout.width)
        self.conv2 = conv2d(layout.width, layout.width, 3, stride=layout.stride, dilation=layout.dilation)
        self.bn2 = batch_norm(layout.width)
        self.conv3 = conv2d(layout.width, layout.out_channels, 1)
        self.bn3 = batch_norm(layout.out_channels)
        self.has_downsample = layout.downsample
        if layout.downsample:
            self.downsample_conv = conv2d(in_channels, layout.out_channels, 1, stride=layout.stride)
            self.downsample_bn = batch_norm(layout.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = self.downsample_bn(self.downsample_conv(x)) if self.has_downsample else x
        return F.relu(y + shortcut)


class ResNet50Encoder(nn.Module):
    """ResNet-50 without classifier (all widths scaled); returns ``{stage: feature}`` for stage2..stage5."""

    def __init__(self, width_multiplier: float, output_stride: int):
        super().__init__()
        stem_channels = resnet_stem_channels(width_multiplier)
        self.conv1 = conv2d(3, stem_channels, 7, stride=2)
        self.bn1 = batch_norm(stem_channels)
        self.block_names, self.stage_after = [], {}
        layout = resnet50_blocks(width_multiplier, output_stride)
        in_channels = stem_channels
        for position, block in enumerate(layout):
            name = f"layer{block.layer}_{block.index}"
            self.add_module(name, Bottleneck(block, in_channels))
            in_channels = block.out_channels
            self.block_names.append(name)
            if position == len(layout) - 1 or layout[position + 1].layer != block.layer:
                self.stage_after[name] = f"stage{block.layer + 1}"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))
        return run_blocks(self, F.max_pool2d(x, 3, stride=2, padding=1))


def build_encoder(encoder: str, width_multiplier: float, output_stride: int) -> nn.Module:
    cls = {"mobilenet_v2": MobileNetV2Encoder, "resnet50": ResNet50Encoder}[encoder]
    return cls(width_multiplier, output_stride)


# ---------------------------------------------------------------------------------------------------------------
# Decoders (decoders.py)


class ASPP(nn.Module):
    """1x1, three separable atrous 3x3 and image-pooling branches (``channels`` wide), fused back to the input width."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]):
        super().__init__()
        self.rates = tuple(rates)
        self.branch_1x1 = ConvBN(in_channels, channels, 1)
        for rate in self.rates:
            self.add_module(f"branch_rate{rate}", SeparableConvBN(in_channels, channels, 3, dilation=rate))
        self.branch_pool = ConvBN(in_channels, channels, 1)
        self.project = ConvBN(channels * (len(self.rates) + 2), in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch_1x1(x)]
        branches += [getattr(self, f"branch_rate{rate}")(x) for rate in self.rates]
        pooled = x.float().mean(dim=(2, 3), keepdim=True).to(x.dtype)
        pooled = self.branch_pool(pooled)
        branches.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(branches, dim=1))


class UShapeDecoder(nn.Module):
    """Per task: upsample, concatenate the next shallower stage, fuse with 3x3 conv + BN + ReLU (width halving
    towards ``channels`` at the shallowest stage), then a prediction head."""

    def __init__(self, stages: Sequence[StageSpec], out_channels: int, channels: int):
        super().__init__()
        skips = list(stages[:-1])
        self.skip_names = [stage.name for stage in reversed(skips)]
        current = stages[-1].channels
        for level, skip in enumerate(reversed(skips)):
            width = channels * 2 ** (len(skips) - 1 - level)
            self.add_module(f"fuse_{skip.name}", ConvBN(current + skip.channels, width, 3))
            current = width
        self.head = PredictionHead(current, out_channels, channels)

    def forward(self, stages: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = stages[list(stages)[-1]]
        for name in self.skip_names:
            skip = stages[name]
            x = resize_bilinear(x, skip.shape[2], skip.shape[3])
            x = getattr(self, f"fuse_{name}")(torch.cat([x, skip.to(x.dtype)], dim=1))
        return self.head(x)


class MainTwin(nn.Module):
    """Shared encoder (+ ASPP for ``context``) and one decoder per task (``{task}_decoder``); outputs at input size."""

    def __init__(self, encoder: str, width_multiplier: float, output_stride: int, decoder: str,
                 tasks: Mapping[str, int], head_channels: int):
        super().__init__()
        self.tasks = dict(tasks)
        self.decoder = decoder
        self.stages = encoder_stages(encoder, width_multiplier=width_multiplier, output_stride=output_stride)
        self.encoder = build_encoder(encoder, width_multiplier, output_stride)
        deepest = self.stages[-1].channels
        if decoder == "context":
            self.aspp = ASPP(deepest, head_channels, aspp_rates(output_stride))
        for task, channels in self.tasks.items():
            if decoder == "ushape":
                module = UShapeDecoder(self.stages, channels, head_channels)
            else:
                module = PredictionHead(deepest, channels, head_channels)
            self.add_module(f"{task}_decoder", module)

    def forward_with_stages(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encoder stages (for the aux modules) and the main outputs."""
        height, width = images.shape[2], images.shape[3]
        stages = self.encoder(images)
        if self.decoder == "ushape":
            raw = {task: getattr(self, f"{task}_decoder")(stages) for task in self.tasks}
        else:
            shared = stages[list(stages)[-1]]
            if self.decoder == "context":
                shared = self.aspp(shared)
            raw = {task: getattr(self, f"{task}_decoder")(shared) for task in self.tasks}
        return stages, {task: to_task_output(task, raw[task], height, width) for task in self.tasks}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_with_stages(images)[1]


# ---------------------------------------------------------------------------------------------------------------
# Auxiliary modules (auxiliary.py)


def build_operation(operation: str, in_channels: int, channels: int) -> tuple[nn.Module, int]:
    """An adaptor from auxiliary.OPERATIONS and the channels it outputs."""
    if operation == "skip":
        return nn.Identity(), in_channels
    if operation in ("conv1x1", "conv3x3"):
        return ConvBN(in_channels, channels, int(operation[4])), channels
    dilation = {"sep_conv3x3": 1, "sep_conv3x3_dil3": 3, "sep_conv3x3_dil6": 6}[operation]
    return SeparableConvBN(in_channels, channels, 3, dilation=dilation), channels


def average_pool_same(x: torch.Tensor, factors: tuple[int, int]) -> torch.Tensor:
    """``nn.avg_pool(x, factors, strides=factors, padding='SAME', count_include_pad=False)`` of flax, in NCHW."""
    pads = []
    for size, factor in zip(x.shape[2:], factors):
        total = -(-size // factor) * factor - size
        pads.append((total // 2, total - total // 2))
    if pads[0][0] == 0 and pads[1][0] == 0:
        # All padding at the end: torch's ceil_mode windows average only the pixels inside, like 'SAME' here.
        return F.avg_pool2d(x, factors, stride=factors, ceil_mode=True, count_include_pad=False)
    padding = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])
    inside = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), padding)
    return F.avg_pool2d(F.pad(x, padding), factors, stride=factors) / F.avg_pool2d(inside, factors, stride=factors)


def downsample_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A finer feature brought down to (height, width): f x f average pool for an integer factor, else bilinear."""
    size = tuple(x.shape[2:])
    if size == (height, width):
        return x
    factors = (round(size[0] / height), round(size[1] / width))
    if min(factors) >= 1 and (-(-size[0] // factors[0]), -(-size[1] // factors[1])) == (height, width):
        return average_pool_same(x, factors)
    return resize_bilinear(x, height, width)


class AuxiliaryTwin(nn.Module):
    """Paper Eq. 2 for one task: ``adaptor_{stage}`` per selected stage, hierarchical aggregation, ``head``."""

    def __init__(self, task: str, out_channels: int, features: Sequence[StageSpec], adaptor: str, aggregate: str,
                 channels: int, resolution: str):
        super().__init__()
        self.task, self.aggregate, self.resolution = task, aggregate, resolution
        self.feature_names = [stage.name for stage in features]
        aggregated_channels = None
        for stage in features:
            module, adapted_channels = build_operation(adaptor, stage.channels, channels)
            self.add_module(f"adaptor_{stage.name}", module)
            if aggregated_channels is None:
                aggregated_channels = adapted_channels
            elif aggregate == "concat":
                aggregated_channels += adapted_channels
            elif aggregated_channels != adapted_channels:
                raise ValueError(f"sum aggregation needs equal channel counts, got {aggregated_channels} and "
                                 f"{adapted_channels}; use 'concat' or an adaptor that outputs the common width")
        self.head = PredictionHead(aggregated_channels, out_channels, channels)

    def forward(self, stages: Mapping[str, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        finest = (max(stages[name].shape[2] for name in self.feature_names),
                  max(stages[name].shape[3] for name in self.feature_names))
        aggregated = None
        for name in self.feature_names:
            adapted = getattr(self, f"adaptor_{name}")(stages[name])
            if self.resolution == "finest":
                adapted = resize_bilinear(adapted, *finest)
            elif aggregated is not None:
                aggregated = downsample_to(aggregated, adapted.shape[2], adapted.shape[3])
            if aggregated is None:
                aggregated = adapted
            elif self.aggregate == "concat":
                aggregated = torch.cat([aggregated, adapted], dim=1)
            else:
                aggregated = aggregated + adapted
        return to_task_output(self.task, self.head(aggregated), *output_size)


# ---------------------------------------------------------------------------------------------------------------
# The whole network


class MultiTaskTwin(nn.Module):
    """``main`` plus the train-only ``aux`` modules; ``forward(images) -> (main_outputs, aux_outputs)``."""

    def __init__(self, main: MainTwin, aux_modules: Mapping[str, AuxiliaryTwin]):
        super().__init__()
        self.main = main
        self.aux = nn.ModuleDict(dict(aux_modules))

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        stages, main_outputs = self.main.forward_with_stages(images)
        output_size = (images.shape[2], images.shape[3])
        aux_outputs = {task: module(stages, output_size) for task, module in self.aux.items()}
        return main_outputs, aux_outputs


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate(encoder: str, tasks: Mapping[str, int], aux_tasks: Sequence[str], output_stride: int,
              aux_adaptor: str, aux_aggregate: str, aux_resolution: str) -> None:
    _require(encoder in ENCODERS, f"encoder: unknown value {encoder!r}; expected one of {ENCODERS}")
    _require(output_stride in OUTPUT_STRIDES, f"output_stride: got {output_stride!r}; expected {OUTPUT_STRIDES}")
    _require(bool(tasks) and all(task in TASK_NAMES for task in tasks), f"tasks: expected some of {TASK_NAMES}")
    for task, channels in tasks.items():
        _require(FIXED_TASK_CHANNELS.get(task, channels) == channels,
                 f"tasks[{task!r}]: a {task} head has {FIXED_TASK_CHANNELS.get(task)} output channel(s)")
    _require(all(task in tasks for task in aux_tasks), f"aux_tasks: {tuple(aux_tasks)} must be among {tuple(tasks)}")
    _require(aux_adaptor in ADAPTORS, f"aux_adaptor: unknown value {aux_adaptor!r}; expected one of {ADAPTORS}")
    _require(aux_aggregate in AGGREGATES, f"aux_aggregate: unknown {aux_aggregate!r}; expected one of {AGGREGATES}")
    _require(aux_resolution in RESOLUTIONS, f"aux_resolution: unknown {aux_resolution!r}; expected {RESOLUTIONS}")


def build_twin(encoder: str, decoder: str, width_multiplier: float, tasks: Mapping[str, int],
               aux_tasks: Sequence[str] = (), aux_channels: int = 64, head_channels: int | None = None,
               output_stride: int | None = None, aux_features: Sequence[str] = (), aux_adaptor: str = "conv1x1",
               aux_aggregate: str = "concat", aux_resolution: str = "hierarchy") -> MultiTaskTwin:
    """The PyTorch twin of ``build_model(model_cfg, tasks, aux_cfg)`` (arguments named like the config fields).

    ``tasks`` maps task -> output channels in output order; ``aux_tasks`` get one aux module each (Auxi-all: all
    tasks; Joint: none). ``head_channels`` / ``output_stride`` default to the decoder's, like ours.
    """
    _require(decoder in DECODERS, f"decoder: unknown value {decoder!r}; expected one of {DECODERS}")
    output_stride = DEFAULT_OUTPUT_STRIDE[decoder] if output_stride is None else output_stride
    _validate(encoder, tasks, aux_tasks, output_stride, aux_adaptor, aux_aggregate, aux_resolution)
    head_channels = DEFAULT_HEAD_CHANNELS[decoder] if head_channels is None else head_channels
    main = MainTwin(encoder, float(width_multiplier), output_stride, decoder, tasks, head_channels)
    known = {stage.name: stage for stage in main.stages}
    unknown = [name for name in aux_features if name not in known]
    _require(not unknown, f"aux_features: {unknown} not returned by this encoder; it returns {tuple(known)}")
    features = [stage for stage in main.stages if stage.name in aux_features] if aux_features else list(main.stages)
    aux_modules = {task: AuxiliaryTwin(task, channels, features, aux_adaptor, aux_aggregate, aux_channels,
                                       aux_resolution)
                   for task, channels in tasks.items() if task in aux_tasks}
    return MultiTaskTwin(main, aux_modules)


def build_twin_from_config(config: Any, task_channels: Mapping[str, int]) -> MultiTaskTwin:
    """``build_twin`` from one of our configs (``config.model.*`` and ``config.aux.*``)."""
    model, aux = config.model, config.aux
    return build_twin(model.encoder, model.decoder, model.width_multiplier, task_channels,
                      aux_tasks=tuple(aux.tasks), aux_channels=aux.channels, head_channels=model.head_channels,
                      output_stride=model.output_stride, aux_features=tuple(aux.features or ()),
                      aux_adaptor=aux.adaptor, aux_aggregate=aux.aggregate,
                      aux_resolution=getattr(aux, "resolution", "hierarchy"))


def main_parameter_count(twin: MultiTaskTwin) -> int:
    """Parameters inference needs (ours: ``params['main']``); BatchNorm statistics are buffers, not counted."""
    return sum(parameter.numel() for parameter in twin.main.parameters())


def aux_parameter_count(twin: MultiTaskTwin) -> int:
    """Parameters of the train-only aux modules (ours: ``params['aux']``)."""
    return sum(parameter.numel() for parameter in twin.aux.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Our weights into the twin


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def load_flax_variables(twin: MultiTaskTwin, variables: Mapping[str, Any]) -> None:
    """Copies our ``{'params': {'main', 'aux'}, 'batch_stats': ...}`` into the twin (HWIO kernels -> OIHW).

    Every parameter and BatchNorm statistic of the twin must be covered, and every array of ours used.
    """
    state = twin.state_dict()
    assigned = set()
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(collection, {})).items():
            name = ".".join(path[:-1] + (_LEAF_NAMES[(collection, path[-1])],))
            array = np.asarray(value, dtype=np.float32)
            if array.ndim == 4:
                array = array.transpose(3, 2, 0, 1)
            if name not in state or tuple(state[name].shape) != array.shape:
                raise ValueError(f"{collection}/{'/'.join(path)} {array.shape} has no twin "
                                 f"(twin: {tuple(state[name].shape) if name in state else 'missing'})")
            state[name] = torch.from_numpy(array.copy())
            assigned.add(name)
    missing = [name for name in state if name not in assigned and not name.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"the twin has arrays our variables lack: {missing[:5]}")
    twin.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Losses (tasks.py), optimiser and step functions


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries; 0 with a zero gradient when none is valid."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / torch.clamp(valid.float().sum(), min=1.0)


def unit_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Normalised along channels (dim 1); zero vectors stay zero."""
    return vectors * torch.rsqrt(torch.clamp(torch.sum(vectors * vectors, dim=1, keepdim=True), min=LOSS_NORM_FLOOR))


def task_loss(task: str, prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Float32 loss of one task over its valid pixels (labels NCHW; segmentation labels [B, H, W] class ids).

    segmentation: cross entropy, ids outside [0, classes) (e.g. 255) ignored; depth: L1 where depth > 0;
    normal: 1 - cosine where the label is not all-zero.
    """
    prediction = prediction.float()
    if task == "segmentation":
        valid = (label >= 0) & (label < prediction.shape[1])
        safe_label = torch.where(valid, label, torch.zeros_like(label)).long()
        label_logit = torch.gather(prediction, 1, safe_label[:, None])[:, 0]
        return masked_mean(torch.logsumexp(prediction, dim=1) - label_logit, valid)
    label = label.float()
    if task == "depth":
        return masked_mean(torch.abs(prediction - label)[:, 0], label[:, 0] > 0)
    cosine = torch.sum(unit_vectors(prediction) * unit_vectors(label), dim=1)
    return masked_mean(1.0 - cosine, torch.any(label != 0, dim=1))


def total_loss(main_outputs: Mapping[str, torch.Tensor], aux_outputs: Mapping[str, torch.Tensor],
               labels: Mapping[str, torch.Tensor], aux_weight: float = 1.0) -> torch.Tensor:
    """Joint / Auxi objective with equal weighting: sum of main losses + ``aux_weight`` * sum of aux losses."""
    total = sum(task_loss(task, prediction, labels[task]) for task, prediction in main_outputs.items())
    for task, prediction in aux_outputs.items():
        total = total + aux_weight * task_loss(task, prediction, labels[task])
    return total


def make_optimizer(twin: nn.Module, learning_rate: float = 0.01, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    """Ours: ``add_decayed_weights(1e-4)`` then ``sgd(momentum=0.9)`` on every weight, which is torch's SGD."""
    return torch.optim.SGD(twin.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bfloat16 compute with float32 parameters (ours: ``model.dtype='bfloat16'``); a no-op for float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def maybe_compile(function: Callable, compile: bool | str) -> Callable:
    """``function`` itself, or through ``torch.compile`` (``compile`` True: the default mode; a string: that mode)."""
    if compile is False or compile is None:
        return function
    return torch.compile(function) if compile is True else torch.compile(function, mode=compile)


def make_train_step(twin: MultiTaskTwin, optimizer: torch.optim.Optimizer, *, aux_weight: float = 1.0,
                    compute_dtype: torch.dtype | None = None, compile: bool | str = False,
                    ) -> Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]:
    """``step(images, labels) -> loss``: forward (main + aux), losses, backward and an SGD step.

    With ``compile`` (True or a mode name), forward and losses go through ``torch.compile`` (backward too, via
    AOTAutograd); the optimiser step stays eager.
    """
    twin.train()

    def forward_loss(images: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with autocast(images.device.type, compute_dtype):
            main_outputs, aux_outputs = twin(images)
        return total_loss(main_outputs, aux_outputs, labels, aux_weight)

    loss_fn = maybe_compile(forward_loss, compile)

    def step(images: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_inference(twin: MultiTaskTwin, *, compute_dtype: torch.dtype | None = None,
                   compile: bool | str = False) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``predict(images) -> {task: output}`` from ``main`` alone, in eval mode and without gradients."""
    main = twin.main.eval()

    def forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(images.device.type, compute_dtype):
            return main(images)

    forward_fn = maybe_compile(forward, compile)

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return forward_fn(images)

    return predict
