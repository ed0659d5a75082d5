"""The paper's augmentation as pure numpy functions on one example (Sec. 4.1), keeping the batch contract: a
horizontal flip negates normal x, a rescale by s divides depth by s, padding is ignore (255) / invalid (0)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from auxmtl_jax.tasks import SEGMENTATION_IGNORE_LABEL as IGNORE_LABEL


def flip_horizontal(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirrors every array left-right; normals get their x component negated (zeros stay +0)."""
    flipped = {key: value[:, ::-1] for key, value in example.items()}
    if "normal" in flipped:
        normal = flipped["normal"].copy()
        normal[..., 0] = 0.0 - normal[..., 0]
        flipped["normal"] = normal
    return flipped


def resize_window(example: dict[str, np.ndarray], scale: float, top: int, left: int, out_size: tuple[int, int],
                  *, image_fill: Sequence[float], divide_depth: bool = True) -> dict[str, np.ndarray]:
    """Rescales `example` by `scale` and cuts the window at (top, left) of size `out_size` from the result.

    Only the window is resampled: bilinear for the image, nearest for the labels. The window may reach outside
    the rescaled image (negative top/left or past the end): the image is padded with `image_fill`, labels with
    ignore/invalid. Depth is divided by `scale` when `divide_depth` (a zoomed-in scene looks closer).
    Returns float32 image (0-255 scale), int32 segmentation, float32 depth and normals.
    """
    height, width = example["image"].shape[:2]
    scaled_height, scaled_width = max(1, round(height * scale)), max(1, round(width * scale))
    scale_y, scale_x = scaled_height / height, scaled_width / width
    out_height, out_width = out_size
    row_start, row_stop = max(top, 0), min(top + out_height, scaled_height)
    col_start, col_stop = max(left, 0), min(left + out_width, scaled_width)

    out = {"image": np.empty((out_height, out_width, 3), np.float32)}
    out["image"][:] = np.asarray(image_fill, np.float32)
    if "segmentation" in example:
        out["segmentation"] = np.full((out_height, out_width), IGNORE_LABEL, np.int32)
    if "depth" in example:
        out["depth"] = np.zeros((out_height, out_width, 1), np.float32)
    if "normal" in example:
        out["normal"] = np.zeros((out_height, out_width, 3), np.float32)
    if row_stop <= row_start or col_stop <= col_start:
        return out

    target = (slice(row_start - top, row_stop - top), slice(col_start - left, col_stop - left))
    if scale_y == 1.0 and scale_x == 1.0:
        rows, cols = slice(row_start, row_stop), slice(col_start, col_stop)
        out["image"][target] = example["image"][rows, cols]
        gather = lambda array: array[rows, cols]  # noqa: E731
    else:
        box = (col_start / scale_x, row_start / scale_y, col_stop / scale_x, row_stop / scale_y)
        resized = Image.fromarray(np.ascontiguousarray(example["image"])).resize(
            (col_stop - col_start, row_stop - row_start), Image.Resampling.BILINEAR, box=box)
        out["image"][target] = np.asarray(resized)
        source_rows = np.minimum(((np.arange(row_start, row_stop) + 0.5) / scale_y).astype(np.intp), height - 1)
        source_cols = np.minimum(((np.arange(col_start, col_stop) + 0.5) / scale_x).astype(np.intp), width - 1)
        gather = lambda array: np.take(np.take(array, source_rows, axis=0), source_cols, axis=1)  # noqa: E731
    if "segmentation" in example:
        out["segmentation"][target] = gather(example["segmentation"])
    if "depth" in example:
        depth = gather(example["depth"])
        out["depth"][target] = depth / np.float32(scale) if divide_depth else depth
    if "normal" in example:
        out["normal"][target] = gather(example["normal"])
    return out


def normalise_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image - mean) / std per channel, float32; `mean`/`std` on the 0-255 scale."""
    return ((image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def crop_offset(rng: np.random.Generator, scaled: int, crop: int) -> int:
    """Uniform window start: inside the image when it is larger, else a random placement of the padding."""
    low, high = min(0, scaled - crop), max(0, scaled - crop)
    return int(rng.integers(low, high + 1))
