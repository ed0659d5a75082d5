"""Result figures: shared-layer gradient curves (paper Fig. 5), strategy scatter (Fig. 3), prediction grids (Fig. 6/7).

Figures are built on `matplotlib.figure.Figure` directly (Agg rendering, no pyplot state, no display needed).
Inputs are the files a training workdir holds: `metrics.jsonl` (one JSON object per line) and `results.json`.
Every figure is fully built (and its inputs checked) before anything is written, and files are written through
temporary names, so a bad input leaves no partial output behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from auxmtl_jax.analysis.gradients import LOG_PREFIXES, depth_order_key
from auxmtl_jax.errors import UserError
from auxmtl_jax.metrics import HIGHER_IS_BETTER
from auxmtl_jax.workdir import METRICS_FILE, RESULTS_FILE

GRADIENT_COMPONENTS = LOG_PREFIXES
TASK_ORDER = ("segmentation", "depth", "normal")
HEADLINE_METRICS = {"segmentation": "miou", "depth": "abs_err", "normal": "mean"}
FIG5_NAME = "fig5_gradients.png"
FIG3_NAME = "fig3_strategies.png"
PREDICTIONS_NAME = "fig6_predictions.png"


class AnalysisInputError(UserError):
    """An analysis input (workdir, file, key, array) is missing or not what the figure expects."""


def _metrics_path(workdir: str | os.PathLike) -> Path:
    """The metrics.jsonl of a workdir (or the file itself when given one), checked to exist."""
    path = Path(workdir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AnalysisInputError(f"{path}: no such workdir; expected a training workdir holding {METRICS_FILE}")
    file = path / METRICS_FILE
    if not file.is_file():
        raise AnalysisInputError(f"{file}: not found; expected the {METRICS_FILE} a training run writes")
    return file


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Parsed lines of `workdir/metrics.jsonl`; an unparsable last line (a write cut short by a kill) is dropped."""
    file = _metrics_path(workdir)
    lines = file.read_text().splitlines()
    last_content_line = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == last_content_line:
                break
            raise AnalysisInputError(
                f"{file}:{number}: not valid JSON ({error.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise AnalysisInputError(
                f"{file}:{number}: expected a JSON object with an integer 'step', got {line[:80]!r}"
            )
        records.append(record)
    if not records:
        raise AnalysisInputError(f"{file}: no records; expected the lines a training run writes")
    return records


def read_results(workdir: str | os.PathLike) -> dict:
    """`workdir/results.json`, checked to hold `{"name": str, "metrics": {task: {metric: number}}, ...}`."""
    path = Path(workdir)
    if not path.exists():
        raise AnalysisInputError(f"{path}: no such workdir; expected a training workdir holding {RESULTS_FILE}")
    file = path if path.is_file() else path / RESULTS_FILE
    if not file.is_file():
        raise AnalysisInputError(f"{file}: not found; expected the {RESULTS_FILE} written at the end of training")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisInputError(f"{file}: not valid JSON ({error.msg})") from None
    metrics = results.get("metrics") if isinstance(results, dict) else None
    if not isinstance(metrics, dict) or not metrics or not all(
        isinstance(values, dict) and all(v is None or isinstance(v, (int, float)) for v in values.values())
        for values in metrics.values()
    ):
        raise AnalysisInputError(
            f"{file}: expected a non-empty 'metrics' object of the form {{task: {{metric: number}}}}"
        )
    return results


def metric_series(records: Sequence[Mapping], key: str, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records of one kind, sorted by step; a repeated step keeps its last line."""
    by_step = {r["step"]: float(r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing; 0 = none)."""
    if not 0.0 <= smoothing < 1.0:
        raise AnalysisInputError(f"smoothing must be in [0, 1), got {smoothing}")
    smoothed = np.empty(len(values), dtype=np.float64)
    average, weight = 0.0, 0.0
    for i, value in enumerate(values):
        average = smoothing * average + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)
        smoothed[i] = average / weight
    return smoothed


def logged_gradient_layers(records: Sequence[Mapping], component: str = "grad") -> list[str]:
    """Encoder layers with `<component>/<layer>` entries in the train lines, in approximate depth order."""
    prefix = f"{component}/"
    layers = {key[len(prefix):] for r in records if r.get("kind") == "train" for key in r if key.startswith(prefix)}
    return sorted(layers, key=depth_order_key)


