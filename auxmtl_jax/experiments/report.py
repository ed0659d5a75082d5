"""An experiment's report: mean ± 95% t-interval over seeds per run and metric, Δm% against the same seed's
single-task runs, one verdict line per paper claim from a paired test over seeds, Fig. 3 with error bars and
Fig. 5 averaged over seeds with a band. Written as report.md, summary.json and PNGs in the experiment dir.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax.analysis import figures
from auxmtl_jax.experiments import stats
from auxmtl_jax.experiments.definitions import DELTA_M, Claim, Experiment

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
FIG3_FILE = "fig3_intervals.png"
FIG5_FILE = "fig5_bands.png"
COLUMNS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
           "normal": ("mean", "within_11.25")}
Results = Mapping[str, Mapping[int, Mapping[str, Mapping[str, float]]]]  # {run: {seed: {task: {metric: v}}}}


def columns(experiment: Experiment) -> list[tuple[str, str]]:
    return [(task, metric) for task in experiment.tasks for metric in COLUMNS[task]]


def delta_m_per_seed(experiment: Experiment, results: Results, run: str) -> dict[int, float]:
    """{seed: Δm% of `run` against the single-task runs of the same seed}."""
    values = {}
    for seed, metrics in results[run].items():
        references = {task: results[single][seed][task] for task, single in experiment.references(run).items()
                      if seed in results[single]}
        values[seed] = metrics_lib.delta_m(metrics, references)
    return values


def per_seed(experiment: Experiment, results: Results, run: str, metric: str) -> dict[int, float]:
    """{seed: value} of 'delta_m' or 'task/metric' for one run."""
    if metric == DELTA_M:
        return delta_m_per_seed(experiment, results, run)
    task, name = metric.split("/")
    return {seed: float(values[task][name]) for seed, values in results[run].items()}


def _better_is_higher(metric: str) -> bool:
    return True if metric == DELTA_M else metrics_lib.HIGHER_IS_BETTER[metric.split("/")[0]][metric.split("/")[1]]


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    test: stats.PairedTest  # of better − worse, signed so that positive means `better` is better
    holm_p_value: float = math.nan  # adjusted over the experiment's claims (`stats.holm_adjusted`)

    def line(self, experiment: Experiment) -> str:
        better, worse = experiment.run(self.claim.better).label, experiment.run(self.claim.worse).label
        metric = "Δm%" if self.claim.metric == DELTA_M else self.claim.metric
        p = "n/a" if math.isnan(self.test.p_value) else f"{self.test.p_value:.3f}"
        if not math.isnan(self.holm_p_value) and len(experiment.claims) > 1:
            p += f"; Holm-adjusted {self.holm_p_value:.3f}"
        return (f"{self.claim.statement} — **{self.test.verdict}** (p = {p}): {metric} of {better} minus {worse} "
                f"= {self.test.mean_difference:+.3f} ± {_format_half(self.test.half_width)} over "
                f"{self.test.pairs} paired seeds")


def test_claim(experiment: Experiment, results: Results, claim: Claim) -> ClaimResult:
    """The paired test of a claim over the seeds both of its runs have."""
    better = per_seed(experiment, results, claim.better, claim.metric)
    worse = per_seed(experiment, results, claim.worse, claim.metric)
    seeds = sorted(set(better) & set(worse))
    sign = 1.0 if _better_is_higher(claim.metric) else -1.0
    test = stats.paired_test([sign * better[s] for s in seeds], [sign * worse[s] for s in seeds])
    return ClaimResult(claim, test)


def test_claims(experiment: Experiment, results: Results) -> list[ClaimResult]:
    """Every claim's paired test, with p-values Holm-adjusted over the experiment's claims."""
    tested = [test_claim(experiment, results, claim) for claim in experiment.claims]
    adjusted = stats.holm_adjusted([result.test.p_value for result in tested])
    return [dataclasses.replace(result, holm_p_value=p) for result, p in zip(tested, adjusted)]


def _format_half(half_width: float) -> str:
    return "n/a" if math.isnan(half_width) else f"{half_width:.3f}"


def _cell(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, half = stats.t_interval(values)
    spread = "" if math.isnan(half) else f" ± {half * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{spread}"


def summary(experiment: Experiment, results: Results, claims: Sequence[ClaimResult]) -> dict:
    """{'runs': {run: {'task/metric' | 'delta_m': {'mean', 'half_width', 'per_seed'}}}, 'claims': [...]}."""
    runs = {}
    for run in experiment.runs:
        entries = {}
        for task, metric in columns(experiment):
            if task in next(iter(results[run.name].values())):
                entries[f"{task}/{metric}"] = per_seed(experiment, results, run.name, f"{task}/{metric}")
        entries[DELTA_M] = per_seed(experiment, results, run.name, DELTA_M)
        runs[run.name] = {key: dict(zip(("mean", "half_width"), stats.t_interval(list(values.values()))),
                                    per_seed={str(seed): value for seed, value in values.items()})
                          for key, values in entries.items()}
    return {"runs": runs, "claims": [{"statement": result.claim.statement, "better": result.claim.better,
                                      "worse": result.claim.worse, "metric": result.claim.metric,
                                      "verdict": result.test.verdict, **dataclasses.asdict(result.test),
                                      "holm_p_value": result.holm_p_value}
                                     for result in claims]}


def markdown(experiment: Experiment, results: Results, claims: Sequence[ClaimResult], *, seeds: Sequence[int],
             setting: str, wall_seconds: float, figure_files: Sequence[str]) -> str:
    """The report as Markdown: setting, the interval table, the claim lines, the figures."""
    table_columns = [(task, metric) for task, metric in columns(experiment)]
    header = ["run"] + [f"{task} {metric}{'%' if metric in metrics_lib.FRACTION_METRICS else ''} "
                        f"{'↑' if metrics_lib.HIGHER_IS_BETTER[task][metric] else '↓'}"
                        for task, metric in table_columns] + ["Δm% ↑"]
    lines = [f"# Experiment `{experiment.name}` ({experiment.source})", "",
             f"{setting}. Seeds {', '.join(map(str, seeds))}: each seed sets the initialisation and the training "
             f"data order, and the runs of one seed share both. Training wall time {wall_seconds / 60:.1f} min in "
             "total.", "",
             "Each cell is the mean ± the half-width of the 95% t-interval over seeds. Δm% is measured against the "
             "single-task runs of the same seed (" + ", ".join(
                 f"{task}: {experiment.run(run).label}" for task, run in experiment.singles.items()) + ").", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in experiment.runs:
        by_seed = results[run.name]
        cells = [experiment.run(run.name).label]
        for task, metric in table_columns:
            values = [metrics[task][metric] for metrics in by_seed.values() if task in metrics]
            scale = 100.0 if metric in metrics_lib.FRACTION_METRICS else 1.0
            digits = 4 if task == "depth" else 2
            cells.append(_cell(values, scale, digits) if values else "–")
        cells.append(_cell(list(delta_m_per_seed(experiment, results, run.name).values())))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Claims", "",
              "Paired two-sided t-test over seeds of the first run minus the second (signed so that positive is "
              "better), α = 0.05: **holds** = significantly better, **does not hold** = significantly worse. "
              "The verdict is per claim; the Holm-adjusted p-value treats the experiment's claims as one family "
              "(below 0.05 = the verdict survives testing them all).", ""]
    lines += [f"- {result.line(experiment)}" for result in claims]
    if figure_files:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figure_files]
    return "\n".join(lines) + "\n"


def fig3_intervals(experiment: Experiment, results: Results, x: str = "segmentation/miou",
                   y: str = "depth/abs_err") -> Figure:
    """Paper Fig. 3 with error bars: each multi-task run at its mean (x, y), bars = 95% t-intervals; the
    single-task runs' means as dotted lines."""
    figure = Figure(figsize=(6.4, 5.0), layout="constrained")
    axes = figure.subplots()
    singles = set(experiment.singles.values()) | {run for group in experiment.reference_group.values()
                                                  for run in group.values()}
    colors = figures._run_colors([run.name for run in experiment.runs])
    for run in experiment.runs:
        x_values = per_seed(experiment, results, run.name, x) if _has(results, run.name, x) else None
        y_values = per_seed(experiment, results, run.name, y) if _has(results, run.name, y) else None
        if run.name in singles:
            for values, line in ((x_values, axes.axvline), (y_values, axes.axhline)):
                if values:
                    line(float(np.mean(list(values.values()))), color=colors[run.name], linestyle=":",
                         label=f"{run.label}")
            continue
        (x_mean, x_half), (y_mean, y_half) = (stats.t_interval(list(x_values.values())),
                                              stats.t_interval(list(y_values.values())))
        axes.errorbar([x_mean], [y_mean], xerr=None if math.isnan(x_half) else [x_half],
                      yerr=None if math.isnan(y_half) else [y_half], fmt="o", color=colors[run.name], capsize=3)
        axes.annotate(run.label, (x_mean, y_mean), textcoords="offset points", xytext=(5, 5), fontsize=7)
    axes.legend(fontsize=7, loc="best")
    axes.set_xlabel(figures._axis_label(*x.split("/")))
    axes.set_ylabel(figures._axis_label(*y.split("/")))
    axes.set_title(f"{experiment.name}: mean ± 95% interval over seeds (dotted: single-task)", fontsize=9)
    return figure


