"""Images of predictions (paper Fig. 6/7): class colours, depth colour maps, normals as RGB, the prediction grid,
and the figure writer every analysis figure goes through (temporary files, then a rename: no partial output)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from auxmtl_jax.errors import UserError
from auxmtl_jax.tasks import TASK_NAMES as TASK_ORDER


class AnalysisInputError(UserError):
    """An analysis input (workdir, file, key, array) is missing or not what the figure expects."""


def segmentation_palette(num_classes: int) -> np.ndarray:
    """A fixed, distinct RGB colour per class ([num_classes, 3] uint8), never pure black (black = ignore)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for class_index in range(num_classes):
        code, color = class_index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                color[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[class_index] = color
    return palette


def colorize_segmentation(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids [H,W] -> uint8 RGB with `segmentation_palette` colours; ignore / out-of-range labels black."""
    return _colorize_segmentation(labels, segmentation_palette(num_classes))


def colorize_depth(depth: np.ndarray, colormap: str = "magma") -> np.ndarray:
    """Depth [H,W] or [H,W,1] -> uint8 RGB through a matplotlib colour map, scaled to the 2nd-98th percentile."""
    depth = _squeeze_depth(depth[None])[0] if np.ndim(depth) == 3 else np.asarray(depth, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    low, high = np.percentile(depth[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    scaled = np.clip((depth - low) / max(high - low, 1e-6), 0.0, 1.0)
    rgb = colormaps[colormap](scaled)[..., :3]
    rgb[~valid] = 0.0
    return (255 * rgb).round().astype(np.uint8)


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """Unit normals [H,W,3] -> RGB floats in [0,1] via (n+1)/2; all-zero (invalid) normals black."""
    return _normals_to_rgb(normals)


def _colorize_segmentation(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """[H,W] labels -> [H,W,3] uint8; ignore (255) and any other out-of-range label black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(colors))
    image = np.zeros(labels.shape + (3,), dtype=np.uint8)
    image[valid] = colors[labels[valid]]
    return image


def _as_labels(segmentation: np.ndarray) -> np.ndarray:
    """Segmentation labels [N,H,W] from logits [N,H,W,C] or labels [N,H,W]."""
    segmentation = np.asarray(segmentation)
    return segmentation.argmax(-1) if segmentation.ndim == 4 else segmentation.astype(np.int64)


def _squeeze_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    return depth[..., 0] if depth.ndim == 4 else depth


def _normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """Unit normals [H,W,3] -> RGB in [0,1] via (n+1)/2; all-zero (invalid) normals black."""
    normals = np.asarray(normals, dtype=np.float64)
    rgb = np.clip((normals + 1.0) / 2.0, 0.0, 1.0)
    rgb[np.all(normals == 0, axis=-1)] = 0.0
    return rgb


def display_images(
    images: np.ndarray, denormalise: tuple[Sequence[float], Sequence[float]] | None = None
) -> np.ndarray:
    """uint8 [N,H,W,3] for display from uint8 images, or from normalised float images with `denormalise=(mean, std)`.

    `mean`/`std` are those the input pipeline normalised with (`config.input.mean/std`): pixel = x * std + mean,
    in 0–255 units, or in 0–1 units when every mean value is at most 1.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise AnalysisInputError(f"images: shape {images.shape}; expected [N,H,W,3]")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise AnalysisInputError(f"images: dtype {images.dtype}; expected uint8, or float with denormalise")
    if denormalise is None:
        raise AnalysisInputError(
            "images: float (normalised) images need denormalise=(mean, std), as the input pipeline used; "
            "or pass uint8 images"
        )
    mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in denormalise)
    if mean.shape not in ((1,), (3,)) or std.shape not in ((1,), (3,)) or np.any(std <= 0):
        raise AnalysisInputError(f"denormalise: got mean {mean} std {std}; expected 1 or 3 values, std > 0")
    scale = 255.0 if np.all(mean <= 1.0) else 1.0
    pixels = (images.astype(np.float64) * std + mean) * scale
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _check_batch(name: str, array, count: int, ndims: Sequence[int]) -> None:
    shape = np.shape(array)
    if len(shape) not in ndims or shape[0] != count:
        expected = " or ".join(map(str, ndims))
        raise AnalysisInputError(f"{name}: shape {shape}; expected {count} examples with {expected} dims")


_TASK_NDIMS = {"segmentation": (3, 4), "depth": (3, 4), "normal": (4,)}


def prediction_grid(
    images: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    *,
    num_classes: int,
    denormalise: tuple[Sequence[float], Sequence[float]] | None = None,
    class_colors: np.ndarray | None = None,
) -> Figure:
    """Fig. 6/7: one row per example; columns: input, then prediction and ground truth of each task.

    Segmentation (logits or labels) uses a fixed palette with ignore (255) black; depth a colormap shared by a
    row's prediction and ground truth, invalid (0) ground truth black; normals map (n+1)/2 to RGB, invalid black.
    Images are uint8, or normalised floats with `denormalise=(mean, std)` (see `display_images`).
    """
    pixels = display_images(images, denormalise)
    count = pixels.shape[0]
    known = [t for t in TASK_ORDER if t in predictions]
    unknown = sorted(set(predictions) - set(TASK_ORDER)) + sorted(set(targets) - set(predictions))
    if unknown or not known:
        raise AnalysisInputError(
            f"prediction tasks {sorted(predictions)}, target tasks {sorted(targets)}; expected predictions for "
            f"some of {list(TASK_ORDER)} and targets only for predicted tasks"
        )
    colors = segmentation_palette(num_classes) if class_colors is None else np.asarray(class_colors, np.uint8)
    if colors.ndim != 2 or colors.shape[1] != 3 or len(colors) < num_classes:
        raise AnalysisInputError(f"class_colors: shape {colors.shape}; expected [{num_classes}, 3] RGB")
    for task in known:
        _check_batch(f"predictions[{task!r}]", predictions[task], count, _TASK_NDIMS[task])
        if task in targets:
            _check_batch(f"targets[{task!r}]", targets[task], count, _TASK_NDIMS[task])
    if "segmentation" in known and np.ndim(predictions["segmentation"]) == 4:
        channels = np.shape(predictions["segmentation"])[-1]
        if channels != num_classes:
            raise AnalysisInputError(f"predictions['segmentation']: {channels} logit channels; expected "
                                     f"num_classes={num_classes}")

    columns = [("input", None, None, False)]
    for task in known:
        columns.append((f"{task} prediction", task, predictions[task], False))
        if task in targets:
            columns.append((f"{task} ground truth", task, targets[task], True))
    figure = Figure(figsize=(2.4 * len(columns), 2.0 * count + 0.4), layout="constrained")
    axes_grid = figure.subplots(count, len(columns), squeeze=False)
    depth_cmap = colormaps["plasma"].with_extremes(bad="black")
    for row in range(count):
        depth_range = _depth_range(predictions.get("depth"), targets.get("depth"), row)
        for column, (title, task, arrays, is_target) in enumerate(columns):
            axes = axes_grid[row, column]
            if task is None:
                axes.imshow(pixels[row])
            elif task == "segmentation":
                axes.imshow(_colorize_segmentation(_as_labels(arrays)[row], colors), interpolation="nearest")
            elif task == "depth":
                depth = _squeeze_depth(arrays)[row]
                shown = np.ma.masked_where(depth <= 0, depth) if is_target else depth
                axes.imshow(shown, cmap=depth_cmap, vmin=depth_range[0], vmax=depth_range[1])
            else:
                axes.imshow(_normals_to_rgb(np.asarray(arrays)[row]), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(title, fontsize=9)
    return figure


def _depth_range(prediction, target, row: int) -> tuple[float, float]:
    """(vmin, vmax) shared by a row's depth prediction and ground truth: valid ground truth, else prediction."""
    candidates = np.empty(0)
    if target is not None:
        values = _squeeze_depth(target)[row]
        candidates = values[values > 0]
    if candidates.size == 0 and prediction is not None:
        candidates = _squeeze_depth(prediction)[row].ravel()
    candidates = candidates[np.isfinite(candidates)]
    if candidates.size == 0:
        return 0.0, 1.0
    low, high = float(np.min(candidates)), float(np.max(candidates))
    return (low, high) if high > low else (low, low + 1e-6)


def write_prediction_grid(
    images: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    out_png: str | os.PathLike,
    *,
    num_classes: int,
    denormalise: tuple[Sequence[float], Sequence[float]] | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Draws `prediction_grid` (Fig. 6/7) into `out_png` (PNG only); returns `[out_png]`."""
    _check_png_path(out_png)
    figure = prediction_grid(images, predictions, targets, num_classes=num_classes, denormalise=denormalise)
    return save_figure(figure, out_png, dpi=dpi, svg=False)


def examples_grid(examples: Mapping[str, np.ndarray], denormalise) -> Figure:
    """`prediction_grid` from a flat {'image', '<task>', 'prediction/<task>'} mapping."""
    if "image" not in examples:
        raise AnalysisInputError(f"prediction_examples: keys {sorted(examples)}; expected 'image' and "
                                 "'prediction/<task>' (plus ground truth '<task>')")
    predictions = {k[len("prediction/"):]: v for k, v in examples.items() if k.startswith("prediction/")}
    targets = {k: v for k, v in examples.items() if k in predictions}
    if "segmentation" in predictions and np.ndim(predictions["segmentation"]) != 4:
        raise AnalysisInputError("prediction_examples['prediction/segmentation']: expected logits [N,H,W,C]")
    num_classes = int(np.shape(predictions["segmentation"])[-1]) if "segmentation" in predictions else 1
    return prediction_grid(examples["image"], predictions, targets, num_classes=num_classes, denormalise=denormalise)


def _check_png_path(out_png: str | os.PathLike) -> Path:
    png = Path(out_png)
    if png.suffix.lower() != ".png":
        raise AnalysisInputError(f"output {png}: expected a path ending in .png")
    return png


def save_figure(figure: Figure, out_png: str | os.PathLike, *, dpi: int = 100, svg: bool = True) -> list[Path]:
    """Writes `out_png` (and an SVG with the same stem when `svg`) through temporary files; returns the paths."""
    png = _check_png_path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    outputs = [(png, "png")] + ([(png.with_suffix(".svg"), "svg")] if svg else [])
    temporaries = []
    try:
        for path, file_format in outputs:
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            temporaries.append(temporary)
            figure.savefig(temporary, format=file_format, dpi=dpi)
        for (path, _), temporary in zip(outputs, temporaries):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.remove(temporary)
    return [path for path, _ in outputs]
