"""Streaming evaluation metrics for the dense-prediction tasks, accumulated on device.

This module only measures runs; comparing them (Δm% against reference results, the results table) is
comparison.py, on the Python floats `compute` returns.

`init_state` makes zeroed sums / counts / histograms, the jit-able `update_state` adds one global batch (ignore and
invalid pixels excluded), and `compute` turns the state into plain Python floats on the host.

Two reductions for the depth and normal metrics (`REDUCTIONS`; `init_state(..., reduction=...)` picks one, the state
remembers it by which keys it holds, and `describe_reduction` gives a line for reports):
- 'per_pixel' (the default, ours): every metric is a per-pixel statistic over the whole evaluation set, so
  streaming any split of the data into batches gives the same result. This is what LibMTL does
  (examples/nyu/utils.py: `DepthMetric.score_fun` weights each batch's mean error by its number of valid pixels;
  `NormalMetric.score_fun` concatenates every pixel's angle before np.mean / np.median).
- 'per_batch' (mtan, lorenmt/mtan im2im_pred/utils.py, and the NYUv2 trainers of Nash-MTL, CAGrad and FAMO that
  copied it): `depth_error` / `normal_error` give each test batch's value over that batch's valid pixels (mean
  error; np.mean, np.median and fractions of the batch's angles), and the trainer reports
  `avg_cost += cost / test_batch`, the plain mean over batches. Here each `update_state` call (one global batch)
  adds its batch value for abs_err, rel_err, rms (sqrt of the batch's mean squared error), delta1-3, mean, median
  (exact: the mean of the two middle angles for an even count, like np.median) and within_*; a batch without a
  single valid pixel for a task is not counted for it (mtan would divide by zero), and `compute` returns the mean
  over the counted batches. The results depend on the batch size (mtan evaluates NYUv2 in batches of 2).
Segmentation is the same in both: a confusion matrix over the whole set (as mtan's and LibMTL's ConfMatrix /
SegMetric).

Conventions:
- Segmentation: confusion matrix over pixels whose label is a class id in [0, num_classes) (255 and any other
  out-of-range label are ignored); the prediction is the arg-max of the logits. `miou` averages the per-class IoU
  over the classes present in the ground truth OR the prediction (classes with an empty union are left out, the
  common convention); `pixel_acc` is the fraction of correctly labelled pixels.
- Depth, on pixels with label depth d* > 0 (mtan and LibMTL: label != 0, the same for depth maps without negative
  values): `abs_err` = mean |d - d*| (metres), `rel_err` = mean |d - d*| / d*,
  `rms` = sqrt(mean (d - d*)^2), `delta<k>` = fraction with max(d/d*, d*/d) < 1.25^k; a prediction d <= 0 never
  counts as within a delta threshold.
- Normals, on pixels whose label is not all-zero (mtan and LibMTL: the label's components do not sum to 0, which
  also drops the rare unit normals with x + y + z = 0): the angle between prediction and label in degrees (both
  re-normalised); `mean`, `median`, and `within_<t>` = fraction of angles < t. The per_pixel median comes from a
  histogram of ANGLE_BIN_DEGREES-wide bins, interpolated inside its bin, so it is within one bin width (0.01
  degrees) of the exact median; the per_batch median is exact for each batch.
- Fractions (miou, pixel_acc, delta*, within_*; `FRACTION_METRICS`) stay fractions in `compute`;
  `comparison.format_table` prints them as %. `HIGHER_IS_BETTER` gives each metric's better direction.
- A task without a single valid pixel in the whole state (per_batch: without a counted batch) gives NaN for its
  metrics.

Counts are exact: each is kept as two int32 words (high * 2**20 + low), so a state can hold far more than 2**31
pixels without x64. Float sums (per_batch: the sums of batch values) use compensated (Neumaier) summation across
batches.
"""

import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from auxmtl_jax import tasks as tasks_lib

ANGLE_BIN_DEGREES = 0.01
NUM_ANGLE_BINS = 18000
DEPTH_DELTA_BASE = 1.25
NORMAL_ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
_COUNTER_LOW_BITS = 20
REDUCTIONS = ('per_pixel', 'per_batch')
REDUCTION_DEFAULT = 'per_pixel'
_REDUCTION_DESCRIPTIONS = {
    'per_pixel': 'per_pixel: every depth/normal metric pooled over all valid pixels of the split (LibMTL, ours)',
    'per_batch': 'per_batch: each depth/normal metric computed over each batch\'s valid pixels, then averaged over '
                 'batches (mtan, Nash-MTL, CAGrad, FAMO)',
}

