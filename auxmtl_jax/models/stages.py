"""What every encoder shares about its stages: ``StageSpec``, sowing a stage output (``sow_stage``), torchvision's
channel rounding (``make_divisible``) and the dilation schedule that caps the output stride.

Kept apart from ``encoders`` so that an encoder in its own module (``plain_encoder``) can use them while
``encoders`` registers it, without an import circle.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax


class StageSpec(NamedTuple):
    """One sown encoder stage: its name, effective stride (after dilation) and channel count."""

    name: str
    stride: int
    channels: int


def keep_last(_previous: Any, value: Any) -> Any:
    """``sow`` reducer that stores only the latest value (instead of flax's default tuple)."""
    return value


def _nothing() -> None:
    return None


def sow_stage(module: nn.Module, name: str, value: jax.Array) -> None:
    """Sow one stage output into ``intermediates`` with keep-last semantics (a no-op when not mutable)."""
    module.sow("intermediates", name, value, reduce_fn=keep_last, init_fn=_nothing)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` the way torchvision does (never below 90% of it)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class DilationSchedule:
    """Turns nominal strides into (stride, dilation) pairs so the effective stride never exceeds ``output_stride``.

    torchvision's convention: the layer that would exceed it runs at stride 1 with the previous dilation, and the
    layers after it use the new (doubled) dilation, ``self.dilation``.
    """

    def __init__(self, output_stride: int, initial_stride: int):
        self.output_stride = output_stride
        self.nominal_stride = initial_stride
        self.dilation = 1

    def step(self, stride: int) -> tuple[int, int]:
        """Account for one layer of nominal ``stride``; return the (stride, dilation) it should use."""
        self.nominal_stride *= stride
        if stride > 1 and self.nominal_stride > self.output_stride:
            previous = self.dilation
            self.dilation *= stride
            return 1, previous
        return stride, self.dilation

    def effective_stride(self) -> int:
        return min(self.nominal_stride, self.output_stride)
