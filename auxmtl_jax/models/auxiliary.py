"""Train-only modules that read the sown encoder stages: auxiliary modules (paper Eq. 2) and deep supervision.

An auxiliary module for task t applies an adaptor D_p to each selected stage O_p and aggregates along the
hierarchy, h_p = h_{p-1} ⊙ D_p(O_p), then predicts task t with a small head. Where the aggregation happens is
``resolution``:

* ``hierarchy`` (default): h_{p-1} is average-pooled down to O_p's resolution before ⊙, so every step works at
  its own stage's resolution and the head runs at the deepest selected stage: a cheap column parallel to the
  encoder (paper Fig. 1b), about 3% of the main network's training FLOPs.
* ``finest``: every D_p(O_p) is upsampled to the finest selected stage and aggregated and predicted there (the
  head's 3x3 conv then runs at stride 2 on all stages' channels: 1.6-2.4x the main network's training FLOPs).

``min_head_size`` (``aux.min_head_size``, cells; 0 = off) keeps ``hierarchy``'s head off maps that are too small
(at a 64x80 crop the stride-32 stage is 2x3 cells, where a 3x3 head sees mostly padding): the aggregation follows
the hierarchy down to the deepest selected stage whose map has at least ``min_head_size`` cells on its shorter
side, the *floor* (the finest selected stage when none has), and the adapted deeper stages are upsampled to the
floor and aggregated there, as ``finest`` does at the finest stage; the head predicts at the floor. At the paper's
crop (385: 13x13 at stride 32) a minimum of 8 changes nothing; above every selected map it is ``finest``.

Adaptors and aggregators come from two registries (``OPERATIONS``, ``AGGREGATES``) so that a searched NAS
genotype can build its cells from the same pieces:

| operation          | what it is                                            |
|--------------------|-------------------------------------------------------|
| ``conv1x1``        | 1x1 conv + BN + ReLU (the paper's basic adaptor)      |
| ``conv3x3``        | 3x3 conv + BN + ReLU                                  |
| ``sep_conv3x3``    | depthwise 3x3 + BN, pointwise 1x1 + BN + ReLU         |
| ``sep_conv3x3_dil3`` / ``sep_conv3x3_dil6`` | the same with dilation 3 / 6 |
| ``skip``           | identity (keeps the input's channels)                 |
| ``deform_conv3x3`` | deformable 3x3 conv (``deformable.py``) + BN + ReLU   |

Aggregators: ``sum`` (needs equal channels) and ``concat``. The searchable cells built from these operations are
in ``cells.py``. Everything here lives outside ``main``, so dropping it leaves inference unchanged.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError
from auxmtl_jax.models.deformable import DeformableConvBN
from auxmtl_jax.models.layers import ConvBN, PredictionHead, SeparableConvBN, resize_bilinear, to_task_output

Dtype = Any
OperationFactory = Callable[[int, Dtype, str], nn.Module]


class Identity(nn.Module):
    """The ``skip`` operation: returns its input (no parameters)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return x


def _conv_bn(kernel_size: int) -> OperationFactory:
    return lambda channels, dtype, name: ConvBN(channels, kernel_size, dtype=dtype, name=name)


def _separable(dilation: int) -> OperationFactory:
    return lambda channels, dtype, name: SeparableConvBN(channels, 3, dilation=dilation, dtype=dtype, name=name)


OPERATIONS: dict[str, OperationFactory] = {
    "conv1x1": _conv_bn(1),
    "conv3x3": _conv_bn(3),
    "sep_conv3x3": _separable(1),
    "sep_conv3x3_dil3": _separable(3),
    "sep_conv3x3_dil6": _separable(6),
    "skip": lambda channels, dtype, name: Identity(name=name),
    "deform_conv3x3": lambda channels, dtype, name: DeformableConvBN(channels, 3, dtype=dtype, name=name),
}
# The adaptors a config may choose for Eq. 2 (paper Table 2); the rest of OPERATIONS is for NAS cells.
ADAPTORS = ("conv1x1", "conv3x3")


def sum_aggregate(accumulated: jax.Array, new: jax.Array) -> jax.Array:
    """Element-wise sum of two same-shape features."""
    if accumulated.shape[-1] != new.shape[-1]:
        raise ValueError(f"sum aggregation needs equal channel counts, got {accumulated.shape[-1]} and "
                         f"{new.shape[-1]}; use 'concat' or an adaptor that outputs the common width")
    return accumulated + new


def concat_aggregate(accumulated: jax.Array, new: jax.Array) -> jax.Array:
    """Channel concatenation of two features of the same spatial size."""
    return jnp.concatenate([accumulated, new], axis=-1)


