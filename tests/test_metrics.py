"""Streaming metrics vs hand-computed cases, batch-split and sharding invariance, the two reductions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from auxmtl_jax import metrics, tasks


def _one_hot_logits(classes, num_classes):
    return jnp.asarray(np.eye(num_classes, dtype=np.float32)[np.asarray(classes)])


def _evaluate(tasks_, predictions, batch, num_classes=None):
    state = metrics.init_state(tasks_, num_classes)
    return metrics.compute(jax.jit(metrics.update_state)(state, predictions, batch))


def _random_data(seed, batch=8, size=8, num_classes=4):
    rng = np.random.default_rng(seed)
    segmentation = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
    segmentation[rng.random(segmentation.shape) < 0.2] = 255
    depth = rng.uniform(0.5, 5.0, (batch, size, size, 1)).astype(np.float32)
    depth[rng.random((batch, size, size)) < 0.2] = 0.0
    normal = rng.normal(size=(batch, size, size, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[rng.random((batch, size, size)) < 0.2] = 0.0
    batch_ = {'segmentation': segmentation, 'depth': depth, 'normal': normal.astype(np.float32)}
    predicted_normal = normal + rng.normal(scale=0.4, size=normal.shape)
    predictions = {
        'segmentation': rng.normal(size=(batch, size, size, num_classes)).astype(np.float32),
        'depth': (depth * rng.uniform(0.6, 1.5, depth.shape)).astype(np.float32),
        'normal': (predicted_normal / np.linalg.norm(predicted_normal, axis=-1, keepdims=True)).astype(np.float32)}
    return predictions, batch_


def _assert_results_close(actual, expected, rtol=1e-5):
    assert actual.keys() == expected.keys()
    for task in expected:
        assert actual[task].keys() == expected[task].keys()
        for metric, value in expected[task].items():
            assert actual[task][metric] == pytest.approx(value, rel=rtol, abs=1e-7), f'{task}/{metric}'


def test_segmentation_by_hand_with_ignore_and_empty_classes():
    labels = jnp.array([[[0, 0, 0, 1, 255, 1]]], jnp.int32)
    predicted = [[[0, 0, 1, 1, 3, 2]]]
    # Confusion (rows = truth): class 0 -> {0: 2, 1: 1}; class 1 -> {1: 1, 2: 1}; the ignored pixel is dropped.
    # IoU: 0 -> 2/3, 1 -> 1/3, 2 -> 0 (only predicted, still counted); 3 has an empty union and is left out.
    results = _evaluate(['segmentation'], {'segmentation': _one_hot_logits(predicted, 4)},
                        {'segmentation': labels}, num_classes=4)
    assert results == {'segmentation': {'miou': pytest.approx(1 / 3), 'pixel_acc': pytest.approx(3 / 5)}}


def test_depth_by_hand_with_invalid_pixels_and_zero_prediction():
    prediction = jnp.array([1.5, 2.0, 0.0, 4.0, 5.0, 7.6]).reshape(1, 2, 3, 1)
    label = jnp.array([2.0, 0.0, 1.0, 4.0, 4.0, 4.0]).reshape(1, 2, 3, 1)
    # Valid pixels 0,2,3,4,5; errors -0.5, -1, 0, 1, 3.6; ratios 1.333, inf (d = 0), 1, 1.25, 1.9.
    results = _evaluate(['depth'], {'depth': prediction}, {'depth': label})['depth']
    assert results['abs_err'] == pytest.approx(6.1 / 5, rel=1e-6)
    assert results['rel_err'] == pytest.approx((0.25 + 1 + 0 + 0.25 + 0.9) / 5, rel=1e-6)
    assert results['rms'] == pytest.approx(math.sqrt((0.25 + 1 + 0 + 1 + 12.96) / 5), rel=1e-6)
    assert (results['delta1'], results['delta2'], results['delta3']) == pytest.approx((1 / 5, 3 / 5, 4 / 5))


def test_normal_by_hand_with_invalid_and_unnormalised_labels():
    def tilted(degrees):
        return [0.0, math.sin(math.radians(degrees)), math.cos(math.radians(degrees))]

    prediction = jnp.array([[0, 0, 1], [1, 0, 0], tilted(10), tilted(25), [0, 0, 1], [1, 0, 0]], jnp.float32)
    label = jnp.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 2], [0, 0, 0]], jnp.float32)
    # Angles 0, 90, 10, 25, 0 (label re-normalised); the all-zero label is invalid.
    results = _evaluate(['normal'], {'normal': prediction.reshape(1, 2, 3, 3)},
                        {'normal': label.reshape(1, 2, 3, 3)})['normal']
    assert results['mean'] == pytest.approx(25.0, abs=1e-4)
    assert results['median'] == pytest.approx(10.0, abs=metrics.ANGLE_BIN_DEGREES)
    assert (results['within_11.25'], results['within_22.5'], results['within_30']) == pytest.approx((0.6, 0.6, 0.8))


def test_tasks_without_valid_pixels_give_nan():
    results = _evaluate(['segmentation', 'depth'],
                        {'segmentation': jnp.zeros((1, 2, 2, 3)), 'depth': jnp.ones((1, 2, 2, 1))},
                        {'segmentation': jnp.full((1, 2, 2), 255, jnp.int32), 'depth': jnp.zeros((1, 2, 2, 1))},
                        num_classes=3)
    assert all(math.isnan(value) for task in results.values() for value in task.values())


def test_streaming_in_batches_equals_one_batch():
    predictions, batch = _random_data(seed=0)
    update = jax.jit(metrics.update_state)
    whole = metrics.compute(update(metrics.init_state(tasks.TASK_NAMES, 4), predictions, batch))
    state = metrics.init_state(tasks.TASK_NAMES, 4)
    for start, stop in ((0, 3), (3, 4), (4, 8)):
        state = update(state, *jax.tree.map(lambda array: array[start:stop], (predictions, batch)))
    streamed = metrics.compute(state)
    _assert_results_close(streamed, whole)
    assert streamed['segmentation'] == whole['segmentation']


def test_depth_and_normal_results_match_numpy_reference():
    predictions, batch = _random_data(seed=1)
    results = _evaluate(['depth', 'normal'], predictions, batch)
    label, depth = batch['depth'][..., 0].astype(np.float64), predictions['depth'][..., 0].astype(np.float64)
    valid = label > 0
    error = depth[valid] - label[valid]
    ratio = np.maximum(depth[valid] / label[valid], label[valid] / depth[valid])
    assert results['depth'] == pytest.approx({
        'abs_err': np.abs(error).mean(), 'rel_err': (np.abs(error) / label[valid]).mean(),
        'rms': np.sqrt((error ** 2).mean()), 'delta1': (ratio < 1.25).mean(), 'delta2': (ratio < 1.25 ** 2).mean(),
        'delta3': (ratio < 1.25 ** 3).mean()}, rel=1e-5)
    normal_valid = batch['normal'].any(-1)
    cosine = np.sum(predictions['normal'][normal_valid].astype(np.float64) * batch['normal'][normal_valid], -1)
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    assert results['normal']['mean'] == pytest.approx(angles.mean(), rel=1e-5)
    assert abs(results['normal']['median'] - np.median(angles)) <= metrics.ANGLE_BIN_DEGREES
    assert results['normal']['within_22.5'] == pytest.approx((angles < 22.5).mean())


@pytest.mark.parametrize('count', [20001, 20000])
def test_histogram_median_within_one_bin_of_numpy_median(count):
    angles = np.random.default_rng(count).gamma(2.0, 8.0, count)
    histogram = np.bincount(np.floor(angles / metrics.ANGLE_BIN_DEGREES).astype(int), minlength=metrics.NUM_ANGLE_BINS)
    assert abs(metrics.histogram_median(histogram, metrics.ANGLE_BIN_DEGREES) - np.median(angles)) \
        <= metrics.ANGLE_BIN_DEGREES


def test_histogram_median_of_two_far_apart_values_is_their_midpoint():
    histogram = np.zeros(metrics.NUM_ANGLE_BINS, np.int64)
    histogram[[1000, 5000]] = 1  # 10.00-10.01 and 50.00-50.01 degrees
    assert metrics.histogram_median(histogram, metrics.ANGLE_BIN_DEGREES) == pytest.approx(30.005)


def test_counts_stay_exact_beyond_int32():
    counter = metrics._zero_counter(())
    for _ in range(5):
        counter = metrics._add_to_counter(counter, jnp.int32(2 ** 30 + 7))
    assert int(metrics._counter_value(jax.device_get(counter))) == 5 * (2 ** 30 + 7)


def test_compensated_sum_keeps_small_increments():
    accumulator = metrics._add_to_sum(metrics._zero_sum(), jnp.float32(2.0 ** 25))
    accumulator = jax.lax.fori_loop(0, 1000, lambda _, acc: metrics._add_to_sum(acc, jnp.float32(1.0)), accumulator)
    assert metrics._sum_value(jax.device_get(accumulator)) == 2.0 ** 25 + 1000  # plain float32 would stay at 2**25


def test_sharded_update_under_jit_equals_unsharded():
    predictions, batch = _random_data(seed=2)
    mesh = Mesh(jax.devices()[:4], ('data',))
    sharded_inputs = jax.device_put((predictions, batch), NamedSharding(mesh, P('data')))
    state = metrics.init_state(tasks.TASK_NAMES, 4)
    sharded = metrics.compute(jax.jit(metrics.update_state)(state, *sharded_inputs))
    unsharded = metrics.compute(metrics.update_state(state, predictions, batch))
    _assert_results_close(sharded, unsharded)
    assert sharded['segmentation'] == unsharded['segmentation']


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="metrics.init_state\\(tasks\\): unknown task.*'depths'"):
        metrics.init_state(['depths'])
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        metrics.init_state(['segmentation'])
    state = metrics.init_state(['segmentation', 'depth'], 3)
    predictions, batch = _random_data(seed=3, num_classes=3)
    with pytest.raises(KeyError, match="'depth'.*missing"):
        metrics.update_state(state, {'segmentation': predictions['segmentation']}, batch)
    with pytest.raises(ValueError, match='logits have 5 classes but the state was made for num_classes=3'):
        metrics.update_state(state, {**predictions, 'segmentation': np.zeros((8, 8, 8, 5), np.float32)}, batch)
    with pytest.raises(ValueError, match=r"'depth'.*prediction \(8, 4, 4, 1\) and label \(8, 8, 8, 1\)"):
        metrics.update_state(state, {**predictions, 'depth': np.zeros((8, 4, 4, 1), np.float32)}, batch)


# Reductions (issue 29): two batches small enough to compute by hand. Each batch is one 2x4 image.
def _tilted(degrees):
    return [0.0, math.sin(math.radians(degrees)), math.cos(math.radians(degrees))]


_UP, _NONE = [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]
_HAND_BATCHES = [
    # Batch 1: depth valid at 2 pixels (labels 1, 2; predictions 1.5, 2): |err| 0.5, 0; rel 0.5, 0; ratio 1.5, 1.
    # Normals valid at 4 pixels with angles 0, 10, 20, 40 (an even count: median (10 + 20) / 2 = 15).
    ({'depth': [1.5, 2.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
      'normal': [_UP, _tilted(10), _tilted(20), _tilted(40), _tilted(90), _UP, _UP, _UP],
      'segmentation': [0, 0, 1, 1, 1, 0, 0, 0]},
     {'depth': [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
      'normal': [_UP, _UP, _UP, _UP, _NONE, _NONE, _NONE, _NONE],
      'segmentation': [0, 0, 1, 0, 255, 255, 255, 255]}),
    # Batch 2: depth valid at 6 pixels (labels 2, 2, 2, 2, 4, 4; predictions 2, 3, 1, 2.5, 4, 6):
    # |err| 0, 1, 1, 0.5, 0, 2; rel 0, 0.5, 0.5, 0.25, 0, 0.5; ratio 1, 1.5, 2, 1.25, 1, 1.5.
    # Normals valid at 3 pixels with angles 5, 25, 60 (median 25).
    ({'depth': [2.0, 3.0, 1.0, 2.5, 4.0, 6.0, 5.0, 5.0],
      'normal': [_tilted(5), _tilted(25), _tilted(60), _UP, _tilted(70), _UP, _UP, _UP],
      'segmentation': [1, 1, 1, 1, 0, 0, 0, 0]},
     {'depth': [2.0, 2.0, 2.0, 2.0, 4.0, 4.0, 0.0, 0.0],
      'normal': [_UP, _UP, _UP, _NONE, _NONE, _NONE, _NONE, _NONE],
      'segmentation': [1, 1, 0, 255, 255, 255, 255, 255]}),
    # Batch 3: padding only, no valid pixel for any task (predictions are junk).
    ({'depth': [7.0] * 8, 'normal': [_tilted(80)] * 8, 'segmentation': [1] * 8},
     {'depth': [0.0] * 8, 'normal': [_NONE] * 8, 'segmentation': [255] * 8}),
]


def _hand_batch(index):
    predictions, labels = _HAND_BATCHES[index]
    predicted_classes = np.asarray(predictions['segmentation']).reshape(1, 2, 4)
    return ({'depth': jnp.asarray(predictions['depth'], jnp.float32).reshape(1, 2, 4, 1),
             'normal': jnp.asarray(predictions['normal'], jnp.float32).reshape(1, 2, 4, 3),
             'segmentation': _one_hot_logits(predicted_classes, 2)},
            {'depth': jnp.asarray(labels['depth'], jnp.float32).reshape(1, 2, 4, 1),
             'normal': jnp.asarray(labels['normal'], jnp.float32).reshape(1, 2, 4, 3),
             'segmentation': jnp.asarray(labels['segmentation'], jnp.int32).reshape(1, 2, 4)})


def _hand_results(reduction, batches):
    update = jax.jit(metrics.update_state, donate_argnums=0)
    state = metrics.init_state(tasks.TASK_NAMES, 2, reduction=reduction)
    for index in batches:
        previous = state
        state = update(state, *_hand_batch(index))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(previous))  # donated, and still jit-able
    return metrics.compute(state)


_PER_PIXEL_BY_HAND = {  # 8 valid depth pixels, 7 valid angles (0, 5, 10, 20, 25, 40, 60)
    'depth': {'abs_err': (0.5 + 4.5) / 8, 'rel_err': (0.5 + 1.75) / 8, 'rms': math.sqrt((0.25 + 6.25) / 8),
              'delta1': (1 + 2) / 8, 'delta2': (2 + 5) / 8, 'delta3': (2 + 5) / 8},
    'normal': {'mean': 160 / 7, 'median': 20.0, 'within_11.25': 3 / 7, 'within_22.5': 4 / 7, 'within_30': 5 / 7}}
_PER_BATCH_BY_HAND = {  # batch 1 and batch 2 values, then their mean
    'depth': {'abs_err': (0.5 / 2 + 4.5 / 6) / 2, 'rel_err': (0.5 / 2 + 1.75 / 6) / 2,
              'rms': (math.sqrt(0.25 / 2) + math.sqrt(6.25 / 6)) / 2,
              'delta1': (1 / 2 + 2 / 6) / 2, 'delta2': (2 / 2 + 5 / 6) / 2, 'delta3': (2 / 2 + 5 / 6) / 2},
    'normal': {'mean': (70 / 4 + 90 / 3) / 2, 'median': (15 + 25) / 2, 'within_11.25': (2 / 4 + 1 / 3) / 2,
               'within_22.5': (3 / 4 + 1 / 3) / 2, 'within_30': (3 / 4 + 2 / 3) / 2}}
# Confusion over both batches (rows = truth): 0 -> {0: 2, 1: 2}, 1 -> {1: 3}; IoU 2/4, 3/5; 5 of 7 right.
_SEGMENTATION_BY_HAND = {'miou': (2 / 4 + 3 / 5) / 2, 'pixel_acc': 5 / 7}


@pytest.mark.parametrize('reduction, expected', [('per_pixel', _PER_PIXEL_BY_HAND),
                                                 ('per_batch', _PER_BATCH_BY_HAND)])
def test_reductions_by_hand_on_two_batches_and_padding(reduction, expected):
    results = _hand_results(reduction, [0, 1])
    assert results['segmentation'] == pytest.approx(_SEGMENTATION_BY_HAND)
    assert results['depth'] == pytest.approx(expected['depth'], rel=1e-6)
    normal = dict(results['normal'])
    # per_pixel's median is the histogram's (within a bin); per_batch's is exact (float32 angles)
    median_tolerance = metrics.ANGLE_BIN_DEGREES if reduction == 'per_pixel' else 1e-4
    assert normal.pop('median') == pytest.approx(expected['normal']['median'], abs=median_tolerance)
    assert normal == pytest.approx({k: v for k, v in expected['normal'].items() if k != 'median'}, abs=1e-5)
    # A padding-only batch is not counted: the results stay exactly the same.
    assert _hand_results(reduction, [0, 1, 2]) == results
    assert _hand_results(reduction, [2, 0, 2, 1]) == results


def test_per_pixel_is_the_default_and_per_batch_differs_only_where_it_should():
    assert metrics.REDUCTIONS == ('per_pixel', 'per_batch')
    predictions, batch = _random_data(seed=4)
    default = metrics.init_state(tasks.TASK_NAMES, 4)
    explicit = metrics.init_state(tasks.TASK_NAMES, 4, reduction='per_pixel')
    assert jax.tree.structure(default) == jax.tree.structure(explicit)
    per_batch = metrics.compute(jax.jit(metrics.update_state)(
        metrics.init_state(tasks.TASK_NAMES, 4, reduction='per_batch'), predictions, batch))
    per_pixel = metrics.compute(jax.jit(metrics.update_state)(default, predictions, batch))
    assert per_batch['segmentation'] == per_pixel['segmentation']
    # One batch: per_batch is per_pixel, up to float32 rounding and the per_pixel histogram median.
    median = per_pixel['normal'].pop('median')
    assert per_batch['normal'].pop('median') == pytest.approx(median, abs=metrics.ANGLE_BIN_DEGREES)
    _assert_results_close(per_batch, per_pixel)


def test_per_batch_matches_mtan_formulas_in_numpy_under_sharding():
    predictions, batch = _random_data(seed=5)
    mesh = Mesh(jax.devices()[:4], ('data',))
    update = jax.jit(metrics.update_state)
    state = metrics.init_state(['depth', 'normal'], reduction='per_batch')
    expected = {name: [] for name in ('abs_err', 'rel_err', 'mean', 'median', 'within_11.25', 'within_30')}
    for start in (0, 4):
        part = jax.tree.map(lambda array: array[start:start + 4], (predictions, batch))
        state = update(state, *jax.device_put(part, NamedSharding(mesh, P('data'))))
        # mtan im2im_pred/utils.py depth_error / normal_error on this batch (labels here are unit or zero vectors).
        depth, label = part[0]['depth'].astype(np.float64), part[1]['depth'].astype(np.float64)
        mask = label != 0
        expected['abs_err'].append(np.abs(depth[mask] - label[mask]).mean())
        expected['rel_err'].append((np.abs(depth[mask] - label[mask]) / label[mask]).mean())
        normal_mask = part[1]['normal'].any(-1)
        cosine = np.sum(part[0]['normal'].astype(np.float64) * part[1]['normal'], -1)[normal_mask]
        error = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
        expected['mean'].append(np.mean(error))
        expected['median'].append(np.median(error))
        expected['within_11.25'].append(np.mean(error < 11.25))
        expected['within_30'].append(np.mean(error < 30))
    results = metrics.compute(state)
    flat = {**results['depth'], **results['normal']}
    for name, values in expected.items():
        assert flat[name] == pytest.approx(np.mean(values), rel=1e-5), name


def test_bad_reduction_and_describe_reduction():
    for bad in ('per_image', 'PER_PIXEL', None):
        with pytest.raises(ValueError, match=rf"metrics.init_state: reduction={bad!r}; "
                                             r"expected one of 'per_pixel', 'per_batch'"):
            metrics.init_state(['depth'], reduction=bad)
    with pytest.raises(ValueError, match="metrics.describe_reduction: reduction='mean'; expected one of"):
        metrics.describe_reduction('mean')
    lines = {reduction: metrics.describe_reduction(reduction) for reduction in metrics.REDUCTIONS}
    assert lines['per_pixel'].startswith('per_pixel: ') and 'LibMTL' in lines['per_pixel']
    assert lines['per_batch'].startswith('per_batch: ') and 'mtan' in lines['per_batch']
    assert all('\n' not in line for line in lines.values())
