"""An experiment's report: every metric as mean ± 95% t half-width over seeds, Δm% in a named convention, one
line per declared claim on its endpoint (paired test over seeds, verdict by the Holm-adjusted p within its
family; an experiment's gate first, with whether it passed), Δm% differences as secondary lines, Fig. 3 with
error bars and a non-circular Fig. 5. Written as
report.md, summary.json and PNGs in the experiment dir; summary.json keeps every metric of every (run, seed), so a
report re-renders in any convention without the runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from auxmtl_jax import comparison
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.analysis import figures
from auxmtl_jax.experiments import gradients, stats
from auxmtl_jax.experiments.definitions import DELTA_M, GATE, Claim, Experiment

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
FIG3_FILE = "fig3_intervals.png"
FIG5_FILE = "fig5_main_gradient.png"
Results = Mapping[str, Mapping[int, Mapping[str, Mapping[str, float]]]]  # {run: {seed: {task: {metric: v}}}}
INTERVAL_NOTE = "± the half-width of the 95% Student-t interval over seeds"


def metric_columns(experiment: Experiment, results: Results) -> list[tuple[str, str]]:
    """Every (task, metric) of the experiment's tasks that some run has, in the metrics module's order."""
    present = {(task, metric) for by_seed in results.values() for values in by_seed.values()
               for task, metrics in values.items() for metric in metrics}
    return [(task, metric) for task in experiment.tasks for metric in metrics_lib.HIGHER_IS_BETTER[task]
            if (task, metric) in present]


def delta_m_per_seed(experiment: Experiment, results: Results, run: str,
                     convention: str = comparison.DELTA_M_DEFAULT) -> dict[int, float]:
    """{seed: Δm% of `run` against the single-task runs of the same seed}."""
    values = {}
    for seed, metrics in results[run].items():
        references = {task: results[single][seed][task] for task, single in experiment.references(run).items()
                      if seed in results[single]}
        values[seed] = comparison.delta_m(metrics, references, convention)
    return values


def per_seed(experiment: Experiment, results: Results, run: str, key: str,
             convention: str = comparison.DELTA_M_DEFAULT) -> dict[int, float]:
    """{seed: value} of 'delta_m' or 'task/metric' for one run."""
    if key == DELTA_M:
        return delta_m_per_seed(experiment, results, run, convention)
    task, name = key.split("/")
    return {seed: float(values[task][name]) for seed, values in results[run].items() if task in values}


def _higher_is_better(key: str) -> bool:
    return True if key == DELTA_M else metrics_lib.HIGHER_IS_BETTER[key.split("/")[0]][key.split("/")[1]]


def _paired(experiment, results, first, second, key, convention) -> stats.PairedTest:
    """Paired test of `first` − `second` (raw units) over the seeds both have."""
    a, b = (per_seed(experiment, results, run, key, convention) for run in (first, second))
    seeds = sorted(set(a) & set(b))
    return stats.paired_test([a[s] for s in seeds], [b[s] for s in seeds])


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    test: stats.PairedTest  # of first − second on the endpoint, in the metric's own units
    holm_p_value: float  # adjusted within the claim's family of this experiment
    verdict: str
    family: str = ""  # its Holm family in this experiment: 'gate', 'paper' or 'beyond the paper'

    @property
    def difference_in_claimed_direction(self) -> float:
        """Positive when `first` is `direction` than `second` (the sign the claim predicts)."""
        better = 1.0 if _higher_is_better(self.claim.endpoint) else -1.0
        return self.test.mean_difference * better * (1.0 if self.claim.direction == "better" else -1.0)


def test_claims(experiment: Experiment, results: Results) -> list[ClaimResult]:
    """Every claim's paired test on its endpoint, the gate's first; p Holm-adjusted within its family (the gate is
    one); verdict by the adjusted p."""
    tested = experiment.tested_claims
    families = [experiment.family(claim) for claim in tested]
    tests = [_paired(experiment, results, claim.first, claim.second, claim.endpoint, comparison.DELTA_M_DEFAULT)
             for claim in tested]
    adjusted = [math.nan] * len(tests)
    for family in set(families):
        members = [i for i, member in enumerate(families) if member == family]
        for i, p in zip(members, stats.holm_adjusted([tests[i].p_value for i in members])):
            adjusted[i] = p
    claimed = []
    for claim, test, p, family in zip(tested, tests, adjusted, families):
        result = ClaimResult(claim, test, p, "", family)
        claimed.append(dataclasses.replace(result, verdict=stats.verdict(result.difference_in_claimed_direction,
                                                                           p)))
    return claimed


def gate_status(claims: Sequence[ClaimResult]) -> dict | None:
    """None without gate claims; else whether the gate passed (at least one of its claims holds after Holm within
    the gate) and its smallest Holm p."""
    gate = [result for result in claims if result.family == GATE]
    if not gate:
        return None
    p_values = [result.holm_p_value for result in gate if not math.isnan(result.holm_p_value)]
    return {"passed": any(result.verdict == "holds" for result in gate),
            "holm_p_value": min(p_values) if p_values else math.nan}


def gate_line(status: Mapping) -> str:
    """'**Gate: passed** (...)' / '**Gate: failed** (...)': what the report's reader needs before the claims."""
    word = "passed" if status["passed"] else "failed"
    return (f"**Gate: {word}** (smallest Holm p {_p_equals(status['holm_p_value'])}; it passes when at least one gate "
            "claim holds). The claims below are read only if it passed"
            + ("." if status["passed"] else ": they are printed for the record, not read."))