HIGHER_IS_BETTER: dict[str, dict[str, bool]] = {
    'segmentation': {'miou': True, 'pixel_acc': True},
    'depth': {'abs_err': False, 'rel_err': False, 'rms': False, 'delta1': True, 'delta2': True, 'delta3': True},
    'normal': {'mean': False, 'median': False, 'within_11.25': True, 'within_22.5': True, 'within_30': True},
}
FRACTION_METRICS = frozenset({'miou', 'pixel_acc', 'delta1', 'delta2', 'delta3',
                              'within_11.25', 'within_22.5', 'within_30'})


def init_state(tasks: Iterable[str], num_classes: int | None = None, reduction: str = REDUCTION_DEFAULT) -> dict:
    """Zeroed metric state for `tasks` (a pytree of jnp arrays); segmentation needs `num_classes`.

    `reduction` ('per_pixel' or 'per_batch', see the module docstring) decides the depth and normal entries: a
    per_batch entry holds sums of batch values and a `batches` count instead of pixel sums and a `pixels` count.
    """
    _check_reduction(reduction, 'metrics.init_state')
    tasks = tuple(tasks)
    tasks_lib.validate_tasks(tasks, what='metrics.init_state(tasks)')
    state = {}
    if 'segmentation' in tasks:
        classes = tasks_lib.output_channels('segmentation', num_classes)
        state['segmentation'] = {'confusion': _zero_counter((classes, classes))}
    per_batch = reduction == 'per_batch'
    if 'depth' in tasks and per_batch:
        state['depth'] = {'batch_abs_err': _zero_sum(), 'batch_rel_err': _zero_sum(), 'batch_rms': _zero_sum(),
                          'batch_within_delta': _zero_sum((3,)), 'batches': _zero_counter(())}
    elif 'depth' in tasks:
        state['depth'] = {'abs_err': _zero_sum(), 'rel_err': _zero_sum(), 'squared_err': _zero_sum(),
                          'pixels': _zero_counter(()), 'within_delta': _zero_counter((3,))}
    if 'normal' in tasks and per_batch:
        state['normal'] = {'batch_mean': _zero_sum(), 'batch_median': _zero_sum(),
                           'batch_within_angle': _zero_sum((len(NORMAL_ANGLE_THRESHOLDS),)),
                           'batches': _zero_counter(())}
    elif 'normal' in tasks:
        state['normal'] = {'angle': _zero_sum(), 'pixels': _zero_counter(()),
                           'within_angle': _zero_counter((len(NORMAL_ANGLE_THRESHOLDS),)),
                           'angle_histogram': _zero_counter((NUM_ANGLE_BINS,))}
    return state


def describe_reduction(reduction: str) -> str:
    """One line naming the reduction and who uses it, for reports and results.json."""
    _check_reduction(reduction, 'metrics.describe_reduction')
    return _REDUCTION_DESCRIPTIONS[reduction]


def _check_reduction(reduction: str, where: str) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f'{where}: reduction={reduction!r}; expected one of {", ".join(map(repr, REDUCTIONS))}')


