"""Which test metrics a run reports, chosen without looking at the test set.

Three rules, all recorded in results.json whatever `evaluation.report` puts under "metrics":

* ``final``: the test metrics at the last step.
* ``last_mean``: the mean of the test metrics of the last K evaluations (`evaluation.average_last`; mtan, Nash-MTL
  and FAMO report the last 10 epochs).
* ``selected``: the test metrics at the step whose `dataset.validation_split` evaluation was best by
  `evaluation.select_by`. With a validation split the periodic evaluations run on it; the test split is read only at
  the last K evaluation steps, at the end, and once more for the selected step's weights (kept in
  WORKDIR/selected_checkpoints), so no choice is ever made on test.
"""

from __future__ import annotations

import logging
import math
import types
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import comparison
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import UserError

log = logging.getLogger("auxmtl_jax")

REPORT_RULES = ("final", "last_mean", "selected")
DELTA_M_CRITERION = "delta_m"
EVAL_KIND = "eval"  # metrics.jsonl lines of test-split evaluations
VALIDATION_KIND = "validation"  # metrics.jsonl lines of validation-split evaluations


class EvaluationPlan(NamedTuple):
    """The evaluation settings of a run, resolved: when each split is read and what results.json reports."""

    reduction: str
    average_last: int
    select_by: str
    report: str
    validation_split: str | None
    eval_steps: tuple[int, ...]  # the periodic evaluation steps (the last step included)

    @property
    def last_steps(self) -> tuple[int, ...]:
        return self.eval_steps[-self.average_last:]

    def reads_test_at(self, step: int) -> bool:
        """Whether the periodic evaluation of `step` reads the test split (always, without a validation split)."""
        return self.validation_split is None or step in self.last_steps


def evaluation_steps(num_train_steps: int, eval_every_steps: int) -> tuple[int, ...]:
    steps = list(range(eval_every_steps, num_train_steps + 1, eval_every_steps))
    if not steps or steps[-1] != num_train_steps:
        steps.append(num_train_steps)
    return tuple(steps)


def evaluation_plan(config) -> EvaluationPlan:
    """`config.evaluation` and `dataset.validation_split` checked and resolved; one UserError per bad value."""
    evaluation = config.get("evaluation") or types.SimpleNamespace()
    reduction = getattr(evaluation, "reduction", "per_pixel")
    if reduction not in metrics_lib.REDUCTIONS:
        raise UserError(f"config.evaluation.reduction={reduction!r}; expected one of "
                        f"{', '.join(metrics_lib.REDUCTIONS)}.")
    steps = evaluation_steps(config.num_train_steps, config.eval_every_steps)
    average_last = getattr(evaluation, "average_last", 1)
    if isinstance(average_last, bool) or not isinstance(average_last, int) or average_last < 1:
        raise UserError(f"config.evaluation.average_last={average_last!r}; expected a positive integer.")
    if average_last > len(steps):
        raise UserError(f"config.evaluation.average_last={average_last} but the run evaluates only {len(steps)} "
                        f"times (config.num_train_steps={config.num_train_steps}, config.eval_every_steps="
                        f"{config.eval_every_steps}); expected at most {len(steps)}.")
    validation = config.dataset.get("validation_split") or None
    if validation is not None and not isinstance(validation, str):
        raise UserError(f"config.dataset.validation_split={validation!r}; expected a split such as 'train[90%:]'.")
    select_by = getattr(evaluation, "select_by", DELTA_M_CRITERION)
    criterion_from(select_by, tuple(config.tasks))
    report = getattr(evaluation, "report", None)
    if report is None:
        report = "selected" if validation else "last_mean" if average_last > 1 else "final"
    if report not in REPORT_RULES:
        raise UserError(f"config.evaluation.report={report!r}; expected one of {', '.join(REPORT_RULES)} (or None).")
    if report == "selected" and not validation:
        raise UserError("config.evaluation.report='selected' needs config.dataset.validation_split (e.g. "
                        "--config.dataset.train_split='train[:90%]' --config.dataset.validation_split='train[90%:]').")
    if report == "last_mean" and average_last < 2:
        raise UserError("config.evaluation.report='last_mean' needs config.evaluation.average_last > 1 (mtan-family "
                        f"papers use 10); it is {average_last}.")
    return EvaluationPlan(reduction, average_last, select_by, report, validation, steps)