def _scale(metric: str) -> tuple[float, str]:
    """Display factor and unit of a metric's differences: fractions in percentage points."""
    if metric in metrics_lib.FRACTION_METRICS:
        return 100.0, " points"
    return 1.0, {"abs_err": " m", "rms": " m", "mean": "°", "median": "°"}.get(metric, "")


def _digits(task: str, metric: str) -> int:
    return 4 if task == "depth" and metric not in metrics_lib.FRACTION_METRICS else 2


def format_difference(endpoint: str, mean: float, half_width: float) -> str:
    """'+0.59 ± 0.50 points' / '-0.0164 ± 0.0373 m': a difference on `endpoint` in its display units."""
    task, metric = endpoint.split("/")
    scale, unit = _scale(metric)
    digits = _digits(task, metric)
    half = "n/a" if math.isnan(half_width) else f"{half_width * scale:.{digits}f}"
    return f"{mean * scale:+.{digits}f} ± {half}{unit}"


def _p_equals(value: float) -> str:
    """'= 0.012', or '< 0.001' for a p that would print as 0.000 (after 'p' in a sentence)."""
    text = _p(value)
    return text if text.startswith("<") else f"= {text}"


def _p(value: float) -> str:
    """Three decimals; a p that would print as 0.000 prints as < 0.001."""
    if math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.0005 else f"{value:.3f}"


def claim_line(experiment: Experiment, result: ClaimResult) -> str:
    claim, test = result.claim, result.test
    first, second = experiment.run(claim.first).label, experiment.run(claim.second).label
    task, metric = claim.endpoint.split("/")
    return (f"{claim.statement} ({claim.source}) — **{result.verdict}** (Holm p {_p_equals(result.holm_p_value)}; "
            f"raw p {_p_equals(test.p_value)}): {task} {metric} of {first} − {second} = "
            f"{format_difference(claim.endpoint, test.mean_difference, test.half_width)} (95% t half-width, "
            f"{test.pairs} paired seeds)")


def delta_m_pairs(experiment: Experiment, results: Results, convention: str) -> list[dict]:
    """The Δm% difference of every pair a claim compares, once per pair: secondary, no verdict. Pairs against a
    single-task reference are left out (their Δm% is 0 by construction: the table's Δm% column says it)."""
    references = set(experiment.singles.values()) | {run for group in experiment.reference_group.values()
                                                     for run in group.values()}
    pairs = list(dict.fromkeys((claim.first, claim.second) for claim in experiment.claims
                               if claim.second not in references))
    rows = []
    for first, second in pairs:
        test = _paired(experiment, results, first, second, DELTA_M, convention)
        rows.append({"first": first, "second": second, **dataclasses.asdict(test)})
    return rows