def update_state(state: dict, predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
    """Adds one (global) batch to every task in `state`; extra prediction or batch keys are not used. Jit-able."""
    missing = [task for task in state if task not in predictions or task not in batch]
    if missing:
        raise KeyError(f'metrics.update_state: the state tracks {sorted(state)} but {missing} is missing from '
                       f'the predictions {sorted(predictions)} or the batch {sorted(batch)}')
    updaters = {'segmentation': _update_segmentation, 'depth': _update_depth, 'normal': _update_normal}
    per_batch_updaters = {'depth': _update_depth_per_batch, 'normal': _update_normal_per_batch}
    new_state = {}
    for task, task_state in state.items():
        prediction, label = predictions[task], batch[task]
        tasks_lib.check_prediction_shape(task, prediction, label)
        updater = per_batch_updaters[task] if 'batches' in task_state else updaters[task]
        new_state[task] = updater(task_state, prediction.astype(jnp.float32), label)
    return new_state


def compute(state: dict) -> dict[str, dict[str, float]]:
    """Host side: {task: {metric: Python float}} from an accumulated state."""
    host_state = jax.device_get(state)
    computers = {'segmentation': _segmentation_results, 'depth': _depth_results, 'normal': _normal_results}
    per_batch_computers = {'depth': _depth_results_per_batch, 'normal': _normal_results_per_batch}
    unknown = [task for task in host_state if task not in computers]
    if unknown:
        raise ValueError(f'metrics.compute: state has unknown task(s) {unknown}; expected a state from init_state')
    return {task: (per_batch_computers[task] if 'batches' in task_state else computers[task])(task_state)
            for task, task_state in host_state.items()}


def _zero_counter(shape: tuple[int, ...]) -> dict[str, jax.Array]:
    return {'high': jnp.zeros(shape, jnp.int32), 'low': jnp.zeros(shape, jnp.int32)}


def _add_to_counter(counter: dict[str, jax.Array], increment: jax.Array) -> dict[str, jax.Array]:
    """Exact add of a per-batch int32 count (< 2**31 - 2**20) to a two-word counter."""
    total = counter['low'] + increment.astype(jnp.int32)
    return {'high': counter['high'] + (total >> _COUNTER_LOW_BITS),
            'low': total & ((1 << _COUNTER_LOW_BITS) - 1)}


def _counter_value(counter: Mapping[str, np.ndarray]) -> np.ndarray:
    return (np.asarray(counter['high'], np.int64) << _COUNTER_LOW_BITS) + np.asarray(counter['low'], np.int64)


def _zero_sum(shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    return {'sum': jnp.zeros(shape, jnp.float32), 'correction': jnp.zeros(shape, jnp.float32)}


def _add_to_sum(accumulator: dict[str, jax.Array], increment: jax.Array) -> dict[str, jax.Array]:
    """Neumaier-compensated add: the rounding error of each add is kept in `correction`."""
    running, increment = accumulator['sum'], increment.astype(jnp.float32)
    total = running + increment
    lost = jnp.where(jnp.abs(running) >= jnp.abs(increment), (running - total) + increment,
                     (increment - total) + running)
    return {'sum': total, 'correction': accumulator['correction'] + lost}


def _sum_value(accumulator: Mapping[str, np.ndarray]) -> float:
    return float(np.float64(accumulator['sum']) + np.float64(accumulator['correction']))


def _sum_values(accumulator: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(accumulator['sum'], np.float64) + np.asarray(accumulator['correction'], np.float64)


def _update_segmentation(state: dict, logits: jax.Array, label: jax.Array) -> dict:
    num_classes = state['confusion']['low'].shape[0]
    if logits.shape[-1] != num_classes:
        raise ValueError(f'metrics.update_state: segmentation logits have {logits.shape[-1]} classes but the '
                         f'state was made for num_classes={num_classes}')
    valid = tasks_lib.segmentation_valid_mask(label, num_classes)
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cell = jnp.where(valid, label.astype(jnp.int32) * num_classes + predicted, num_classes * num_classes)
    counts = jnp.bincount(cell.reshape(-1), length=num_classes * num_classes + 1)[:-1]
    return {'confusion': _add_to_counter(state['confusion'], counts.reshape(num_classes, num_classes))}


def _depth_pixel_terms(depth: jax.Array, label: jax.Array):
    """(valid [N,H,W], label with 1 at invalid pixels, error d - d* (0 at invalid), within-delta [N,H,W,3])."""
    depth, label = depth[..., 0], label[..., 0].astype(jnp.float32)
    valid = label > 0
    safe_label = jnp.where(valid, label, 1.0)
    error = jnp.where(valid, depth - label, 0.0)
    thresholds = DEPTH_DELTA_BASE ** jnp.arange(1, 4, dtype=jnp.float32)
    # max(d/d*, d*/d) < t  <=>  d < t*d* and d* < t*d  (for d* > 0), which needs no division by d.
    within = (valid[..., None] & (depth[..., None] < thresholds * safe_label[..., None])
              & (safe_label[..., None] < thresholds * depth[..., None]))
    return valid, safe_label, error, within


def _update_depth(state: dict, depth: jax.Array, label: jax.Array) -> dict:
    valid, safe_label, error, within = _depth_pixel_terms(depth, label)
    return {'abs_err': _add_to_sum(state['abs_err'], jnp.sum(jnp.abs(error))),
            'rel_err': _add_to_sum(state['rel_err'], jnp.sum(jnp.abs(error) / safe_label)),
            'squared_err': _add_to_sum(state['squared_err'], jnp.sum(error * error)),
            'pixels': _add_to_counter(state['pixels'], jnp.sum(valid, dtype=jnp.int32)),
            'within_delta': _add_to_counter(state['within_delta'],
                                            jnp.sum(within, axis=(0, 1, 2), dtype=jnp.int32))}


def _normal_pixel_terms(normal: jax.Array, label: jax.Array):
    """(valid [N,H,W], angle in degrees (0 at invalid pixels), within-threshold [N,H,W,3])."""
    label = label.astype(jnp.float32)
    valid = jnp.any(label != 0, axis=-1)
    angle = jnp.where(valid, angle_degrees(normal, label), 0.0)
    thresholds = jnp.asarray(NORMAL_ANGLE_THRESHOLDS, jnp.float32)
    within = valid[..., None] & (angle[..., None] < thresholds)
    return valid, angle, within


def _update_normal(state: dict, normal: jax.Array, label: jax.Array) -> dict:
    valid, angle, within = _normal_pixel_terms(normal, label)
    angle_bin = jnp.clip(jnp.floor(angle / ANGLE_BIN_DEGREES).astype(jnp.int32), 0, NUM_ANGLE_BINS - 1)
    angle_bin = jnp.where(valid, angle_bin, NUM_ANGLE_BINS)
    histogram = jnp.bincount(angle_bin.reshape(-1), length=NUM_ANGLE_BINS + 1)[:-1]
    return {'angle': _add_to_sum(state['angle'], jnp.sum(angle)),
            'pixels': _add_to_counter(state['pixels'], jnp.sum(valid, dtype=jnp.int32)),
            'within_angle': _add_to_counter(state['within_angle'], jnp.sum(within, axis=(0, 1, 2), dtype=jnp.int32)),
            'angle_histogram': _add_to_counter(state['angle_histogram'], histogram)}


def _update_depth_per_batch(state: dict, depth: jax.Array, label: jax.Array) -> dict:
    """Adds this batch's metrics over its valid pixels (mtan's `depth_error`) and counts it, if it has any."""
    valid, safe_label, error, within = _depth_pixel_terms(depth, label)
    counted, batch_mean = _batch_mean(jnp.sum(valid, dtype=jnp.int32))
    return {'batch_abs_err': _add_to_sum(state['batch_abs_err'], batch_mean(jnp.sum(jnp.abs(error)))),
            'batch_rel_err': _add_to_sum(state['batch_rel_err'], batch_mean(jnp.sum(jnp.abs(error) / safe_label))),
            'batch_rms': _add_to_sum(state['batch_rms'], jnp.sqrt(batch_mean(jnp.sum(error * error)))),
            'batch_within_delta': _add_to_sum(state['batch_within_delta'],
                                              batch_mean(jnp.sum(within, axis=(0, 1, 2), dtype=jnp.int32))),
            'batches': _add_to_counter(state['batches'], counted.astype(jnp.int32))}


def _update_normal_per_batch(state: dict, normal: jax.Array, label: jax.Array) -> dict:
    """Adds this batch's mean, exact median and fractions of its valid angles (mtan's `normal_error`) and counts
    it, if it has any valid pixel."""
    valid, angle, within = _normal_pixel_terms(normal, label)
    pixels = jnp.sum(valid, dtype=jnp.int32)
    counted, batch_mean = _batch_mean(pixels)
    # The exact median, as np.median: invalid angles sort last as +inf, and the median is the mean of positions
    # (n - 1) // 2 and n // 2 (one position for odd n); both are in range, and a batch with n = 0 is not counted.
    ordered = jnp.sort(jnp.where(valid, angle, jnp.inf).reshape(-1))
    median = jnp.where(counted, (ordered[jnp.maximum(pixels - 1, 0) // 2] + ordered[pixels // 2]) / 2, 0.0)
    return {'batch_mean': _add_to_sum(state['batch_mean'], batch_mean(jnp.sum(angle))),
            'batch_median': _add_to_sum(state['batch_median'], median),
            'batch_within_angle': _add_to_sum(state['batch_within_angle'],
                                              batch_mean(jnp.sum(within, axis=(0, 1, 2), dtype=jnp.int32))),
            'batches': _add_to_counter(state['batches'], counted.astype(jnp.int32))}


def _batch_mean(pixels: jax.Array):
    """(whether the batch counts, total -> the batch's mean over `pixels`, or 0 for a batch without any)."""
    counted = pixels > 0
    denominator = jnp.maximum(pixels, 1).astype(jnp.float32)

    def batch_mean(total: jax.Array) -> jax.Array:
        return jnp.where(counted, total.astype(jnp.float32) / denominator, 0.0)

    return counted, batch_mean


def angle_degrees(normal: jax.Array, label: jax.Array) -> jax.Array:
    """Angle in degrees between two vector fields [..., 3], via atan2(|a x b|, a.b) (accurate for small angles)."""
    normal, label = tasks_lib.unit_vectors(normal), tasks_lib.unit_vectors(label)
    cross_norm = jnp.linalg.norm(jnp.cross(normal, label), axis=-1)
    return jnp.degrees(jnp.arctan2(cross_norm, jnp.sum(normal * label, axis=-1)))


def _segmentation_results(state: dict) -> dict[str, float]:
    confusion = _counter_value(state['confusion'])
    total = confusion.sum()
    if total == 0:
        return {'miou': math.nan, 'pixel_acc': math.nan}
    correct = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - correct
    present = union > 0
    return {'miou': float(np.mean(correct[present] / union[present])),
            'pixel_acc': float(correct.sum() / total)}


def _depth_results(state: dict) -> dict[str, float]:
    pixels = int(_counter_value(state['pixels']))
    names = ('abs_err', 'rel_err', 'rms', 'delta1', 'delta2', 'delta3')
    if pixels == 0:
        return dict.fromkeys(names, math.nan)
    within = _counter_value(state['within_delta']) / pixels
    return {'abs_err': _sum_value(state['abs_err']) / pixels,
            'rel_err': _sum_value(state['rel_err']) / pixels,
            'rms': math.sqrt(_sum_value(state['squared_err']) / pixels),
            'delta1': float(within[0]), 'delta2': float(within[1]), 'delta3': float(within[2])}


def _normal_results(state: dict) -> dict[str, float]:
    pixels = int(_counter_value(state['pixels']))
    within_names = [f'within_{threshold:g}' for threshold in NORMAL_ANGLE_THRESHOLDS]
    if pixels == 0:
        return dict.fromkeys(['mean', 'median', *within_names], math.nan)
    within = _counter_value(state['within_angle']) / pixels
    results = {'mean': _sum_value(state['angle']) / pixels,
               'median': histogram_median(_counter_value(state['angle_histogram']), ANGLE_BIN_DEGREES)}
    results.update({name: float(fraction) for name, fraction in zip(within_names, within)})
    return results


def _depth_results_per_batch(state: dict) -> dict[str, float]:
    batches = int(_counter_value(state['batches']))
    if batches == 0:
        return dict.fromkeys(('abs_err', 'rel_err', 'rms', 'delta1', 'delta2', 'delta3'), math.nan)
    within = _sum_values(state['batch_within_delta']) / batches
    return {'abs_err': _sum_value(state['batch_abs_err']) / batches,
            'rel_err': _sum_value(state['batch_rel_err']) / batches,
            'rms': _sum_value(state['batch_rms']) / batches,
            'delta1': float(within[0]), 'delta2': float(within[1]), 'delta3': float(within[2])}


def _normal_results_per_batch(state: dict) -> dict[str, float]:
    batches = int(_counter_value(state['batches']))
    within_names = [f'within_{threshold:g}' for threshold in NORMAL_ANGLE_THRESHOLDS]
    if batches == 0:
        return dict.fromkeys(['mean', 'median', *within_names], math.nan)
    within = _sum_values(state['batch_within_angle']) / batches
    results = {'mean': _sum_value(state['batch_mean']) / batches,
               'median': _sum_value(state['batch_median']) / batches}
    results.update({name: float(fraction) for name, fraction in zip(within_names, within)})
    return results


def histogram_median(histogram: np.ndarray, bin_width: float) -> float:
    """Median of values binned in [k*w, (k+1)*w), each order statistic placed evenly inside its bin.

    Every estimated order statistic lies in the same bin as the true one, so the error is below one bin width.
    """
    histogram = np.asarray(histogram, np.int64)
    count = int(histogram.sum())
    if count == 0:
        return math.nan
    cumulative = np.cumsum(histogram)

    def order_statistic(rank: int) -> float:
        bin_index = int(np.searchsorted(cumulative, rank))
        before = cumulative[bin_index] - histogram[bin_index]
        return (bin_index + (rank - before - 0.5) / histogram[bin_index]) * bin_width

    if count % 2:
        return float(order_statistic((count + 1) // 2))
    return float((order_statistic(count // 2) + order_statistic(count // 2 + 1)) / 2)