AGGREGATES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "sum": sum_aggregate,
    "concat": concat_aggregate,
}
RESOLUTIONS = ("hierarchy", "finest")


def check_min_head_size(value: Any, what: str = "aux.min_head_size") -> int:
    """``value`` as a cell count >= 0; one UserError line naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UserError(f"{what}: got {value!r}; expected 0 (off: the head at the deepest selected stage) or a "
                        "number of cells, e.g. 8, that the aux head's map keeps on its shorter side")
    return int(value)


def downsample_to(x: jax.Array, height: int, width: int) -> jax.Array:
    """Brings a finer NHWC feature down to (height, width) the way the encoder's strides do.

    An integer factor f with ceil(size / f) == target (what stride-f 'same' convolutions give) is an f x f
    average pool (border windows average only the pixels inside); any other ratio falls back to bilinear.
    """
    if x.shape[1:3] == (height, width):
        return x
    factors = (round(x.shape[1] / height), round(x.shape[2] / width))
    if min(factors) >= 1 and (-(-x.shape[1] // factors[0]), -(-x.shape[2] // factors[1])) == (height, width):
        return nn.avg_pool(x, factors, strides=factors, padding="SAME", count_include_pad=False)
    return resize_bilinear(x, height, width)


class AuxiliaryModule(nn.Module):
    """Paper Eq. 2 for one task: adaptors on the selected stages, hierarchical aggregation, task head.

    ``features`` are stage names, aggregated in the given (shallow-to-deep) order, at each stage's resolution
    (``resolution='hierarchy'``) or all at the finest one (``'finest'``). With ``'hierarchy'`` and
    ``min_head_size`` > 0, stages whose map is smaller than the floor (see ``head_size``) are upsampled to it, so
    the head never predicts from fewer cells than that (``'finest'`` ignores it). Parameters: ``adaptor_{stage}``
    per stage and ``head``; they depend on neither ``resolution`` nor ``min_head_size``.
    """

    task: str
    out_channels: int
    features: tuple[str, ...]
    adaptor: str = "conv1x1"
    aggregate: str = "concat"
    channels: int = 64
    resolution: str = "hierarchy"
    min_head_size: int = 0
    dtype: Dtype = jnp.float32

    def head_size(self, stages: Mapping[str, jax.Array]) -> tuple[int, int]:
        """(H, W) of the map the head predicts from: the finest selected stage's for ``'finest'``; for
        ``'hierarchy'`` the deepest selected stage's (``min_head_size`` 0) or the floor's: the deepest selected
        stage with min(H, W) >= ``min_head_size``, else the finest selected stage."""
        sizes = [tuple(stages[name].shape[1:3]) for name in self.features]
        finest = max(sizes, key=lambda size: size[0] * size[1])
        if self.resolution == "finest":
            return finest
        large = [size for size in sizes if min(size) >= self.min_head_size]
        return min(large, key=lambda size: size[0] * size[1]) if large else finest

    @nn.compact
    def __call__(self, stages: Mapping[str, jax.Array], output_size: tuple[int, int], train: bool) -> jax.Array:
        finest = (max(stages[name].shape[1] for name in self.features),
                  max(stages[name].shape[2] for name in self.features))
        floor = self.head_size(stages)
        make_adaptor, combine = OPERATIONS[self.adaptor], AGGREGATES[self.aggregate]
        aggregated = None
        for name in self.features:
            adapted = make_adaptor(self.channels, self.dtype, f"adaptor_{name}")(stages[name].astype(self.dtype),
                                                                               train)
            if self.resolution == "finest":
                adapted = resize_bilinear(adapted, *finest)
            else:
                if adapted.shape[1] * adapted.shape[2] < floor[0] * floor[1]:  # below the floor: up to it
                    adapted = resize_bilinear(adapted, *floor)
                if aggregated is not None:
                    aggregated = downsample_to(aggregated, *adapted.shape[1:3])
            aggregated = adapted if aggregated is None else combine(aggregated, adapted)
        raw = PredictionHead(self.out_channels, self.channels, dtype=self.dtype, name="head")(aggregated, train)
        return to_task_output(self.task, raw, *output_size)


class DeepSupervisionHeads(nn.Module):
    """One light two-layer head per encoder stage for one task (the paper's DS baseline); ``head_{stage}``."""

    task: str
    out_channels: int
    stages: tuple[str, ...]
    hidden_channels: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, stages: Mapping[str, jax.Array], output_size: tuple[int, int],
                 train: bool) -> list[jax.Array]:
        predictions = []
        for name in self.stages:
            raw = PredictionHead(self.out_channels, self.hidden_channels, dtype=self.dtype, name=f"head_{name}")(
                stages[name].astype(self.dtype), train)
            predictions.append(to_task_output(self.task, raw, *output_size))
        return predictions
