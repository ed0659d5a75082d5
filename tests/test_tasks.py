"""Task losses: hand-computed values, ignore/invalid pixels, empty batches, shape errors, sharded jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from auxmtl_jax import tasks


def _random_batch(seed, batch=4, size=6, num_classes=3):
    rng = np.random.default_rng(seed)
    segmentation = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
    segmentation[rng.random((batch, size, size)) < 0.3] = tasks.SEGMENTATION_IGNORE_LABEL
    depth = rng.uniform(0.5, 5.0, (batch, size, size, 1)).astype(np.float32)
    depth[rng.random((batch, size, size)) < 0.3] = 0.0
    normal = rng.normal(size=(batch, size, size, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[rng.random((batch, size, size)) < 0.3] = 0.0
    labels = {'segmentation': segmentation, 'depth': depth, 'normal': normal.astype(np.float32)}
    raw_normal = rng.normal(size=(batch, size, size, 3))
    predictions = {'segmentation': rng.normal(size=(batch, size, size, num_classes)).astype(np.float32),
                   'depth': rng.uniform(0.0, 6.0, (batch, size, size, 1)).astype(np.float32),
                   'normal': (raw_normal / np.linalg.norm(raw_normal, axis=-1, keepdims=True)).astype(np.float32)}
    return predictions, labels


def test_validate_tasks_names_every_bad_task_the_context_and_the_allowed_ones():
    tasks.validate_tasks(('depth', 'normal'), tasks.TASK_NAMES, what='config.tasks')
    tasks.validate_tasks((), tasks.TASK_NAMES, what='config.aux.tasks')
    with pytest.raises(ValueError) as error:
        tasks.validate_tasks(('depth', 'semseg', 'normals'), tasks.TASK_NAMES, what='config.tasks')
    message = str(error.value)
    assert 'config.tasks' in message and "'semseg'" in message and "'normals'" in message
    assert "'segmentation', 'depth', 'normal'" in message
    with pytest.raises(ValueError, match="config.aux.tasks: .*more than once 'depth'"):
        tasks.validate_tasks(('depth', 'depth'), tasks.TASK_NAMES, what='config.aux.tasks')
    with pytest.raises(ValueError, match=r"got the string 'depth'; write \('depth',\)"):
        tasks.validate_tasks('depth', tasks.TASK_NAMES, what='config.tasks')
    with pytest.raises(ValueError, match="dataset: unknown task.*'normal'.*Allowed: 'segmentation', 'depth'$"):
        tasks.validate_tasks(('normal',), ('segmentation', 'depth'), what='dataset')


def test_output_channels():
    assert tasks.output_channels('segmentation', 13) == 13
    assert tasks.output_channels('depth') == 1
    assert tasks.output_channels('normal', 40) == 3
    with pytest.raises(ValueError, match='num_classes must be a positive int, got None'):
        tasks.output_channels('segmentation')
    with pytest.raises(ValueError, match="unknown task.*'edges'"):
        tasks.output_channels('edges')


def test_segmentation_cross_entropy_by_hand():
    logits = jnp.array([[[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0], [1.0, 2.0]]]])
    labels = jnp.array([[[1, 0, 255, 7]]], jnp.int32)  # 255 ignored; 7 is no class of 2, also ignored
    expected = (math.log(4.0 / 3.0) + math.log(2.0)) / 2
    assert float(tasks.task_loss('segmentation', logits, {'segmentation': labels})) == pytest.approx(expected, 1e-6)


def test_depth_l1_over_valid_pixels_by_hand():
    prediction = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    label = jnp.array([2.0, 0.0, 1.0, 4.0]).reshape(1, 2, 2, 1)
    assert float(tasks.task_loss('depth', prediction, {'depth': label})) == pytest.approx((1 + 2 + 0) / 3)


def test_normal_cosine_loss_by_hand():
    prediction = jnp.array([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], jnp.float32).reshape(1, 2, 2, 3)
    label = jnp.array([[0, 1, 0], [2, 0, 0], [1, 0, 0], [0, 0, 0]], jnp.float32).reshape(1, 2, 2, 3)
    # cosines 0, 1 (label re-normalised), 0.6; the all-zero label is invalid.
    expected = ((1 - 0) + (1 - 1) + (1 - 0.6)) / 3
    assert float(tasks.task_loss('normal', prediction, {'normal': label})) == pytest.approx(expected, 1e-6)


@pytest.mark.parametrize('task', tasks.TASK_NAMES)
def test_invalid_pixels_change_neither_loss_nor_gradient(task):
    predictions, labels = _random_batch(seed=1)
    invalid = {'segmentation': labels['segmentation'] == 255, 'depth': labels['depth'][..., 0] == 0,
               'normal': ~labels['normal'].any(-1)}[task]
    assert invalid.any() and not invalid.all()
    changed = predictions[task].copy()
    changed[invalid] = np.random.default_rng(2).normal(scale=50.0, size=changed[invalid].shape)
    loss_and_grad = jax.value_and_grad(lambda prediction: tasks.task_loss(task, prediction, labels))
    loss, grad = loss_and_grad(jnp.asarray(predictions[task]))
    changed_loss, changed_grad = loss_and_grad(jnp.asarray(changed))
    assert float(loss) > 0
    np.testing.assert_allclose(float(changed_loss), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(changed_grad), np.asarray(grad), atol=1e-7)
    assert not np.asarray(grad)[invalid].any()


@pytest.mark.parametrize('task', tasks.TASK_NAMES)
def test_batch_without_valid_pixel_gives_zero_loss_and_zero_gradient(task):
    predictions, labels = _random_batch(seed=3)
    empty = {'segmentation': np.full_like(labels['segmentation'], 255), 'depth': np.zeros_like(labels['depth']),
             'normal': np.zeros_like(labels['normal'])}[task]
    loss, grad = jax.value_and_grad(lambda prediction: tasks.task_loss(task, prediction, {task: empty}))(
        jnp.asarray(predictions[task]))
    assert float(loss) == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_zero_normal_prediction_has_finite_gradient():
    prediction = jnp.zeros((1, 1, 2, 3))
    label = jnp.array([[[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]])
    loss, grad = jax.value_and_grad(lambda p: tasks.task_loss('normal', p, {'normal': label}))(prediction)
    assert float(loss) == pytest.approx(1.0)
    assert np.isfinite(np.asarray(grad)).all()


def test_shape_and_dtype_errors_are_raised_at_trace_time():
    batch = {'segmentation': jnp.zeros((2, 8, 8), jnp.int32), 'depth': jnp.ones((2, 8, 8, 1)),
             'normal': jnp.ones((2, 8, 8, 3))}
    with pytest.raises(ValueError, match=r"'segmentation'.*prediction \(2, 4, 4, 5\) and label \(2, 8, 8\)"):
        jax.jit(lambda p: tasks.task_loss('segmentation', p, batch))(jnp.zeros((2, 4, 4, 5)))
    with pytest.raises(ValueError, match=r"'depth': expected prediction and label both \[B,H,W,1\]"):
        tasks.task_loss('depth', jnp.zeros((2, 8, 8)), batch)
    with pytest.raises(ValueError, match=r"'normal'.*\[B,H,W,3\]"):
        tasks.task_loss('normal', jnp.zeros((2, 8, 8, 1)), batch)
    with pytest.raises(TypeError, match='integer class ids, got dtype float32'):
        tasks.task_loss('segmentation', jnp.zeros((2, 8, 8, 5)), {'segmentation': jnp.zeros((2, 8, 8))})


def test_task_losses_one_entry_per_prediction_and_clear_key_errors():
    predictions, labels = _random_batch(seed=4)
    losses = tasks.task_losses({'depth': predictions['depth'], 'normal': predictions['normal']}, labels)
    assert set(losses) == {'depth', 'normal'}
    assert all(loss.dtype == jnp.float32 and loss.shape == () for loss in losses.values())
    with pytest.raises(ValueError, match="task_losses\\(predictions\\): unknown task.*'depths'"):
        tasks.task_losses({'depths': predictions['depth']}, labels)
    with pytest.raises(KeyError, match="no 'normal' labels"):
        tasks.task_losses({'normal': predictions['normal']}, {'depth': labels['depth']})


def test_losses_under_sharded_jit_equal_unsharded_global_means():
    predictions, labels = _random_batch(seed=5, batch=8)
    mesh = Mesh(jax.devices()[:4], ('data',))
    sharding = NamedSharding(mesh, P('data'))
    sharded_predictions, sharded_labels = jax.device_put((predictions, labels), sharding)
    sharded = jax.jit(tasks.task_losses)(sharded_predictions, sharded_labels)
    unsharded = tasks.task_losses(predictions, labels)
    for task in tasks.TASK_NAMES:
        np.testing.assert_allclose(float(sharded[task]), float(unsharded[task]), rtol=1e-6)
    # A mean of per-device means would differ: the shards have different numbers of valid depth pixels.
    per_device = [float(tasks.task_loss('depth', predictions['depth'][i:i + 2], {'depth': labels['depth'][i:i + 2]}))
                  for i in range(0, 8, 2)]
    assert abs(np.mean(per_device) - float(unsharded['depth'])) > 1e-6
