"""Paper Fig. 5 over seeds, without circularity: the main-loss gradient of an Auxi run against Joint's.

Adding a loss adds gradient by construction, so comparing the total gradient (main + aux) of an Auxi run with
Joint's says nothing. What the mechanism is about is whether the main tasks' own loss reaches the shared encoder
differently when aux modules train alongside: `grad_main/<layer>` of the Auxi run against `grad_main/<layer>`
of Joint (equal to its total gradient), same seed, same sampled coordinates. The aux part (`grad_aux/<layer>`) is
drawn on its own row. Both are mean |gradient| over a layer's sampled coordinates, logged every
`analysis.grad_log_every_steps` steps.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from auxmtl_jax.analysis import figures
from auxmtl_jax.analysis.gradients import depth_order_key
from auxmtl_jax.experiments import stats

Lines = Sequence[Mapping]  # the metrics.jsonl lines of one run and seed


def common_layers(joint: Sequence[Lines], auxi: Sequence[Lines]) -> list[str]:
    """Encoder layers with `grad_main` logs in every seed of both runs, in depth order."""
    found = [set(figures.logged_gradient_layers(lines, "grad_main")) for lines in (*joint, *auxi)]
    if not found or not set.intersection(*found):
        raise figures.AnalysisInputError("the runs share no logged grad_main layer; expected runs trained with "
                                         "analysis.grad_log_every_steps > 0")
    return sorted(set.intersection(*found), key=depth_order_key)


def _time_mean(lines: Lines, key: str) -> float:
    _, values = figures.metric_series(lines, key)
    return float(values.mean()) if values.size else math.nan


def gradient_numbers(joint: Sequence[Lines], auxi: Sequence[Lines]) -> dict:
    """Per layer (and averaged over layers): each seed's mean over logged steps of |g_main| for Joint and Auxi,
    the per-seed ratio Auxi / Joint with its 95% t-interval and the paired two-sided p of Auxi − Joint, and the
    Auxi run's aux part relative to its main part (|g_aux| / |g_main|)."""
    layers = common_layers(joint, auxi)
    numbers = {}
    for layer in [*layers, "all layers"]:
        keys = layers if layer == "all layers" else [layer]
        main_joint = [np.mean([_time_mean(lines, f"grad_main/{key}") for key in keys]) for lines in joint]
        main_auxi = [np.mean([_time_mean(lines, f"grad_main/{key}") for key in keys]) for lines in auxi]
        aux_auxi = [np.mean([_time_mean(lines, f"grad_aux/{key}") for key in keys]) for lines in auxi]
        ratio = [a / j for a, j in zip(main_auxi, main_joint)]
        ratio_mean, ratio_half = stats.t_interval(ratio)
        aux_share, aux_half = stats.t_interval([x / m for x, m in zip(aux_auxi, main_auxi)])
        numbers[layer] = {"joint_main": float(np.mean(main_joint)), "auxi_main": float(np.mean(main_auxi)),
                          "ratio": ratio_mean, "ratio_half_width": ratio_half,
                          "p_value": stats.paired_test(main_auxi, main_joint).p_value,
                          "aux_over_main": aux_share, "aux_over_main_half_width": aux_half, "seeds": len(ratio)}
    return numbers


def _band(axes, steps, per_seed: np.ndarray, color, label: str, linestyle: str = "-") -> None:
    """Mean over seeds with a band of the 95% t half-width (none for one seed)."""
    mean = per_seed.mean(axis=0)
    axes.plot(steps, mean, color=color, label=label, linestyle=linestyle)
    if per_seed.shape[0] > 1:
        half = np.array([stats.t_interval(column)[1] for column in per_seed.T])
        axes.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)


def _curves(seeds: Sequence[Lines], key: str, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    series = [figures.metric_series(lines, key) for lines in seeds]
    length = min(len(steps) for steps, _ in series)
    return series[0][0][:length], np.stack([figures.ema(values[:length], smoothing) for _, values in series])


def main_gradient_figure(joint: Sequence[Lines], auxi: Sequence[Lines], labels: tuple[str, str],
                         smoothing: float = 0.6) -> Figure:
    """Top row: |g_main| of Joint and of the Auxi run at three layers spread across depth; bottom row: the Auxi
    run's |g_aux| at the same layers. Curves are EMA-smoothed per seed, then averaged, bands = 95% t half-width."""
    layers = figures.spread_across_depth(common_layers(joint, auxi))
    figure = Figure(figsize=(4.0 * len(layers), 6.4), layout="constrained")
    grid = figure.subplots(2, len(layers), squeeze=False)
    for column, layer in enumerate(layers):
        top, bottom = grid[0][column], grid[1][column]
        for seeds, label, color in ((joint, labels[0], "tab:blue"), (auxi, labels[1], "tab:orange")):
            steps, values = _curves(seeds, f"grad_main/{layer}", smoothing)
            _band(top, steps, values, color, f"{label}: main loss ({len(seeds)} seeds)")
        steps, values = _curves(auxi, f"grad_aux/{layer}", smoothing)
        _band(bottom, steps, values, "tab:green", f"{labels[1]}: aux losses", linestyle="--")
        top.set_title(f"main-loss |gradient|: {layer}", fontsize=8)
        bottom.set_title(f"aux-loss |gradient|: {layer}", fontsize=8)
        bottom.set_xlabel("step")
    grid[0][0].set_ylabel("mean |gradient| (main losses)")
    grid[1][0].set_ylabel("mean |gradient| (aux losses)")
    grid[0][0].legend(fontsize=7)
    grid[1][0].legend(fontsize=7)
    return figure


def markdown_lines(numbers: Mapping[str, Mapping], labels: tuple[str, str]) -> list[str]:
    """The figure's numbers as a table, and what they do and do not show."""
    joint, auxi = labels
    lines = [f"Main-loss gradient of {auxi} against {joint} at the figure's three layers and averaged over every "
             "logged layer (summary.json has each layer): each seed's mean over the logged steps, then the mean "
             "over seeds; the ratio is per seed, ± the 95% t half-width, with the raw p of a paired t-test of the "
             "two (no claim, so no Holm).", "",
             f"| layer | {joint} mean abs g_main | {auxi} mean abs g_main | ratio {auxi} / {joint} | p | "
             f"{auxi} g_aux / g_main |", "|---|---|---|---|---|---|"]
    shown = figures.spread_across_depth([layer for layer in numbers if layer != "all layers"]) + ["all layers"]
    for layer in shown:
        entry = numbers[layer]
        p = "n/a" if math.isnan(entry["p_value"]) else f"{entry['p_value']:.3f}"
        lines.append(f"| {layer} | {entry['joint_main']:.3g} | {entry['auxi_main']:.3g} | "
                     f"{entry['ratio']:.3f} ± {entry['ratio_half_width']:.3f} | {p} | "
                     f"{entry['aux_over_main']:.3f} ± {entry['aux_over_main_half_width']:.3f} |")
    overall = numbers["all layers"]
    lines += ["", f"What it shows: averaged over layers, the main losses reach the encoder with "
              f"{overall['ratio']:.3f} ± {overall['ratio_half_width']:.3f} times Joint's gradient magnitude when "
              f"aux modules train alongside, and the aux losses add {overall['aux_over_main']:.3f} ± "
              f"{overall['aux_over_main_half_width']:.3f} times the main part on top. What it does not show: "
              "that a larger or smaller gradient helps; the two runs' weights differ after the first step, so the "
              "ratio mixes the aux modules' direct effect with where each run has got to."]
    return lines
