"""Task decoders of the main network: Baseline heads, the shared ASPP of Context, and the U-shape decoder.

Each decoder returns the raw (pre-``to_task_output``) prediction of one task at its own resolution; the main
network upsamples it to the input size. Everything here is per task except the ASPP, which is shared.

* ``baseline``: a two-layer head (3x3 conv + BN + ReLU, 1x1 conv) on the last encoder feature (stride 8 by
  default), then bilinear upsampling to the input size.
* ``context``: a shared ASPP on the last encoder feature (DeepLabv3 rates, 12/24/36 at stride 8, or scaled to the
  feature map: ``model.aspp_rates``, see ``resolve_aspp_rates``; branch width ``head_channels``, output width that
  of the feature), then the Baseline heads.
* ``ushape``: per task a U-Net-style top-down path that upsamples 2x, concatenates the next shallower encoder
  stage and fuses them with a 3x3 conv + BN + ReLU (width halving at each step, ``head_channels`` at the
  shallowest sown stage), then the two-layer head.
* ``ocnet``: per task the base object-context head of Yuan & Wang 2018 (OCNet) on the last encoder feature
  (stride 8 by default, the paper's ResNet-50 setting of Table 3); see ``ObjectContextDecoder``.
* ``deeplab``: per task LibMTL's DeepLab head (its examples/nyu/aspp.py ``DeepLabHead``, torchvision's layout) on
  the last encoder feature (stride 8 by default): a full (not separable) ASPP with dropout, then 3x3 conv + BN +
  ReLU and a 1x1 classifier; see ``DeepLabDecoder``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError
from auxmtl_jax.models.layers import ConvBN, PredictionHead, SeparableConvBN, conv2d, resize_bilinear

Dtype = Any

DECODERS = ("baseline", "context", "ushape", "ocnet", "deeplab")
# The paper runs Baseline/Context at stride 8 ("8x bilinear upsampling"); a U-shape decoder wants the full pyramid.
# LibMTL's DeepLab heads read resnet_dilated(dilate_scale=8).
DEFAULT_OUTPUT_STRIDE = {"baseline": 8, "context": 8, "ushape": 32, "ocnet": 8, "deeplab": 8}
# Chosen so that MobileNetV2 (width 1.0) with segmentation (40 classes) + depth matches the paper's Table 1;
# OCNet's reduction width is 512 (its official code); LibMTL's ASPP and head are 256 wide (examples/nyu/aspp.py).
DEFAULT_HEAD_CHANNELS = {"baseline": 256, "context": 256, "ushape": 28, "ocnet": 512, "deeplab": 256}
# LibMTL's ASPP projection ends in nn.Dropout(0.5) (examples/nyu/aspp.py).
DEEPLAB_DROPOUT_RATE = 0.5
_DEEPLAB_RATES_AT_STRIDE_16 = (6, 12, 18)


# The decoders with an ASPP, whose rates `model.aspp_rates` sets.
ASPP_DECODERS = ("context", "deeplab")
ASPP_RATE_MODES = ("paper", "feature")
# The paper's crop (Sec. 4.1: 385x385); at stride 8 its feature map is 49x49, where 12/24/36 reach about 1/4, 1/2
# and 3/4 of the map.
PAPER_CROP_SIZE = 385


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLabv3's atrous rates, scaled to the output stride (6/12/18 at 16, 12/24/36 at 8, 3/6/9 at 32)."""
    return tuple(max(1, rate * 16 // output_stride) for rate in _DEEPLAB_RATES_AT_STRIDE_16)


def feature_aspp_rates(feature_size: tuple[int, int], output_stride: int) -> tuple[int, ...]:
    """The paper's rates scaled to a feature map: r_i' = max(1, round_half_up(r_i * min(H, W) / M)).

    r_i = ``aspp_rates(output_stride)`` and M = ceil(385 / output_stride), the paper crop's feature map (49 at
    stride 8), so each rate keeps the fraction of the map's shorter side it has at the paper's size, and the paper's
    size gives the paper's rates. Why: a 3x3 at dilation d on an n-cell axis ('same' zero padding) has an
    off-centre tap inside the map only if d < n; at d >= min(H, W) every off-centre tap of every output cell reads
    padding and the "atrous" branch is a 1x1 conv on its centre tap (12/24/36 on the 8x10 map of a 64x80 crop).
    Scaled, every rate is < min(H, W) for maps of 2 cells or more (the largest ratio r_i / M is 0.74); on maps of
    3 or fewer cells some rates coincide (ASPP then names the repeated branches apart).
    """
    shorter, reference = min(feature_size), -(-PAPER_CROP_SIZE // output_stride)
    return tuple(max(1, (2 * rate * shorter + reference) // (2 * reference)) for rate in aspp_rates(output_stride))


def check_aspp_rates(value: Any, what: str = "model.aspp_rates") -> str | tuple[int, ...]:
    """``value`` as 'paper', 'feature' or a tuple of positive integers; one UserError line naming ``what``
    otherwise (a list becomes a tuple)."""
    if isinstance(value, str) and value in ASPP_RATE_MODES:
        return value
    if (isinstance(value, (tuple, list)) and value
            and all(isinstance(rate, numbers.Integral) and not isinstance(rate, bool) and rate > 0 for rate in value)):
        return tuple(int(rate) for rate in value)
    raise UserError(f"{what}: got {value!r}; expected 'paper' (DeepLabv3's rates scaled to the output stride, "
                    "12/24/36 at 8), 'feature' (scaled to the training crop's feature map) or a non-empty tuple of "
                    "positive integers such as (2, 4, 6)")


def resolve_aspp_rates(value: Any, output_stride: int, input_size: tuple[int, int] | None) -> tuple[int, ...]:
    """The atrous rates of an ASPP for ``model.aspp_rates``: 'paper' -> ``aspp_rates(output_stride)``; 'feature' ->
    ``feature_aspp_rates`` of the feature map of the training crop ``input_size`` (ceil(size / stride), as the
    encoders' 'same' strides give); a tuple -> itself.

    Resolved once, when the model is built, not from the traced input: the rates are the static dilations of
    trained weights (and name the branches), so an evaluation on larger images must use the training crop's
    rates, not rates rescaled to its own feature map.
    """
    value = check_aspp_rates(value)
    if value == "paper":
        return aspp_rates(output_stride)
    if value == "feature":
        if input_size is None:
            raise UserError("model.aspp_rates='feature' scales the rates to the training crop's feature map, and "
                            "this model was built without it; expected build_model(..., input_size=crop_size)")
        return feature_aspp_rates(tuple(-(-int(size) // output_stride) for size in input_size), output_stride)
    return value


def atrous_branch_names(rates: tuple[int, ...]) -> tuple[str, ...]:
    """``branch_rate{r}`` per rate; a rate's second and later occurrences are ``branch_rate{r}_{k}`` (k = 2, ...)."""
    names = []
    for index, rate in enumerate(rates):
        repeat = rates[:index].count(rate)
        names.append(f"branch_rate{rate}" + (f"_{repeat + 1}" if repeat else ""))
    return tuple(names)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and image-pooling branches, then a 1x1 projection.

    Each branch is conv + BN + ReLU of width ``channels``; the image-pooling branch averages over the whole
    feature, applies its 1x1 conv + BN + ReLU and is broadcast back (a bilinear upsampling of a 1x1 map).

    Defaults are Context's ASPP: the atrous branches are depthwise-separable (as in DeepLabv3+) and the projection
    goes back to the input's width, so Context = Baseline heads on an ASPP-refined feature; both keep it near the
    paper's parameter count. ``separable=False``, ``project_channels=channels`` and ``dropout_rate=0.5`` give
    torchvision's / LibMTL's ``ASPP``: full 3x3 atrous convs, projection to ``channels``, then Dropout(0.5).

    Dropout runs only when ``train`` and the caller gave a ``'dropout'`` rng (the train step does); otherwise,
    and always at evaluation, it is the identity.
    """

    channels: int
    rates: tuple[int, ...]
    separable: bool = True
    project_channels: int | None = None  # None: the input's width
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        branches = [ConvBN(self.channels, 1, dtype=self.dtype, name="branch_1x1")(x, train)]
        for rate, name in zip(self.rates, atrous_branch_names(tuple(self.rates))):
            atrous = SeparableConvBN if self.separable else ConvBN
            branches.append(atrous(self.channels, 3, dilation=rate, dtype=self.dtype, name=name)(x, train))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBN(self.channels, 1, dtype=self.dtype, name="branch_pool")(pooled, train)
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.channels,)))
        width = x.shape[-1] if self.project_channels is None else self.project_channels
        x = ConvBN(width, 1, dtype=self.dtype, name="project")(jnp.concatenate(branches, -1), train)
        if self.dropout_rate:
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not (train and self.has_rng("dropout")))
        return x


class DeepLabDecoder(nn.Module):
    """LibMTL's ``DeepLabHead`` (examples/nyu/aspp.py, torchvision's DeepLabV3 head) for one task.

    ``ASPP`` with full 3x3 atrous convs at ``rates`` (12/24/36 at stride 8), 1x1 and image-pooling branches, all of
    width ``channels`` (256), a 1x1 conv + BN + ReLU projection of the five branches to ``channels`` and
    Dropout(``dropout_rate``); then a 3x3 conv + BN + ReLU (``channels``) and a 1x1 conv with bias to the task.
    Parameters: ``aspp`` (``branch_1x1``, ``branch_rate{r}``, ``branch_pool``, ``project``), ``hidden``,
    ``output``. Parameter count for a 2048-channel input at width 256: 16,125,440 + 257 x out_channels.
    """

    out_channels: int
    channels: int
    rates: tuple[int, ...] = (12, 24, 36)
    dropout_rate: float = DEEPLAB_DROPOUT_RATE
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array, train: bool) -> jax.Array:
        x = ASPP(self.channels, self.rates, separable=False, project_channels=self.channels,
                 dropout_rate=self.dropout_rate, dtype=self.dtype, name="aspp")(feature, train)
        x = ConvBN(self.channels, 3, dtype=self.dtype, name="hidden")(x, train)
        return conv2d(self.out_channels, 1, use_bias=True, dtype=self.dtype, name="output")(x)


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


def object_context_attention(query: jax.Array, key: jax.Array) -> jax.Array:
    """Scaled dot-product attention weights over positions: [B, N, C] x [B, N, C] -> [B, N, N], rows sum to 1."""
    scores = jnp.einsum("bqc,bkc->bqk", query.astype(jnp.float32), key.astype(jnp.float32))
    return jax.nn.softmax(scores * query.shape[-1] ** -0.5, axis=-1)


class ObjectContextDecoder(nn.Module):
    """OCNet's base object-context head (Yuan & Wang 2018) for one task.

    A 3x3 conv + BN + ReLU reduces the feature to ``channels``; a self-attention block computes each position's
    object context (query = key = one shared 1x1 conv + BN + ReLU to ``channels // 2``, values a 1x1 conv to
    ``channels // 2``, softmax of the scaled similarities over all positions, then a zero-initialised 1x1 conv back
    to ``channels``, so training starts from no context); the context is concatenated with the reduced feature,
    fused by a 1x1 conv + BN + ReLU to ``channels`` and mapped to the task by a 1x1 conv. Differences from the
    official code: ReLU instead of its in-place-ABN LeakyReLU(0.01), no Dropout2d(0.05) before the classifier, and
    no layer-3 auxiliary classifier (the paper's deep supervision is the `deep_supervision` strategy).
    Parameters: ``reduce``, ``query_key``, ``value``, ``context_out``, ``fuse``, ``output``.
    """

    out_channels: int
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(self.channels, 3, dtype=self.dtype, name="reduce")(feature, train)
        batch, height, width, _ = x.shape
        attention_channels = max(1, self.channels // 2)
        query_key = ConvBN(attention_channels, 1, dtype=self.dtype, name="query_key")(x, train)
        value = conv2d(attention_channels, 1, use_bias=True, dtype=self.dtype, name="value")(x)
        positions = query_key.reshape(batch, height * width, attention_channels)
        weights = object_context_attention(positions, positions)
        context = jnp.einsum("bqk,bkc->bqc", weights.astype(self.dtype),
                             value.reshape(batch, height * width, attention_channels))
        context = nn.Conv(self.channels, (1, 1), use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros, name="context_out")(
            context.reshape(batch, height, width, attention_channels))
        x = ConvBN(self.channels, 1, dtype=self.dtype, name="fuse")(jnp.concatenate([context, x], -1), train)
        return conv2d(self.out_channels, 1, use_bias=True, dtype=self.dtype, name="output")(x)