def _has(results: Results, run: str, metric: str) -> bool:
    task = metric.split("/")[0]
    return all(task in metrics for metrics in results[run].values())


def fig5_bands(records: Mapping[str, Sequence[Sequence[dict]]], loss_key: str, component: str = "grad",
               smoothing: float = 0.6) -> Figure:
    """Paper Fig. 5 averaged over seeds: per run the mean over seeds of the sampled encoder-gradient magnitude
    (three layers spread across depth) and of the training loss, each seed's curve EMA-smoothed first, with a
    band of ± one standard deviation over seeds.

    `records` maps a run name to the metrics.jsonl lines of each of its seeds.
    """
    logged = {name: [figures.logged_gradient_layers(lines, component) for lines in seeds]
              for name, seeds in records.items()}
    common = [layer for layer in logged[next(iter(logged))][0]
              if all(layer in found for seeds in logged.values() for found in seeds)]
    if not common:
        raise figures.AnalysisInputError("the runs share no logged gradient layer; expected runs trained with "
                                         "analysis.grad_log_every_steps > 0")
    keys = [f"{component}/{layer}" for layer in figures.spread_across_depth(common)] + [loss_key]
    figure = Figure(figsize=(4.0 * len(keys), 3.4), layout="constrained")
    colors = figures._run_colors(list(records))
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        for name, seeds in records.items():
            series = [figures.metric_series(lines, key) for lines in seeds]
            length = min(len(steps) for steps, _ in series)
            steps = series[0][0][:length]
            values = np.stack([figures.ema(values[:length], smoothing) for _, values in series])
            mean, spread = values.mean(axis=0), values.std(axis=0)
            axes.plot(steps, mean, color=colors[name], label=f"{name} ({len(seeds)} seeds)")
            axes.fill_between(steps, mean - spread, mean + spread, color=colors[name], alpha=0.2)
        axes.set_title(key, fontsize=8)
        axes.set_xlabel("step")
    figure.axes[0].set_ylabel("mean |gradient|")
    figure.axes[0].legend(fontsize=7)
    return figure