def check_disjoint_splits(dataset_cfg, split_sizes: Mapping[str, int]) -> None:
    """The validation split shares no example with the train split or the test split (one line naming both)."""
    validation = dataset_cfg.get("validation_split")
    if not validation:
        return
    validation_ranges = _absolute_ranges(validation, split_sizes, "config.dataset.validation_split")
    for key in ("train_split", "eval_split"):
        other = dataset_cfg.get(key)
        for name, start, stop in _absolute_ranges(other, split_sizes, f"config.dataset.{key}"):
            for v_name, v_start, v_stop in validation_ranges:
                if name == v_name and max(start, v_start) < min(stop, v_stop):
                    shared = (max(start, v_start), min(stop, v_stop))
                    advice = ("e.g. --config.dataset.train_split='train[:90%]' "
                              "--config.dataset.validation_split='train[90%:]' (TFDS rounds 'train[-10%:]' to one "
                              "example more than 'train[90%:]')") if key == "train_split" else "never the test split"
                    which = (f"example {shared[0]}" if shared[1] - shared[0] == 1
                             else f"examples {shared[0]} to {shared[1] - 1}")
                    raise UserError(f"config.dataset.validation_split={validation!r} shares {which} of split "
                                    f"{name!r} with config.dataset.{key}={other!r}; "
                                    f"expected disjoint splits, {advice}.")


def _absolute_ranges(spec: str, split_sizes: Mapping[str, int], key: str) -> list[tuple[str, int, int]]:
    import tensorflow_datasets as tfds
    infos = {name: types.SimpleNamespace(num_examples=size) for name, size in split_sizes.items()}
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
    except (ValueError, KeyError, AssertionError, AttributeError) as error:
        raise UserError(f"{key}={spec!r} is not a valid split ({error}); expected one of "
                        f"{', '.join(sorted(split_sizes))}, optionally sliced ('train[90%:]').") from None
    return [(i.splitname, i.from_ or 0, split_sizes[i.splitname] if i.to is None else i.to) for i in instructions]


class Criterion(NamedTuple):
    """A validation score, higher = better: Δm% or one signed metric."""

    name: str
    task: str | None
    metric: str | None

    def describe(self, reference_source: str) -> str:
        if self.task is None:
            return (f"Δm% ({comparison.DELTA_M_DEFAULT}) on the validation split against {reference_source}, "
                    "higher is better")
        better = "higher" if metrics_lib.HIGHER_IS_BETTER[self.task][self.metric] else "lower"
        return f"{self.task}/{self.metric} on the validation split, {better} is better"

    def score(self, results: Mapping[str, Mapping[str, float]], reference) -> float:
        """The score of `results`; NaN (never selected) when a value is missing or not finite."""
        try:
            if self.task is None:
                value = comparison.delta_m(results, reference)
            else:
                value = float(results[self.task][self.metric])
                value = value if metrics_lib.HIGHER_IS_BETTER[self.task][self.metric] else -value
        except (KeyError, ValueError, ZeroDivisionError):
            return math.nan
        return value if math.isfinite(value) else math.nan


def criterion_from(select_by: str, tasks: Sequence[str]) -> Criterion:
    if select_by == DELTA_M_CRITERION:
        return Criterion(select_by, None, None)
    task, _, metric = str(select_by).partition("/")
    if task not in tasks or metric not in metrics_lib.HIGHER_IS_BETTER.get(task, {}):
        choices = [f"{t}/{m}" for t in tasks for m in metrics_lib.HIGHER_IS_BETTER.get(t, {})]
        raise UserError(f"config.evaluation.select_by={select_by!r}; expected {DELTA_M_CRITERION!r} or one of "
                        f"{', '.join(choices)}.")
    return Criterion(select_by, task, metric)


