"""Comparing runs by their metrics: the Δm% conventions against reference results, and the results table.

Works on what `metrics.compute` returns ({task: {metric: float}}), on the host only; kept apart from metrics.py,
which accumulates those values on device. Metric directions and fractions come from `metrics.HIGHER_IS_BETTER`
and `metrics.FRACTION_METRICS`.
"""

import math
from collections.abc import Iterable, Mapping

from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax.metrics import FRACTION_METRICS, HIGHER_IS_BETTER

Results = Mapping[str, Mapping[str, float]]


# Δm% conventions: {convention: {task: metrics}}. The same metric names serve every dataset we build
# (synthetic_scenes, nyu_v2, sunrgbd); a dataset without a task simply drops that task's entry.
DELTA_M_METRICS: dict[str, dict[str, tuple[str, ...]]] = {
    # LibMTL (`LibMTL/utils.py: count_improvement`, NYUv2 and Cityscapes metric lists): mean within each task,
    # then over tasks, so each task weighs the same whatever its number of metrics.
    'per_task': {'segmentation': ('miou', 'pixel_acc'), 'depth': ('abs_err', 'rel_err'),
                 'normal': ('mean', 'median', 'within_11.25', 'within_22.5', 'within_30')},
    # mtan / CAGrad / Nash-MTL / FAMO (`delta_stats` of their NYUv2 trainers): one mean over this fixed list.
    'metric_set': {'segmentation': ('miou', 'pixel_acc'), 'depth': ('abs_err', 'rel_err'),
                   'normal': ('mean', 'median', 'within_11.25', 'within_22.5', 'within_30')},
    # One metric per task (Maninis et al. 2019; Vandenhende et al. 2021 on NYUD-v2: mIoU, depth RMSE, normal
    # mean angle error).
    'headline': {'segmentation': ('miou',), 'depth': ('rms',), 'normal': ('mean',)},
}
DELTA_M_CONVENTIONS = tuple(DELTA_M_METRICS)
DELTA_M_DEFAULT = 'per_task'


