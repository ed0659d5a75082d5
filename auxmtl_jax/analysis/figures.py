"""Result figures: shared-layer gradient curves (paper Fig. 5), strategy scatter (Fig. 3) and a sweep's figures
(prediction grids, Fig. 6/7, are drawn by `images`).

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from auxmtl_jax.analysis.gradients import LOG_PREFIXES, depth_order_key
from auxmtl_jax.analysis.images import AnalysisInputError, examples_grid, save_figure  # noqa: F401 (re-exported)
from auxmtl_jax.metrics import HIGHER_IS_BETTER
from auxmtl_jax.tasks import TASK_NAMES as TASK_ORDER
from auxmtl_jax.workdir import METRICS_FILE, RESULTS_FILE

GRADIENT_COMPONENTS = LOG_PREFIXES
HEADLINE_METRICS = {"segmentation": "miou", "depth": "abs_err", "normal": "mean"}
FIG5_NAME = "fig5_gradients.png"
FIG3_NAME = "fig3_strategies.png"
PREDICTIONS_NAME = "fig6_predictions.png"


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
        pending.append((examples_grid(prediction_examples, denormalise), out_dir / PREDICTIONS_NAME, False))
    written = []
    for figure, path, svg in pending:
        written += save_figure(figure, path, dpi=dpi, svg=svg)
    return written


