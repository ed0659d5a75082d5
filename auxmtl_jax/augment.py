"""The paper's augmentation as pure numpy functions on one example (Sec. 4.1), keeping the batch contract: a
horizontal flip negates normal x, a rescale by s divides depth by s, padding is ignore (255) / invalid (0); the
train and eval transforms the input pipeline maps over stored records.

Images travel as uint8 (a quarter of float32's bytes) and are normalised on the device, inside the jitted step,
by `model_input`; `normalise_image` is the same arithmetic on the host in numpy.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auxmtl_jax.errors import UserError
from auxmtl_jax.tasks import SEGMENTATION_IGNORE_LABEL as IGNORE_LABEL

# ImageNet's per-channel mean and std on the 0-255 scale: the defaults of config.input.mean / config.input.std and
# what `model_input` normalises uint8 batches with.
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """0-255 values rounded (half to even) and clipped to uint8; uint8 input is returned as it is."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def flip_horizontal(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirrors every array left-right; normals get their x component negated (zeros stay +0)."""
    flipped = {key: value[:, ::-1] for key, value in example.items()}
    if "normal" in flipped:
        normal = flipped["normal"].copy()
        normal[..., 0] = 0.0 - normal[..., 0]
        flipped["normal"] = normal
    return flipped


def resize_window(example: dict[str, np.ndarray], scale: float, top: int, left: int, out_size: tuple[int, int],
                  *, image_fill: Sequence[float], divide_depth: bool = True,
                  image_dtype=np.float32) -> dict[str, np.ndarray]:
    """Rescales `example` by `scale` and cuts the window at (top, left) of size `out_size` from the result.

    Only the window is resampled: bilinear for the image, nearest for the labels. The window may reach outside
    the rescaled image (negative top/left or past the end): the image is padded with `image_fill`, labels with
    ignore/invalid. Depth is divided by `scale` when `divide_depth` (a zoomed-in scene looks closer).
    Returns the image as `image_dtype` on the 0-255 scale, int32 segmentation, float32 depth and normals. The
    resampled pixels are integers either way (Pillow resamples uint8 and rounds), so float32 and uint8 differ only
    in the padding: float32 holds `image_fill` exactly, uint8 holds it rounded and clipped (`to_uint8`). An input
    image that is not uint8 is rounded and clipped to uint8 first.
    """
    from PIL import Image  # imported here: the jitted steps import this module for `model_input` alone

    image_dtype = np.dtype(image_dtype)
    if image_dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"image_dtype={image_dtype}; expected uint8 or float32.")
    source = to_uint8(example["image"])
    height, width = source.shape[:2]
    scaled_height, scaled_width = max(1, round(height * scale)), max(1, round(width * scale))
    scale_y, scale_x = scaled_height / height, scaled_width / width
    out_height, out_width = out_size
    row_start, row_stop = max(top, 0), min(top + out_height, scaled_height)
    col_start, col_stop = max(left, 0), min(left + out_width, scaled_width)

    fill = np.asarray(image_fill, np.float32)
    out = {"image": np.empty((out_height, out_width, 3), image_dtype)}
    out["image"][:] = to_uint8(fill) if image_dtype == np.uint8 else fill
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
        out["image"][target] = source[rows, cols]
        gather = lambda array: array[rows, cols]  # noqa: E731
    else:
        box = (col_start / scale_x, row_start / scale_y, col_stop / scale_x, row_stop / scale_y)
        resized = Image.fromarray(np.ascontiguousarray(source)).resize(
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


def model_input(images: jax.Array, mean: Sequence[float] = IMAGE_MEAN,
                std: Sequence[float] = IMAGE_STD) -> jax.Array:
    """What the network sees: a uint8 batch [..., C] normalised to float32, (x - mean) / std per channel, bit for
    bit what `normalise_image` gives (each channel's 256 values are computed by `normalise_image` itself and looked
    up on the device: exact, and no slower than dividing, which XLA does not round correctly); a float batch
    (already normalised, e.g. from the functional API or `inference.Predictor.normalise`) passes through
    unchanged. The first operation of every jitted step.

    `mean`/`std` default to `IMAGE_MEAN`/`IMAGE_STD`; the input pipeline ships uint8 only when
    config.input.mean/std are these, and normalises on the host otherwise.
    """
    dtype = jnp.result_type(images)
    if jnp.issubdtype(dtype, jnp.floating):
        return images
    if dtype != jnp.uint8:
        raise UserError(f"images: dtype {dtype}; expected uint8 (0-255) or float images that are already "
                        "normalised.")
    channels = np.shape(images)[-1]
    table = normalise_image(np.arange(256, dtype=np.float32)[:, None], mean, std)
    table = np.ascontiguousarray(np.broadcast_to(table, (256, channels)))
    return jnp.asarray(table)[jnp.asarray(images).astype(jnp.int32), jnp.arange(channels)]


def crop_offset(rng: np.random.Generator, scaled: int, crop: int) -> int:
    """Uniform window start: inside the image when it is larger, else a random placement of the padding."""
    low, high = min(0, scaled - crop), max(0, scaled - crop)
    return int(rng.integers(low, high + 1))


# The per-record transforms the input pipeline maps (grain pickles them into its worker processes).


def _select(record: dict[str, Any], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """The image and the requested task arrays of a stored record."""
    example = {"image": record["image"]}
    for task in tasks:
        example[task] = record[task]
    return example


def ships_uint8(mean, std) -> bool:
    """Whether batches carry uint8 images (normalised on the device by `augment.model_input`): whenever the
    configured mean/std are the ones `model_input` applies; other values are normalised on the host (float32)."""
    return tuple(map(float, mean)) == IMAGE_MEAN and tuple(map(float, std)) == IMAGE_STD


class _ImageTransform:
    """The image half every transform shares: uint8 out (padding = the mean rounded), or normalised float32."""

    def __init__(self, tasks, mean, std):
        self.tasks = tuple(tasks)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.uint8 = ships_uint8(self.mean, self.std)
        self.image_dtype = np.uint8 if self.uint8 else np.float32

    def _finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.uint8:
            out["image"] = normalise_image(out["image"], self.mean, self.std)
        return out


class TrainTransform(_ImageTransform):
    """Random flip, random rescale, random crop (padding = ignore/invalid); paper Sec. 4.1. Images leave as uint8
    (see `ships_uint8`)."""

    def __init__(self, tasks, crop_size, scale_range, flip, mean, std):
        super().__init__(tasks, mean, std)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range, self.flip = (float(scale_range[0]), float(scale_range[1])), bool(flip)

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = _select(record, self.tasks)
        if self.flip and rng.random() < 0.5:
            example = flip_horizontal(example)
        scale = float(rng.uniform(*self.scale_range))
        height, width = example["image"].shape[:2]
        top = crop_offset(rng, max(1, round(height * scale)), self.crop_size[0])
        left = crop_offset(rng, max(1, round(width * scale)), self.crop_size[1])
        out = resize_window(example, scale, top, left, self.crop_size, image_fill=self.mean,
                            image_dtype=self.image_dtype)
        return self._finish(out)


class EvalTransform(_ImageTransform):
    """Whole image resized to fit `size` (aspect kept, centred, padding invalid); depth kept in metres."""

    def __init__(self, tasks, size, mean, std):
        super().__init__(tasks, mean, std)
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        example = _select(record, self.tasks)
        height, width = example["image"].shape[:2]
        scale = min(self.size[0] / height, self.size[1] / width)
        top = -((self.size[0] - max(1, round(height * scale))) // 2)
        left = -((self.size[1] - max(1, round(width * scale))) // 2)
        out = resize_window(example, scale, top, left, self.size, image_fill=self.mean, divide_depth=False,
                            image_dtype=self.image_dtype)
        return self._finish(out)

    def invalid_example(self) -> dict[str, np.ndarray]:
        """A padding example every metric ignores: image the mean (uint8: rounded; float: 0), segmentation 255,
        depth 0, normal 0."""
        height, width = self.size
        if self.uint8:
            example = {"image": np.broadcast_to(to_uint8(np.asarray(self.mean)), (height, width, 3)).copy()}
        else:
            example = {"image": np.zeros((height, width, 3), np.float32)}
        if "segmentation" in self.tasks:
            example["segmentation"] = np.full((height, width), IGNORE_LABEL, np.int32)
        if "depth" in self.tasks:
            example["depth"] = np.zeros((height, width, 1), np.float32)
        if "normal" in self.tasks:
            example["normal"] = np.zeros((height, width, 3), np.float32)
        return example