def write_report(experiment: Experiment, root: str | epath.Path, results: Results, *, seeds: Sequence[int],
                 setting: str, wall_seconds: float) -> list[epath.Path]:
    """report.md, summary.json, fig3_intervals.png and (when runs logged gradients) fig5_bands.png in `root`."""
    root = epath.Path(root)
    written, figure_files = [], []
    if {"segmentation", "depth"} <= set(experiment.tasks):
        written += figures.save_figure(fig3_intervals(experiment, results), str(root / FIG3_FILE), svg=False)
        figure_files.append(FIG3_FILE)
    if experiment.fig5:
        from auxmtl_jax.experiments.runner import run_workdir

        records = {experiment.run(name).label: [figures.read_metrics(run_workdir(root, name, seed))
                                                for seed in seeds] for name in experiment.fig5}
        loss_key = f"loss/{'depth' if 'depth' in experiment.tasks else experiment.tasks[0]}"
        try:
            written += figures.save_figure(fig5_bands(records, loss_key), str(root / FIG5_FILE), svg=False)
            figure_files.append(FIG5_FILE)
        except figures.AnalysisInputError:
            pass  # no gradient logs (analysis.grad_log_every_steps=0): the report has no Fig. 5
    claims = test_claims(experiment, results)
    record = summary(experiment, results, claims)
    record.update({"experiment": experiment.name, "seeds": list(seeds), "setting": setting,
                   "wall_seconds": wall_seconds})
    checkpoint_lib._write_text_atomic(root / SUMMARY_FILE, json.dumps(record, indent=2, allow_nan=True) + "\n")
    text = markdown(experiment, results, claims, seeds=seeds, setting=setting, wall_seconds=wall_seconds,
                    figure_files=figure_files)
    checkpoint_lib._write_text_atomic(root / REPORT_FILE, text)
    return [epath.Path(path) for path in written] + [root / SUMMARY_FILE, root / REPORT_FILE]