def _cell(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean, half = stats.t_interval(values)
    return f"{mean * scale:.{digits}f}" + ("" if math.isnan(half) else f" ± {half * scale:.{digits}f}")


def _entry(values: Mapping[int, float]) -> dict:
    mean, half = stats.t_interval(list(values.values()))
    return {"mean": mean, "half_width": half, "per_seed": {str(seed): value for seed, value in values.items()}}


def summary(experiment: Experiment, results: Results, claims: Sequence[ClaimResult], convention: str) -> dict:
    """Every metric of every (run, seed), the per-run statistics, Δm% with its convention, and the claims."""
    missing = delta_m_available(experiment, results, convention)
    available = missing is None
    runs = {}
    for run in experiment.runs:
        entries = {f"{task}/{metric}": _entry(per_seed(experiment, results, run.name, f"{task}/{metric}"))
                   for task, metric in metric_columns(experiment, results)
                   if per_seed(experiment, results, run.name, f"{task}/{metric}")}
        if available:
            entries[DELTA_M] = _entry(delta_m_per_seed(experiment, results, run.name, convention))
        runs[run.name] = entries
    return {
        "delta_m": {"convention": convention, "unavailable": missing,
                    "metrics": {task: list(names) for task, names in
                                comparison.delta_m_metrics(convention, experiment.tasks).items()},
                    "references": {run.name: dict(experiment.references(run.name)) for run in experiment.runs}},
        "results": {run: {str(seed): values for seed, values in by_seed.items()} for run, by_seed in results.items()},
        "runs": runs,
        "claims": [{"statement": result.claim.statement, "first": result.claim.first, "second": result.claim.second,
                    "endpoint": result.claim.endpoint, "direction": result.claim.direction,
                    "source": result.claim.source, "family": result.family, "verdict": result.verdict,
                    **dataclasses.asdict(result.test), "holm_p_value": result.holm_p_value} for result in claims],
        "delta_m_differences": delta_m_pairs(experiment, results, convention) if available else [],
        **({"gate": gate_status(claims)} if experiment.gate else {}),
    }


def results_from_summary(record: Mapping) -> dict[str, dict[int, dict]]:
    """{run: {seed: metrics}} back from a summary.json's 'results' or, in a summary written before it kept every
    metric, from the per-seed values of the metrics its table had."""
    if "results" in record:
        return {run: {int(seed): values for seed, values in by_seed.items()}
                for run, by_seed in record["results"].items()}
    results: dict[str, dict[int, dict]] = {}
    for run, entries in record["runs"].items():
        by_seed = results.setdefault(run, {})
        for key, entry in entries.items():
            if "/" in key:
                task, metric = key.split("/")
                for seed, value in entry["per_seed"].items():
                    by_seed.setdefault(int(seed), {}).setdefault(task, {})[metric] = value
    return results


def delta_m_available(experiment: Experiment, results: Results, convention: str) -> str | None:
    """None when every run's Δm% in `convention` can be computed, else why not (a missing metric)."""
    try:
        for run in experiment.runs:
            delta_m_per_seed(experiment, results, run.name, convention)
    except ValueError as error:
        return str(error)
    return None


def _table(experiment: Experiment, results: Results, keys: Sequence[tuple[str, str]],
           convention: str | None) -> list[str]:
    header = ["run"] + [f"{task} {metric}{'%' if metric in metrics_lib.FRACTION_METRICS else ''} "
                        f"{'↑' if metrics_lib.HIGHER_IS_BETTER[task][metric] else '↓'}" for task, metric in keys]
    lines = ["| " + " | ".join(header + ["Δm% ↑"]) + " |", "|" + "---|" * (len(header) + 1)]
    for run in experiment.runs:
        cells = [run.label]
        for task, metric in keys:
            values = list(per_seed(experiment, results, run.name, f"{task}/{metric}").values())
            scale = 100.0 if metric in metrics_lib.FRACTION_METRICS else 1.0
            digits = _digits(task, metric)
            cells.append(_cell(values, scale, digits))
        cells.append(_cell(list(delta_m_per_seed(experiment, results, run.name, convention).values()))
                     if convention else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(experiment: Experiment, results: Results, claims: Sequence[ClaimResult], record: Mapping, *,
             seeds: Sequence[int], setting: str, wall_seconds: float, convention: str,
             fig5_numbers: Mapping | None, figure_files: Sequence[str]) -> str:
    """The report: setting and conventions, the endpoint table, the claim lines per family, Δm% differences,
    the full metric table, Fig. 5's numbers, the figures."""
    endpoints = [tuple(key.split("/")) for key in dict.fromkeys(claim.endpoint
                                                                 for claim in experiment.tested_claims)]
    missing = record["delta_m"]["unavailable"]
    shown = None if missing else convention
    references = ", ".join(f"{task}: {experiment.run(run).label}" for task, run in experiment.singles.items())
    lines = [f"# Experiment `{experiment.name}` ({experiment.source})", "",
             f"{setting}. Seeds {', '.join(map(str, seeds))}: each seed sets the initialisation and the training "
             f"data order, and the runs of one seed share both. Training wall time {wall_seconds / 60:.1f} min "
             "(runs shared with another experiment count in both).", "",
             f"- {comparison.describe_delta_m(convention, experiment.tasks)}. Reference: the single-task runs of "
             f"the same seed ({references})." + (f" Not computable here ({missing}): the Δm% column shows –."
                                                 if missing else ""),
             f"- Every cell and difference is the mean {INTERVAL_NOTE}.",
             "- Claims were declared before the runs (`experiments/definitions.py`, `premise.py`), each on the "
             "endpoint its source names, in the direction the source reports. Paired two-sided t-test over seeds; the verdict follows "
             "the Holm-adjusted p within the claim's family (the paper's claims; those beyond the paper), α = 0.05: "
             "**holds** = significant in the claimed direction, **does not hold** = significant against it, "
             "**not significant** = neither (read the interval for what it excludes).", "",
             "## Endpoints", ""]
    lines += _table(experiment, results, endpoints, shown)
    status = gate_status(claims)
    if status is not None:
        count = sum(result.family == GATE for result in claims)
        lines += ["", f"## Gate: the premise, declared and evaluated first ({count} endpoints, one Holm family)", "",
                  gate_line(status), ""]
    for family, title in ((GATE, None), ("paper", "Claims from the paper"), ("beyond the paper", "Beyond the paper")):
        members = [result for result in claims if result.family == family]
        if members and title:
            lines += ["", f"## {title} ({len(members)} endpoints, one Holm family)", ""]
        lines += [f"- {claim_line(experiment, result)}" for result in members]
    if not missing and record["delta_m_differences"]:
        lines += ["", f"## Δm% differences (secondary, `{convention}`; no verdict)", ""]
    for row in record["delta_m_differences"]:
        first, second = experiment.run(row["first"]).label, experiment.run(row["second"]).label
        half = "n/a" if math.isnan(row["half_width"]) else f"{row['half_width']:.2f}"
        lines.append(f"- {first} − {second}: {row['mean_difference']:+.2f} ± {half} (raw p {_p_equals(row['p_value'])})")
    lines += ["", "## Every metric", ""] + _table(experiment, results, metric_columns(experiment, results), shown)
    if fig5_numbers:
        labels = tuple(experiment.run(name).label for name in experiment.fig5)
        lines += ["", "## Fig. 5: the main-loss gradient with and without aux modules", ""]
        lines += gradients.markdown_lines(fig5_numbers, labels)
    if figure_files:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figure_files]
    return "\n".join(lines) + "\n"


def claims_table(summaries: Mapping[str, Mapping], family: str = "paper") -> str:
    """One Markdown table of the claims of `family` across experiment summaries {experiment dir name: summary}:
    claim, endpoint, difference ± 95% t half-width, Holm p (raw p), verdict ('(gate failed: not read)' added in an
    experiment whose gate failed)."""
    lines = ["| experiment | claim (source) | difference, first − second | Holm p (raw p) | verdict |",
             "|---|---|---|---|---|"]
    for name, record in summaries.items():
        for claim in record["claims"]:
            if claim["family"] != family:
                continue
            metric = claim["endpoint"].split("/")[1]
            difference = format_difference(claim["endpoint"], claim["mean_difference"], claim["half_width"])
            unread = " (gate failed: not read)" if record.get("gate") and not record["gate"]["passed"] else ""
            lines.append(f"| {name} | {claim['statement']} ({claim['source']}) | {metric} {difference} | "
                         f"{_p(claim['holm_p_value'])} ({_p(claim['p_value'])}) | {claim['verdict']}{unread} |")
    return "\n".join(lines) + "\n"


def fig3_intervals(experiment: Experiment, results: Results, x: str = "segmentation/miou",
                   y: str = "depth/abs_err") -> Figure:
    """Paper Fig. 3 with error bars: each multi-task run at its mean (x, y), bars = 95% t-intervals; the
    single-task runs' means as dotted lines."""
    figure = Figure(figsize=(6.4, 5.0), layout="constrained")
    axes = figure.subplots()
    singles = set(experiment.singles.values()) | {run for group in experiment.reference_group.values()
                                                  for run in group.values()}
    colors = figures.run_colors([run.name for run in experiment.runs])
    for run in experiment.runs:
        x_values, y_values = (per_seed(experiment, results, run.name, key) for key in (x, y))
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
    axes.set_xlabel(figures.axis_label(*x.split("/")))
    axes.set_ylabel(figures.axis_label(*y.split("/")))
    axes.set_title(f"{experiment.name}: mean ± 95% t half-width over seeds (dotted: single-task)", fontsize=9)
    return figure


def _fig5_records(experiment: Experiment, runs_dir: epath.Path | None, seeds: Sequence[int]):
    """(Joint lines per seed, Auxi lines per seed) from the runs' metrics.jsonl, or None without them."""
    if not experiment.fig5 or runs_dir is None:
        return None
    try:
        return tuple([figures.read_metrics(epath.Path(runs_dir) / f"{name}_seed{seed}") for seed in seeds]
                     for name in experiment.fig5)
    except (figures.AnalysisInputError, FileNotFoundError, OSError):
        return None


def write_report(experiment: Experiment, root: str | epath.Path, results: Results, *, seeds: Sequence[int],
                 setting: str, wall_seconds: float, convention: str = comparison.DELTA_M_DEFAULT,
                 runs_dir: str | epath.Path | None = None) -> list[epath.Path]:
    """report.md, summary.json, the Fig. 3 PNG and (when the runs logged gradients and are at hand) the Fig. 5
    PNG in `root`. Without the runs, Fig. 5's numbers come from the previous summary.json and its PNG stays."""
    root = epath.Path(root)
    comparison.delta_m_metrics(convention, experiment.tasks)  # an unknown convention stops before any writing
    results = {run.name: {seed: results[run.name][seed] for seed in seeds} for run in experiment.runs}
    written, figure_files = [], []
    if {"segmentation", "depth"} <= set(experiment.tasks):
        written += figures.save_figure(fig3_intervals(experiment, results), str(root / FIG3_FILE), svg=False)
        figure_files.append(FIG3_FILE)
    previous = json.loads((root / SUMMARY_FILE).read_text()) if (root / SUMMARY_FILE).exists() else {}
    fig5_numbers = previous.get("fig5")
    records = _fig5_records(experiment, runs_dir, seeds)
    if records is not None:
        labels = tuple(experiment.run(name).label for name in experiment.fig5)
        try:
            fig5_numbers = gradients.gradient_numbers(*records)
            written += figures.save_figure(gradients.main_gradient_figure(*records, labels), str(root / FIG5_FILE),
                                           svg=False)
        except figures.AnalysisInputError:
            fig5_numbers = None  # no gradient logs (analysis.grad_log_every_steps=0): no Fig. 5
    if fig5_numbers and (root / FIG5_FILE).exists():
        figure_files.append(FIG5_FILE)
    claims = test_claims(experiment, results)
    record = summary(experiment, results, claims, convention)
    record.update({"experiment": experiment.name, "source": experiment.source, "seeds": list(seeds),
                   "setting": setting, "wall_seconds": wall_seconds, "fig5": fig5_numbers})
    workdir_lib.write_text_atomic(root / SUMMARY_FILE, json.dumps(record, indent=2, allow_nan=True) + "\n")
    text = markdown(experiment, results, claims, record, seeds=seeds, setting=setting, wall_seconds=wall_seconds,
                    convention=convention, fig5_numbers=fig5_numbers, figure_files=figure_files)
    workdir_lib.write_text_atomic(root / REPORT_FILE, text)
    return [epath.Path(path) for path in written] + [root / SUMMARY_FILE, root / REPORT_FILE]