def mean_results(evaluations: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The metric-wise mean of several {task: {metric: value}} results (mtan's 'average of the last K epochs')."""
    return {task: {metric: float(np.mean([e[task][metric] for e in evaluations])) for metric in values}
            for task, values in evaluations[0].items()}


def unflatten_results(record: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """A metrics.jsonl evaluation line {"task/metric": v, ...} back to {task: {metric: v}}."""
    results: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            results.setdefault(task, {})[metric] = float(value)
    return results


class Selection:
    """Tracks the best validation evaluation and keeps `main` of its step in WORKDIR/selected_checkpoints.

    A new best is saved at once. Older bests are deleted only when no kept regular checkpoint could resume to a
    point before the newer one, so a run resumed from any kept checkpoint still finds the best up to it.
    """

    def __init__(self, plan: EvaluationPlan, workdir: epath.Path, references, tasks: Sequence[str]):
        self.criterion = criterion_from(plan.select_by, tasks)
        self.plan, self.workdir = plan, epath.Path(workdir)
        self._references = references
        self.reference_source = ("config.reference_results" if references is not None
                                 else "the first validation evaluation")
        self.best: tuple[int, float, dict] | None = None  # (step, score, validation results)
        self.scores: list[tuple[int, float]] = []
        self.checkpointer = checkpoint_lib.Checkpointer(
            self.workdir, folders=(workdir_lib.SELECTED_DIR, workdir_lib.SELECTED_INTEGRITY_DIR))

    def _score(self, results) -> float:
        if self._references is None and self.criterion.task is None:
            self._references = results  # the first validation evaluation normalises Δm%
        return self.criterion.score(results, self._references)

    def resume(self, start_step: int, logged: Mapping[int, dict]) -> None:
        """Rebuilds the best up to `start_step` from the logged validation lines; drops candidates saved after it."""
        for step in sorted(logged):
            if step <= start_step:
                self._consider(step, logged[step])
        for step in self.checkpointer.all_steps():
            if step > start_step:
                self.checkpointer.delete(step)
        if self.best is not None and self.best[0] not in self.checkpointer.all_steps():
            raise UserError(f"{self.workdir / workdir_lib.SELECTED_DIR} lacks step {self.best[0]}, the best on "
                            f"validation up to the resumed step {start_step} (metrics.jsonl); the selection cannot "
                            "be continued. Train again in a fresh --workdir.")

    def _consider(self, step: int, results: dict) -> bool:
        score = self._score(results)
        self.scores.append((step, score))
        if math.isnan(score) or (self.best is not None and score <= self.best[1]):
            return False
        self.best = (step, score, results)
        return True

    def after_validation(self, step: int, results: dict, variables, oldest_resumable_step: int | None) -> None:
        """Records a validation evaluation; saves `variables` when it is the best so far, then prunes."""
        if self._consider(step, results):
            self.checkpointer.save(step, variables, {"score": self.best[1]})
            self.checkpointer.wait()
            log.info("step %d is the best on validation so far (%s = %.6g)", step, self.criterion.name, self.best[1])
        self.prune(oldest_resumable_step)

    def prune(self, oldest_resumable_step: int | None) -> None:
        """Deletes candidates older than the best up to `oldest_resumable_step` (all but the best when None)."""
        steps = self.checkpointer.all_steps()
        if oldest_resumable_step is None:
            keep_from = self.best[0] if self.best else None
        else:
            earlier = [step for step in steps if step <= oldest_resumable_step]
            keep_from = max(earlier) if earlier else None
        if keep_from is None:
            return
        for step in steps:
            if step < keep_from:
                self.checkpointer.delete(step)

    def restore_best(self, target_variables) -> Any:
        variables, _ = self.checkpointer.restore(self.best[0], target_variables)
        return variables

    def record(self, test_results: dict, test_read_at: int) -> dict:
        step, score, validation = self.best
        return {"split": self.plan.validation_split, "criterion": self.criterion.name,
                "criterion_description": self.criterion.describe(self.reference_source),
                "step": step, "score": score, "validation": validation, "test": test_results,
                "test_read_at_step": test_read_at, "evaluations": len(self.scores)}

    def close(self) -> None:
        self.checkpointer.close()


def report_record(plan: EvaluationPlan, *, final: dict, num_train_steps: int, last_mean: dict | None,
                  selection: dict | None, test_read_at: Sequence[int]) -> dict:
    """The results.json fields that say which evaluation "metrics" holds and how every metric was reduced."""
    reported = {"final": final, "last_mean": last_mean, "selected": selection and selection["test"]}[plan.report]
    descriptions = {
        "final": f"the test metrics at the last step ({num_train_steps})",
        "last_mean": f"the mean of the test metrics of the last {plan.average_last} evaluations (steps "
                     f"{', '.join(map(str, plan.last_steps))})",
        "selected": (f"the test metrics at step {selection['step']}, the best on validation split "
                     f"{plan.validation_split!r} by {selection['criterion_description']}" if selection else ""),
    }
    record = {"metrics": reported, "report": plan.report, "report_description": descriptions[plan.report],
              "reduction": plan.reduction, "reduction_description": metrics_lib.describe_reduction(plan.reduction),
              "final": {"step": int(num_train_steps), "metrics": final},
              "test_read_at_steps": sorted(set(int(step) for step in test_read_at))}
    if last_mean is not None:
        record["last_mean"] = {"k": plan.average_last, "steps": list(plan.last_steps), "metrics": last_mean}
    if selection is not None:
        record["selection"] = selection
    return record