def logged_task_losses(records: Sequence[Mapping]) -> list[str]:
    """Tasks with a `loss/<task>` entry in the train lines (main-task losses; `loss/total` excluded)."""
    keys = {key for r in records if r.get("kind") == "train" for key in r if key.startswith("loss/")}
    return sorted(key[len("loss/"):] for key in keys if key != "loss/total")


def spread_across_depth(layers: Sequence[str], count: int = 3) -> list[str]:
    """`count` layers evenly spread from first to last (early / middle / late for count=3)."""
    if len(layers) <= count:
        return list(layers)
    return [layers[i] for i in np.unique(np.round(np.linspace(0, len(layers) - 1, count)).astype(int))]


def run_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One tab10 colour per run name, in order (the same run keeps its colour across a report's figures)."""
    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


def _plot_curve(axes, steps, values, color, label, smoothing):
    """Raw values faint, EMA-smoothed values solid."""
    if smoothing > 0:
        axes.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    axes.plot(steps, ema(values, smoothing), color=color, linewidth=1.6, label=label)


def gradient_curves(
    runs: Mapping[str, Sequence[dict]],
    layers: Sequence[str] | None = None,
    loss_key: str = "loss/depth",
    *,
    component: str = "grad",
    smoothing: float = 0.6,
) -> Figure:
    """Fig. 5: mean |grad| of sampled shared-encoder parameters vs step per run, one panel per layer, plus the loss.

    `runs` maps a run name to its parsed metrics.jsonl lines. `layers` defaults to three layers logged by every
    run, spread across depth; the last panel shows `loss_key` (EMA-smoothed).
    """
    if not runs:
        raise AnalysisInputError("no runs given; expected at least one run's metrics.jsonl lines")
    if component not in GRADIENT_COMPONENTS:
        raise AnalysisInputError(f"unknown gradient component {component!r}; expected one of {GRADIENT_COMPONENTS}")
    if not 0.0 <= smoothing < 1.0:
        raise AnalysisInputError(f"smoothing must be in [0, 1), got {smoothing}")
    logged = {}
    for name, records in runs.items():
        logged[name] = logged_gradient_layers(records, component)
        if not logged[name]:
            raise AnalysisInputError(
                f"run {name!r}: no '{component}/<layer>' entries in its train lines; expected a run trained with "
                "gradient logging enabled"
            )
        if not any(r.get("kind") == "train" and r.get(loss_key) is not None for r in records):
            available = [f"loss/{task}" for task in logged_task_losses(records)]
            raise AnalysisInputError(f"run {name!r}: no train entries for {loss_key!r}; available: {available}")
    if layers is None:
        common = [layer for layer in next(iter(logged.values())) if all(layer in found for found in logged.values())]
        if not common:
            raise AnalysisInputError(f"the runs share no logged encoder layer; logged layers per run: {logged}")
        layers = spread_across_depth(common)
    if not layers:
        raise AnalysisInputError("layers: empty; expected at least one logged encoder layer")
    for layer in layers:
        for name, found in logged.items():
            if layer not in found:
                raise AnalysisInputError(f"run {name!r}: layer {layer!r} was not logged; logged layers: {found}")

    panels = len(layers) + 1
    columns = min(panels, 4)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    axes_grid = figure.subplots(rows, columns, squeeze=False).ravel()
    colors = run_colors(list(runs))
    for axes, layer in zip(axes_grid, layers):
        for name, records in runs.items():
            steps, values = metric_series(records, f"{component}/{layer}")
            _plot_curve(axes, steps, values, colors[name], name, smoothing)
        axes.set_title(layer, fontsize=9)
        axes.set_xlabel("step")
        axes.set_ylabel("mean |gradient|")
    loss_axes = axes_grid[len(layers)]
    for name, records in runs.items():
        steps, values = metric_series(records, loss_key)
        _plot_curve(loss_axes, steps, values, colors[name], name, smoothing)
    loss_axes.set_title(f"training {loss_key}", fontsize=9)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    for axes in axes_grid[panels:]:
        axes.set_visible(False)
    axes_grid[0].legend(fontsize=8)
    what = {"grad": "main + aux losses (adding a loss adds gradient: compare grad_main across runs)",
            "grad_main": "main losses only", "grad_aux": "aux losses only"}[component]
    figure.suptitle(f"Shared-encoder gradient magnitude (sampled parameters) of the {what}, and training loss")
    return figure


def parse_metric(spec: str | Sequence[str]) -> tuple[str, str]:
    """('task', 'metric') from a 'task/metric' string or a (task, metric) pair."""
    parts = spec.split("/") if isinstance(spec, str) else list(spec)
    if len(parts) != 2 or not all(parts):
        raise AnalysisInputError(f"metric {spec!r}: expected 'task/metric', e.g. 'depth/abs_err'")
    return parts[0], parts[1]


def _metric_or_none(result: Mapping, task: str, metric: str) -> float | None:
    value = result["metrics"].get(task, {}).get(metric)
    return None if value is None else float(value)


def _available_metrics(results: Mapping[str, Mapping]) -> list[str]:
    return sorted({f"{t}/{m}" for r in results.values() for t, ms in r["metrics"].items() for m in ms})


def partition_scatter_runs(
    results: Mapping[str, Mapping], x: str | Sequence[str], y: str | Sequence[str]
) -> tuple[dict[str, tuple[float, float]], dict[str, list[tuple[str, float]]], dict[str, str]]:
    """Splits results.json dicts into (points, references, left_out) for the (x, y) scatter.

    A run evaluated on several tasks is a point when it has both metrics. A run evaluated on one task only is a
    single-task reference for the axis of that task. Every other run is left out, with the reason.
    """
    (x_task, x_metric), (y_task, y_metric) = parse_metric(x), parse_metric(y)
    available = _available_metrics(results)
    for task, metric in ((x_task, x_metric), (y_task, y_metric)):
        if f"{task}/{metric}" not in available:
            raise AnalysisInputError(f"unknown metric '{task}/{metric}': no run has it; available: {available}")
    points, references, left_out = {}, {"x": [], "y": []}, {}
    for name, result in results.items():
        tasks = list(result["metrics"])
        x_value, y_value = _metric_or_none(result, x_task, x_metric), _metric_or_none(result, y_task, y_metric)
        if len(tasks) >= 2 and x_value is not None and y_value is not None:
            points[name] = (x_value, y_value)
        elif tasks == [x_task] and x_value is not None:
            references["x"].append((name, x_value))
        elif tasks == [y_task] and y_value is not None:
            references["y"].append((name, y_value))
        else:
            left_out[name] = f"evaluated on {tasks}; lacks {x_task}/{x_metric} or {y_task}/{y_metric}"
    if not points:
        raise AnalysisInputError(
            f"no multi-task run has both {x_task}/{x_metric} and {y_task}/{y_metric} (runs: {sorted(results)}); "
            f"available metrics: {available}"
        )
    return points, references, left_out


def choose_scatter_metrics(results: Mapping[str, Mapping]) -> tuple[str, str]:
    """The headline metrics ('task/metric') of the first two tasks, in TASK_ORDER, that one multi-task run has."""
    for result in results.values():
        tasks = [t for t in TASK_ORDER if _metric_or_none(result, t, HEADLINE_METRICS[t]) is not None]
        if len(tasks) >= 2:
            return f"{tasks[0]}/{HEADLINE_METRICS[tasks[0]]}", f"{tasks[1]}/{HEADLINE_METRICS[tasks[1]]}"
    raise AnalysisInputError(
        f"no run has headline metrics of two tasks ({HEADLINE_METRICS}); available: {_available_metrics(results)}"
    )


def axis_label(task: str, metric: str) -> str:
    """'task metric' with the better direction when the metrics module knows it."""
    higher = HIGHER_IS_BETTER.get(task, {}).get(metric)
    if higher is None:
        return f"{task} {metric}"
    return f"{task} {metric} ({'higher' if higher else 'lower'} is better)"


def strategy_scatter(
    results: Mapping[str, Mapping],
    x: str | Sequence[str] = "segmentation/miou",
    y: str | Sequence[str] = "depth/abs_err",
) -> Figure:
    """Fig. 3: one labelled point per multi-task run in the (x, y) metric plane, single-task runs as dotted lines.

    `results` maps run names to results.json dicts (see `partition_scatter_runs`); runs that fit neither role are
    named in a note under the plot. Points are labelled with Δm% when results.json has it.
    """
    (x_task, x_metric), (y_task, y_metric) = parse_metric(x), parse_metric(y)
    points, references, left_out = partition_scatter_runs(results, x, y)

    figure = Figure(figsize=(6.0, 4.8), layout="constrained")
    axes = figure.subplots()
    colors = run_colors(list(points))
    for name, (x_value, y_value) in points.items():
        axes.scatter([x_value], [y_value], color=colors[name], s=40, zorder=3)
        delta = results[name].get("delta_m")
        label = name if delta is None else f"{name} (Δm {delta:+.2f}%)"
        axes.annotate(label, (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for name, value in references["x"]:
        axes.axvline(value, color="gray", linestyle=":", label=f"{name} ({x_task} {x_metric})")
    for name, value in references["y"]:
        axes.axhline(value, color="dimgray", linestyle=(0, (1, 3)), label=f"{name} ({y_task} {y_metric})")
    if references["x"] or references["y"]:
        axes.legend(fontsize=8, loc="best")
    if left_out:
        figure.text(0.01, 0.005, f"not shown: {', '.join(sorted(left_out))}", fontsize=7, color="gray")
    axes.margins(0.15)
    axes.set_xlabel(axis_label(x_task, x_metric))
    axes.set_ylabel(axis_label(y_task, y_metric))
    axes.set_title("Multi-task strategies (dotted: single-task)")
    return figure


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


def select_fig5_runs(metrics: Mapping[str, list[dict]], task: str) -> dict[str, list[dict]]:
    """Runs for Fig. 5: those logging gradients and `loss/<task>`; multi-task runs only when there are any."""
    eligible = {
        name: records for name, records in metrics.items()
        if task in logged_task_losses(records) and logged_gradient_layers(records)
    }
    if not eligible:
        raise AnalysisInputError(
            f"no run logs both gradient entries and 'loss/{task}' (runs: {sorted(metrics)}); expected runs trained "
            "with gradient logging on a config that has the task"
        )
    multi_task = {name: records for name, records in eligible.items() if len(logged_task_losses(records)) >= 2}
    return multi_task or eligible


def write_sweep_figures(
    run_workdirs: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    task: str = "depth",
    prediction_examples: Mapping[str, np.ndarray] | None = None,
    denormalise: tuple[Sequence[float], Sequence[float]] | None = None,
    dpi: int = 100,
) -> list[Path]:
    """The figures of a multi-strategy sweep in `out_dir`; returns the written paths.

    - `fig5_gradients.png/.svg`: the main-loss gradient (`grad_main`: comparable across runs, unlike the total,
      which an added loss raises by construction) of every multi-task run (all runs when none is) logging
      gradients and `loss/<task>`; left out, with a warning, when no run logged gradients.
    - `fig3_strategies.png/.svg`: when at least one run has results.json (headline metrics of two tasks).
    - `fig6_predictions.png`: when `prediction_examples` is given: `image`, ground truth under `<task>` and
      predictions under `prediction/<task>` (batch-contract layouts; seg logits give num_classes).
    """
    if not run_workdirs:
        raise AnalysisInputError("run_workdirs: empty; expected {run name: workdir}")
    out_dir = Path(out_dir)
    metrics = {name: read_metrics(path) for name, path in run_workdirs.items()}
    results = {
        name: read_results(path) for name, path in run_workdirs.items() if (Path(path) / RESULTS_FILE).is_file()
    }
    pending = []
    try:
        curves = gradient_curves(select_fig5_runs(metrics, task), loss_key=f"loss/{task}", component="grad_main")
        pending.append((curves, out_dir / FIG5_NAME, True))
    except AnalysisInputError as error:  # e.g. analysis.grad_log_every_steps=0, or fewer steps than it
        logging.getLogger("auxmtl_jax").warning("left out %s: %s", FIG5_NAME, error)
    if results:
        x, y = choose_scatter_metrics(results)
        pending.append((strategy_scatter(results, x, y), out_dir / FIG3_NAME, True))
    if prediction_examples is not None:
        pending.append((_examples_grid(prediction_examples, denormalise), out_dir / PREDICTIONS_NAME, False))
    written = []
    for figure, path, svg in pending:
        written += save_figure(figure, path, dpi=dpi, svg=svg)
    return written


def _examples_grid(examples: Mapping[str, np.ndarray], denormalise) -> Figure:
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
