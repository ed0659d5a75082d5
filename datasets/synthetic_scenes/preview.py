"""Renders a few synthetic scenes (image / segmentation / depth / normals) to a PNG for the docs.

    python -m auxmtl_datasets.synthetic_scenes.preview --out docs/synthetic_samples.png
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from auxmtl_datasets.synthetic_scenes import render  # noqa: E402


def colourise_segmentation(segmentation: np.ndarray) -> np.ndarray:
    """Class ids to RGB with a fixed palette; ignore (255) shown black."""
    palette = (plt.get_cmap("tab10")(np.arange(len(render.CLASS_NAMES)))[:, :3] * 255).astype(np.uint8)
    rgb = palette[np.minimum(segmentation, len(render.CLASS_NAMES) - 1)]
    rgb[segmentation == render.IGNORE_LABEL] = 0
    return rgb


def save_preview(path: str, num_examples: int, height: int, width: int, seed: int) -> None:
    """Writes a grid with one row per example: image, segmentation, depth (0 = invalid, black), normals."""
    figure, axes = plt.subplots(num_examples, 4, figsize=(8, 1.6 * num_examples * height / width + 0.3))
    for row in range(num_examples):
        example = render.render_example(seed, "train", row, height, width)
        depth = example["depth"][..., 0]
        panels = [example["image"], colourise_segmentation(example["segmentation"]),
                  np.ma.masked_equal(depth, 0.0), (example["normal"] + 1.0) / 2.0 * np.any(example["normal"], -1)[..., None]]
        for column, (panel, title) in enumerate(zip(panels, ("image", "segmentation", "depth (m)", "normal"))):
            axis = axes[row, column]
            axis.imshow(panel, cmap="magma_r" if column == 2 else None, interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
    figure.tight_layout(pad=0.3)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/synthetic_samples.png")
    parser.add_argument("--num_examples", type=int, default=4)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save_preview(args.out, args.num_examples, args.height, args.width, args.seed)


if __name__ == "__main__":
    main()
