"""After a NaN/Inf stop: which kept checkpoint is from before the run began to diverge, judged against the run's
own history, and the advice that follows from it.

A finite checkpoint is not necessarily a good one: a run whose learning rate is too high usually spends a few
steps or logs blowing up (loss x1e3, weights x1e6) before the first NaN, and its last checkpoints, though finite,
fail again a step after resuming even at a lower learning rate. Two signs mark the divergence, each a *sustained*
rise (a spike the run recovered from is not one), each with a named threshold:

- **Loss.** The main loss of a log (the sum of the unweighted main-task losses `loss/<task>`, each >= 0, so
  learned loss weights and their negative log-variance terms do not enter) rises above `LOSS_RISE_LIMIT` x the
  lowest main loss logged before it, and stays above until the stop. A healthy run's logged loss falls, and
  even its per-step loss at four times the usual learning rate (and batches of 4) stayed within 2.8x of its
  running minimum in 16 steps (lr 10 on the runlocal config; a single spike of 6.4x at lr 3 came straight back),
  while a diverging run's rose 30x in one step and kept rising (lr 100: 5.8 -> 187 -> ... -> 1e15, then NaN).
  The loss a log records is measured on the parameters of the steps before it: a log that averages the steps
  w..r measures checkpoints w-1..r-1, so every checkpoint from w-1 of the first risen log on is suspect.
- **Parameter norm.** The global L2 norm of the parameters at a checkpoint (logged in metrics.jsonl as a
  `checkpoint` record when it is saved) exceeds `NORM_GROWTH_LIMIT` x the norm at the run's first checkpoint, and
  stays above. With BatchNorm most weights are scale-invariant and their norm grows with the learning rate
  without harm (4.8x over 16 steps at lr 1, 5.5x at lr 10), so only a far larger growth counts; the diverging run
  above went from 1.6e4 to 6e6 within four steps, and on to 7e10 (its loss had risen three steps before).

The first checkpoint, not the initial state, is the norm's reference because it always exists in the history
(the initial norm was never logged by older runs) and the loss criterion already catches a run that diverges
within its first checkpoint interval. A non-finite loss itself is not a sign against the checkpoint before it:
with no rise before it, a sudden NaN is more often a bad batch or a numerical corner than a diverged state.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from etils import epath

from auxmtl_jax import disk

LOSS_RISE_LIMIT = 4.0  # a main loss above this many times the lowest one logged before it has risen
NORM_GROWTH_LIMIT = 10.0  # a parameter norm above this many times the first checkpoint's has grown
LR_REDUCTION = 10.0  # the advice: continue (or start over) at the learning rate divided by this
CHECKPOINT_KIND = "checkpoint"  # metrics.jsonl records `{"step", "kind": "checkpoint", "param_norm"}`
PARAM_NORM = "param_norm"


@jax.jit
def _global_norm(params) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(params)))


def param_norm(params) -> float:
    """The global L2 norm of a parameter tree (one device reduction)."""
    return float(jax.device_get(_global_norm(params)))


def main_loss(values: Mapping[str, Any], tasks: Sequence[str]) -> float | None:
    """The sum of the main-task losses `loss/<task>` of one log or step; None when one is missing."""
    try:
        return float(sum(float(values[f"loss/{task}"]) for task in tasks))
    except (KeyError, TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Measure:
    """A main loss measured over the steps `first`..`last` (a log's window, or one step)."""

    first: int
    last: int
    value: float


def loss_history(records: Iterable[Mapping[str, Any]], window: Sequence[tuple[int, Mapping[str, Any]]],
                 tasks: Sequence[str]) -> list[Measure]:
    """The run's main losses in step order: its train logs (each over the steps since the previous one), then
    the steps not logged yet (`window`: (step, metrics)), up to the first non-finite one."""
    measures, previous = [], 0
    logged = sorted((int(record["step"]), record) for record in records if record.get("kind") == "train")
    for step, record in logged:
        value = main_loss(record, tasks)
        if value is not None and math.isfinite(value):
            measures.append(Measure(previous + 1, step, value))
        previous = step
    for step, values in window:
        if step <= previous:
            continue
        value = main_loss(values, tasks)
        if value is None or not math.isfinite(value):
            break
        measures.append(Measure(step, step, value))
    return measures


def norm_history(records: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """(step, parameter norm) of every checkpoint the run logged, in step order."""
    return sorted((int(record["step"]), float(record[PARAM_NORM])) for record in records
                  if record.get("kind") == CHECKPOINT_KIND and PARAM_NORM in record)


def sustained_rise(values: Sequence[float], limit: float, *, baseline: str) -> int | None:
    """The index where the final sustained rise of `values` begins: the earliest i >= 1 from which every value
    exceeds `limit` x the baseline before i ('min': the lowest of values[:i]; 'first': values[0]); None if the
    last value has not risen."""
    prefix_min = list(itertools.accumulate(values, min))
    onset, lowest_after = None, math.inf
    for i in range(len(values) - 1, 0, -1):
        lowest_after = min(lowest_after, values[i])
        if lowest_after > limit * (prefix_min[i - 1] if baseline == "min" else values[0]):
            onset = i
        else:
            break
    return onset


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Which kept checkpoints are from before the divergence began (`healthy`) and which after (`diverged`)."""

    healthy: tuple[int, ...]
    diverged: tuple[int, ...]
    reason: str | None  # what marks the divergence, None when there is no sign of one

    @property
    def resume_step(self) -> int | None:
        return self.healthy[-1] if self.healthy else None


def judge(kept_steps: Iterable[int], losses: Sequence[Measure], norms: Sequence[tuple[int, float]]) -> Verdict:
    """Splits `kept_steps` at the first step a sustained loss rise or parameter-norm growth makes suspect."""
    bound, reasons = math.inf, []
    onset = sustained_rise([measure.value for measure in losses], LOSS_RISE_LIMIT, baseline="min")
    if onset is not None:
        risen, lowest = losses[onset], min(measure.value for measure in losses[:onset])
        bound = min(bound, risen.first - 1)
        reasons.append(f"the loss began to diverge at step {risen.last} (main loss {risen.value:.4g} > "
                       f"{LOSS_RISE_LIMIT:g} x its minimum {lowest:.4g} before, and above that until the stop), so "
                       f"every checkpoint from step {risen.first - 1} on is suspect")
    onset = sustained_rise([norm for _, norm in norms], NORM_GROWTH_LIMIT, baseline="first")
    if onset is not None:
        step, norm = norms[onset]
        if step < bound:
            bound = step
            reasons.insert(0, f"the parameter norm grew to {norm:.3g} at step {step}, > {NORM_GROWTH_LIMIT:g} x "
                              f"{norms[0][1]:.3g} at the first checkpoint (step {norms[0][0]}), and stayed there")
    kept = sorted(set(int(step) for step in kept_steps))
    return Verdict(tuple(step for step in kept if step < bound), tuple(step for step in kept if step >= bound),
                   "; ".join(reasons) or None)


def read_records(workdir: epath.Path, metrics_file: str) -> list[dict]:
    """The parsable lines of WORKDIR/metrics.jsonl with a step ([] when there is none, e.g. on a host that does not
    write it)."""
    return [record for record in disk.read_json_lines(epath.Path(workdir) / metrics_file)
            if isinstance(record.get("step"), int)]


def lower_learning_rate(learning_rate: float) -> str:
    return f"{learning_rate / LR_REDUCTION:.3g}"


def with_accepted_key(accepted: str | None, key: str) -> str:
    """`config.accept_changed_keys` with `key` added (kept as it is when it already accepts it)."""
    parts = [part.strip() for part in (accepted or "").split(",") if part.strip()]
    if any(part == key or (part.endswith(".") and key.startswith(part)) for part in parts):
        return ",".join(parts)
    return ",".join([*parts, key])


def advice(verdict: Verdict, *, workdir: epath.Path, learning_rate: float, accepted: str | None,
           moved_to: epath.Path | None) -> str:
    """What the NaN stop's message says after 'training stopped': the checkpoint to continue from and the exact
    flags, or that the run must start over and why."""
    new_lr = lower_learning_rate(learning_rate)
    moved = (f"; checkpoint(s) {list(verdict.diverged)} were moved to {moved_to}" if verdict.diverged and moved_to
             else "")
    if verdict.resume_step is not None:
        why = (f"{verdict.reason}{moved}. The last checkpoint from before it is step {verdict.resume_step}"
               if verdict.reason else
               f"the last checkpoint, step {verdict.resume_step}, shows no sign of divergence (main loss within "
               f"{LOSS_RISE_LIMIT:g} x its minimum, parameter norm within {NORM_GROWTH_LIMIT:g} x the first "
               "checkpoint's)")
        return (f"{why}. Continue from it at a lower learning rate (here divided by {LR_REDUCTION:g}; or check the "
                f"data): re-run the same command with --config.optimizer.learning_rate={new_lr} "
                f"--config.accept_changed_keys={with_accepted_key(accepted, 'optimizer.learning_rate')}.")
    start_over = (f"re-run the same command with --config.optimizer.learning_rate={new_lr} (divided by "
                  f"{LR_REDUCTION:g}; it starts from step 0 in {workdir}, or use a fresh --workdir)")
    if not verdict.diverged:
        return f"no checkpoint was saved, so the run must start over: {start_over}."
    return (f"every kept checkpoint is from after the divergence began: {verdict.reason}{moved}. The run must start "
            f"over: {start_over}; to keep one from before a divergence, save checkpoints more often "
            "(config.checkpoint_every_steps) or keep more (config.max_checkpoints_to_keep).")