def delta_m_metrics(convention: str, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{task: metrics} that Δm% in `convention` uses for `tasks`."""
    if convention not in DELTA_M_METRICS:
        raise ValueError(f'delta_m: convention={convention!r}; expected one of {", ".join(DELTA_M_CONVENTIONS)}')
    return {task: DELTA_M_METRICS[convention][task] for task in tasks if task in DELTA_M_METRICS[convention]}


def describe_delta_m(convention: str, tasks: Iterable[str]) -> str:
    """One line naming the convention and its metric set, for report headers."""
    metric_set = delta_m_metrics(convention, tasks)
    how = {'per_task': 'mean over each task\'s metrics, then over tasks (LibMTL count_improvement)',
           'metric_set': 'one mean over the metric list (mtan / CAGrad / Nash-MTL / FAMO)',
           'headline': 'one metric per task (Maninis et al. 2019; Vandenhende et al. 2021)'}[convention]
    listed = '; '.join(f'{task}: {", ".join(metrics)}' for task, metrics in metric_set.items())
    return f'Δm% convention `{convention}`: {how}, over {listed}; positive = better than the reference'


def delta_m(results: Results, references: Results, convention: str = DELTA_M_DEFAULT) -> float:
    """Δm% of `results` against `references` (e.g. single-task runs): positive means better.

    Each term is s (M - R) / R * 100 with s = +1 where higher is better and -1 where lower is better (Maninis
    et al. 2019). `convention` picks the terms and how they are averaged (`DELTA_M_METRICS`):
    - 'per_task': the mean over each task's metrics, then the mean over tasks (LibMTL);
    - 'metric_set': the mean over one fixed metric list (mtan, CAGrad, Nash-MTL and FAMO, whose code prints the
      negative, lower-is-better value);
    - 'headline': one metric per task, averaged over tasks.
    Tasks are those `results` and `references` share; every metric the convention names for them must be there.
    """
    shared = [task for task in results if task in references]
    metric_set = delta_m_metrics(convention, shared)
    if not metric_set:
        raise ValueError(f'delta_m: results and references share no task of convention {convention!r} (results: '
                         f'{_metric_names(results)}; references: {_metric_names(references)})')
    per_task = {}
    for task, metrics in metric_set.items():
        per_task[task] = []
        for metric in metrics:
            if metric not in results[task] or metric not in references[task]:
                raise ValueError(f'delta_m: convention {convention!r} needs {task}/{metric}, missing from the '
                                 f'{"results" if metric not in results[task] else "references"}; expected every '
                                 f'metric of {", ".join(metrics)}')
            value, reference = results[task][metric], references[task][metric]
            if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
                raise ValueError(f'delta_m: {task}/{metric} needs finite values and a non-zero reference, '
                                 f'got result {value!r} and reference {reference!r}')
            sign = 1.0 if _higher_is_better(task, metric) else -1.0
            per_task[task].append(sign * (value - reference) / reference * 100.0)
    if convention == 'metric_set':
        terms = [term for task_terms in per_task.values() for term in task_terms]
        return float(sum(terms) / len(terms))
    return float(sum(sum(terms) / len(terms) for terms in per_task.values()) / len(per_task))


def format_table(rows: Mapping[str, Results], references: Results | None = None) -> str:
    """Fixed-width table: one row per run, one column per task/metric (arrow = better direction), Δm% if given.

    Fractions are printed as percentages, depth errors in metres (4 decimals), angles in degrees. A metric a run
    does not have is shown as '-'; so is Δm% (the `per_task` convention) for a run sharing no task with `references`.
    """
    columns = _table_columns(rows)
    groups: dict[str, list[tuple[str, list[str]]]] = {}
    for task, metric in columns:
        arrow = '↑' if _higher_is_better(task, metric) else '↓'
        header = f'{metric}{"%" if metric in FRACTION_METRICS else ""}{arrow}'
        cells = [_format_value(metric, results.get(task, {}).get(metric)) for results in rows.values()]
        groups.setdefault(task, []).append((header, cells))
    if references is not None:
        cells = [_format_delta_m(results, references) for results in rows.values()]
        groups[f'Δm% ({DELTA_M_DEFAULT}) vs reference'] = [('Δm%↑', cells)]
    return _render(list(rows), groups)


def _higher_is_better(task: str, metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER.get(task, {}):
        raise ValueError(f'unknown metric {task}/{metric}; known: {_metric_names(HIGHER_IS_BETTER)}')
    return HIGHER_IS_BETTER[task][metric]


def _metric_names(results: Results) -> list[str]:
    return [f'{task}/{metric}' for task, metrics in results.items() for metric in metrics]


def _table_columns(rows: Mapping[str, Results]) -> list[tuple[str, str]]:
    """(task, metric) pairs present in any row, in TASK_NAMES / HIGHER_IS_BETTER order."""
    present = {(task, metric) for results in rows.values() for task, metrics in results.items() for metric in metrics}
    for task, metric in sorted(present):
        _higher_is_better(task, metric)
    return [(task, metric) for task in tasks_lib.TASK_NAMES for metric in HIGHER_IS_BETTER[task]
            if (task, metric) in present]


def _format_value(metric: str, value: float | None) -> str:
    if value is None:
        return '-'
    if metric in FRACTION_METRICS:
        return f'{100.0 * value:.2f}'
    if metric in ('abs_err', 'rel_err', 'rms'):
        return f'{value:.4f}'
    return f'{value:.2f}'


def _format_delta_m(results: Results, references: Results) -> str:
    """Δm% (the default convention) of a run, or '-' where it shares no task with the references."""
    if not delta_m_metrics(DELTA_M_DEFAULT, [task for task in results if task in references]):
        return '-'
    return f'{delta_m(results, references):+.2f}'


def _render(run_names: list[str], groups: dict[str, list[tuple[str, list[str]]]]) -> str:
    """Two header lines (task, then metric) above one line per run; task groups separated by ' | '."""
    name_width = max([len('run'), *(len(name) for name in run_names)])
    task_line, metric_line = ['run'.ljust(name_width)], [''.ljust(name_width)]
    body = [[name.ljust(name_width)] for name in run_names]
    for task, columns in groups.items():
        widths = [max(len(header), *(len(cell) for cell in cells)) for header, cells in columns]
        shortfall = len(task) - (sum(widths) + 2 * (len(widths) - 1))
        if shortfall > 0:
            widths[-1] += shortfall
        task_line.append(task.ljust(sum(widths) + 2 * (len(widths) - 1)))
        metric_line.append('  '.join(header.rjust(width) for (header, _), width in zip(columns, widths)))
        for row_index, row in enumerate(body):
            row.append('  '.join(cells[row_index].rjust(width) for (_, cells), width in zip(columns, widths)))
    lines = [task_line, metric_line]
    rule = '-+-'.join('-' * len(part) for part in task_line)
    return '\n'.join([' | '.join(lines[0]), ' | '.join(lines[1]), rule, *(' | '.join(row) for row in body)])
