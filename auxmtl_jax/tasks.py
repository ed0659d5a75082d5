"""Dense-prediction tasks: their names, output widths and training losses.

Losses follow the paper / MTAN: pixel-wise cross entropy for segmentation (label 255 ignored), L1 for depth on
pixels with depth > 0, and 1 - cosine similarity for surface normals on pixels whose label is not all-zero.
Every loss is a mean over the valid pixels of the whole (global) batch, so under a data-parallel `jax.jit` with
the batch sharded over a mesh axis the plain reductions below already give the global mean.
"""

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError

TASK_NAMES = ("segmentation", "depth", "normal")  # the one list of tasks the library knows
SEGMENTATION_IGNORE_LABEL = 255
_FIXED_CHANNELS = {'depth': 1, 'normal': 3}
_NORM_FLOOR = 1e-12


def validate_tasks(tasks: Iterable[str], available: Iterable[str] = TASK_NAMES, *, what: str) -> None:
    """Raises one ValueError naming `what`, every unknown or repeated task, and the allowed ones."""
    allowed = tuple(available)
    if isinstance(tasks, str):
        raise UserError(f'{what}: expected a sequence of task names, got the string {tasks!r}; '
                         f'write ({tasks!r},) for a single task. Allowed: {_quoted(allowed)}')
    tasks = tuple(tasks)
    unknown = [task for task in tasks if task not in allowed]
    repeated = sorted({task for task in tasks if tasks.count(task) > 1 and task in allowed})
    problems = []
    if unknown:
        problems.append(f'unknown task(s) {_quoted(unknown)}')
    if repeated:
        problems.append(f'task(s) listed more than once {_quoted(repeated)}')
    if problems:
        raise UserError(f'{what}: {"; ".join(problems)}. Allowed: {_quoted(allowed)}')


def output_channels(task: str, num_classes: int | None = None) -> int:
    """Number of output channels a prediction head needs for `task` (segmentation: `num_classes`)."""
    validate_tasks((task,), what='output_channels(task)')
    if task != 'segmentation':
        return _FIXED_CHANNELS[task]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"output_channels('segmentation'): num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def task_loss(task: str, prediction: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Float32 scalar loss of one task's prediction against `batch[task]`, averaged over valid pixels.

    A batch without any valid pixel gives 0 with finite, zero gradients (not NaN).
    """
    validate_tasks((task,), what='task_loss(task)')
    if task not in batch:
        raise KeyError(f'task_loss: the batch has no {task!r} labels (batch keys: {sorted(batch)})')
    label = batch[task]
    check_prediction_shape(task, prediction, label)
    prediction = prediction.astype(jnp.float32)
    if task == 'segmentation':
        per_pixel, valid = _cross_entropy(prediction, label)
    elif task == 'depth':
        per_pixel, valid = _l1(prediction, label.astype(jnp.float32))
    else:
        per_pixel, valid = _cosine_distance(prediction, label.astype(jnp.float32))
    return masked_mean(per_pixel, valid)


def task_losses(predictions: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`task_loss` for every prediction key: {task: float32 scalar}."""
    validate_tasks(tuple(predictions), what='task_losses(predictions)')
    return {task: task_loss(task, prediction, batch) for task, prediction in predictions.items()}


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `values` where `valid`; 0 (with zero gradient) when nothing is valid."""
    total = jnp.sum(jnp.where(valid, values, 0.0))
    count = jnp.sum(valid.astype(jnp.float32))
    return total / jnp.maximum(count, 1.0)


def segmentation_valid_mask(label: jax.Array, num_classes: int) -> jax.Array:
    """True where a segmentation label is a real class; 255 (ignore) and any other out-of-range id are excluded."""
    return (label >= 0) & (label < num_classes)


def unit_vectors(vectors: jax.Array) -> jax.Array:
    """Normalises the last axis; a zero vector stays zero and gets a finite gradient."""
    squared_norm = jnp.sum(vectors * vectors, axis=-1, keepdims=True)
    return vectors * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_FLOOR))


def check_prediction_shape(task: str, prediction: jax.Array, label: jax.Array) -> None:
    """Trace-time check that prediction and label agree in shape (models predict at input resolution)."""
    prediction_shape, label_shape = tuple(prediction.shape), tuple(label.shape)
    if task == 'segmentation':
        expected = 'logits [B,H,W,C] with labels [B,H,W]'
        ok = len(prediction_shape) == 4 and label_shape == prediction_shape[:3]
        if ok and not jnp.issubdtype(label.dtype, jnp.integer):
            raise TypeError(f"task 'segmentation': labels must be integer class ids, got dtype {label.dtype}")
    else:
        channels = _FIXED_CHANNELS[task]
        expected = f'prediction and label both [B,H,W,{channels}]'
        ok = len(prediction_shape) == 4 and prediction_shape[-1] == channels and label_shape == prediction_shape
    if not ok:
        raise ValueError(f'task {task!r}: expected {expected} at the same resolution, got prediction '
                         f'{prediction_shape} and label {label_shape}')


def _cross_entropy(logits: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    num_classes = logits.shape[-1]
    valid = segmentation_valid_mask(label, num_classes)
    safe_label = jnp.where(valid, label, 0).astype(jnp.int32)
    label_logit = jnp.take_along_axis(logits, safe_label[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit, valid


def _l1(depth: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.abs(depth - label)[..., 0], label[..., 0] > 0


def _cosine_distance(normal: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    valid = jnp.any(label != 0, axis=-1)
    cosine = jnp.sum(unit_vectors(normal) * unit_vectors(label), axis=-1)
    return 1.0 - cosine, valid


def _quoted(names: Iterable[str]) -> str:
    return ', '.join(repr(name) for name in names)
