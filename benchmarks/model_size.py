"""Model size at the paper's settings: `main` parameter counts next to the paper's Table 1, and the ResNet-50
decoders (Table 3's setting).

    python benchmarks/model_size.py

Parameter counts come from ``jax.eval_shape`` (nothing is compiled). Step time, FLOPs and startup of the paper
net are measured by ``benchmarks/train_step.py --config=configs/sunrgbd_three_task.py``.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from auxmtl_jax.models import DECODERS, build_model

# Liu et al., Table 1: MobileNetV2 (width 1.0), NYUv2 segmentation (40 classes) + depth.
PAPER_MAIN_PARAMETERS_MILLIONS = {"baseline": 3.31, "context": 3.98, "ushape": 4.19}
PAPER_TASKS = {"segmentation": 40, "depth": 1}


def model_config(decoder: str, encoder: str = "mobilenet_v2") -> SimpleNamespace:
    return SimpleNamespace(encoder=encoder, width_multiplier=1.0, output_stride=None, decoder=decoder,
                           head_channels=None, dtype="float32")


def parameter_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def main_parameters_millions(decoder: str, encoder: str = "mobilenet_v2") -> float:
    model = build_model(model_config(decoder, encoder), PAPER_TASKS)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return parameter_count(jax.eval_shape(model.init, jax.random.key(0), images)["params"]["main"]) / 1e6


def print_parameter_table() -> None:
    """`main` parameter counts per decoder next to the paper's Table 1, then the ResNet-50 setting of Table 3."""
    print("| decoder  | main params (ours) | paper (Table 1) | gap    |")
    print("|----------|--------------------|-----------------|--------|")
    for decoder, paper in PAPER_MAIN_PARAMETERS_MILLIONS.items():
        ours = main_parameters_millions(decoder)
        print(f"| {decoder:<8} | {ours:17.2f}M | {paper:14.2f}M | {100 * (ours - paper) / paper:+5.1f}% |")
    print("\nResNet-50 (the paper's Table 3 setting), segmentation 40 classes + depth:")
    print("| decoder  | main params (ours) |")
    print("|----------|--------------------|")
    for decoder in DECODERS:
        print(f"| {decoder:<8} | {main_parameters_millions(decoder, 'resnet50'):17.2f}M |")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print_parameter_table()


if __name__ == "__main__":
    main()
