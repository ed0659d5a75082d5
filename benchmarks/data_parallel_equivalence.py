r"""Data-parallel equivalence, measured: the step-1 gradient of the real train step on 1 vs 4 devices.

The gradient is the one `training.step_functions`' jitted train step hands its optimiser (read off an optimiser
that keeps it as its state, `record_gradient`), with the global batch sharded over the mesh by
`parallel.global_batch`, as in a run. The network is `configs/synthetic_three_task.py:runlocal,strategy=auxi_all`
(MobileNetV2 x0.25, U-shape decoders, three tasks, an aux module per task); the batch is rendered synthetic
scenes at each row's size. Per row, per-leaf relative differences ||g_b - g_a|| / ||g_a|| (worst leaf, median):

  float32, 4 vs 1 devices, and the ReLU kinks crossed between the two (ReLU inputs on the other side of 0);
  float32 on 1 and on 4 devices against float64 (what float32 itself costs), and the kinks crossed (1 device);
  float64, 4 vs 1 devices (is it the same computation?);
  float64, the images changed by 1e-10 relative noise, scaled to a 1e-7 change: the gradient's smooth
  sensitivity to a rounding-sized change (its condition number x 1e-7), kinks aside.

Leaves whose exact gradient is zero hold rounding noise only and are left out of the relative columns: the project
BatchNorm biases of encoder blocks 7-10 and 14-16, whose output reaches nothing but the next 1x1 expand convolution
and its BatchNorm, which removes a per-channel shift (float64 gives them ~1e-16 of the gradient's norm).

  python benchmarks/data_parallel_equivalence.py              # the table of docs/reliability.md
  python benchmarks/data_parallel_equivalence.py --per_layer  # and, at runlocal size, per BatchNorm layer:
      # elements per statistic, smallest variance / eps, 1-vs-4 difference of its output and its scale's gradient

Runs on 4 virtual CPU devices (set here unless XLA_FLAGS is already set), with the tests' fast-compile XLA flags;
float64 runs the network, its parameters and the step in float64 (the heads' upsampling and the task losses stay
float32: layers.to_task_output and tasks.py cast).
tests/e2e/test_data_parallel_equivalence.py and its worker use this file's functions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from auxmtl_configs import synthetic_three_task
from auxmtl_datasets.synthetic_scenes import render
from auxmtl_jax import augment, coordination, parallel, training
from auxmtl_jax.models import layers, networks

_PER_LAYER = flags.DEFINE_bool("per_layer", False, "Also print the per-BatchNorm-layer table at runlocal size.")

NUM_CLASSES = len(render.CLASS_NAMES)
RUNLOCAL = ((32, 40), 4)  # crop (H, W) and global batch of configs/synthetic_three_task.py:runlocal
# A leaf whose float64 gradient is under ZERO_LEAF x the median leaf's norm has an exact gradient of zero (those are
# ~1e-16, real ones over 1e-3 x the median). Not the global norm: one leaf can dominate it (at 64x80 the normal
# head's output bias holds a gradient of 1e8, from predicted normals that are exactly zero).
ZERO_LEAF = 1e-9
# The smooth sensitivity column: the float64 gradient's change when the images change by PERTURBATION (relative; too
# small to move a ReLU input across 0, in all likelihood), scaled to a change of ROUNDING (about float32's relative
# rounding, 6e-8). At runlocal size 1e-7 and 1e-9 give changes exactly 100 times apart: the response is linear.
PERTURBATION, ROUNDING = 1e-10, 1e-7


def equivalence_config(crop_size=RUNLOCAL[0], batch_size=RUNLOCAL[1], variant="strategy=auxi_all", dtype="float32"):
    """The runlocal network (and seed) at another input size and global batch."""
    config = synthetic_three_task.get_config(f"runlocal,{variant}")
    config.input.crop_size = tuple(crop_size)
    config.batch_size = batch_size
    config.model.dtype = dtype
    return config


def rendered_batch(config, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's share of a global batch of rendered scenes at the config's crop size (batch contract: uint8
    images, int32 segmentation with 255 = ignore, depth in metres, unit normals)."""
    height, width = config.input.crop_size
    local = config.batch_size // process_count
    indices = range(process_index * local, (process_index + 1) * local)
    examples = [render.render_example(config.seed, "train", index, height, width) for index in indices]
    batch = {key: np.stack([example[key] for example in examples]) for key in ("image", *config.tasks)}
    if "segmentation" in batch:
        batch["segmentation"] = batch["segmentation"].astype(np.int32)
    return batch


def record_gradient() -> optax.GradientTransformation:
    """An 'optimiser' whose state is the gradient it was last given and whose update is zero: the train step's own
    gradient, read off the new state's `opt_state`."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def leaf_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def first_step_gradient(config, local_batch: dict[str, np.ndarray],
                        num_devices: int | None = None) -> dict[str, np.ndarray]:
    """{leaf path: gradient} of the first train step, on a mesh of `num_devices` (all when None; with several
    processes every process calls this with its share of the global batch).

    The state is `training.create_train_state`'s; the step is `training.step_functions`' jitted `train_step`
    (the run's weighting, the state replicated and the batch sharded over the mesh), with `record_gradient` as the
    optimiser. config.model.dtype='float64' (inside `float64()`) runs parameters and network in float64.
    """
    mesh = parallel.create_mesh(num_devices)
    model = training.create_model(config, NUM_CLASSES)
    learning_rate_fn = training.run_learning_rate_fn(config, config.num_train_steps)
    state, _ = training.create_train_state(config, model, jax.random.key(config.seed), learning_rate_fn)
    dtype = networks.DTYPES[config.model.dtype]
    tx = record_gradient()
    state = state.replace(params=_cast(state.params, dtype), batch_stats=_cast(state.batch_stats, dtype))
    state = state.replace(opt_state=tx.init(state.params))
    state_sharding = jax.tree.map(lambda _: parallel.replicated_sharding(mesh), state)
    coordination.barrier("initialised train state")  # as create_sharded_train_state: placing it is a collective
    state = jax.device_put(state, state_sharding)
    step_fn, _ = training.step_functions(config, model, tx, learning_rate_fn, mesh, state_sharding,
                                         training.run_weighting(config))
    step_fn = coordination.together(step_fn, "train step")  # as the loop: processes meet after compiling
    with jax.set_mesh(mesh):
        new_state, _ = step_fn(state, parallel.global_batch(local_batch, mesh))
    return {leaf_name(path): np.asarray(leaf) for path, leaf in jax.tree.flatten_with_path(new_state.opt_state)[0]}


@contextlib.contextmanager
def float64():
    """jax_enable_x64 and a 'float64' config.model.dtype, for the duration (the library offers float32 and
    bfloat16; float64 is this measurement's reference)."""
    jax.config.update("jax_enable_x64", True)
    networks.DTYPES["float64"] = jnp.float64
    try:
        yield
    finally:
        del networks.DTYPES["float64"]
        jax.config.update("jax_enable_x64", False)


@contextlib.contextmanager
def batch_norm_epsilon(epsilon: float):
    """Every BatchNorm built meanwhile uses `epsilon` (layers.batch_norm reads the constant when called)."""
    saved, layers.BATCH_NORM_EPSILON = layers.BATCH_NORM_EPSILON, epsilon
    try:
        yield
    finally:
        layers.BATCH_NORM_EPSILON = saved


def relative_differences(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """Per leaf ||other - reference|| / ||reference|| (L2, in float64)."""
    assert reference.keys() == other.keys()
    out = {}
    for name, a in reference.items():
        a, b = np.asarray(a, np.float64), np.asarray(other[name], np.float64)
        out[name] = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-300))
    return out


def global_norm(gradient: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in gradient.values())))


def median_leaf_norm(gradient: dict[str, np.ndarray]) -> float:
    return float(np.median([np.linalg.norm(np.asarray(leaf, np.float64)) for leaf in gradient.values()]))


def zero_leaves(gradient64: dict[str, np.ndarray]) -> set[str]:
    """The leaves whose exact gradient is zero (their float64 gradient is rounding noise)."""
    threshold = ZERO_LEAF * median_leaf_norm(gradient64)
    return {name for name, leaf in gradient64.items() if np.linalg.norm(leaf) < threshold}


def batch_norm_activity(config, batch, num_devices: int) -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(name, input, output, feeds a ReLU) of every BatchNorm in one training forward of the whole model (main,
    aux, deep supervision) at init, the batch sharded over `num_devices`."""
    mesh = parallel.create_mesh(num_devices)
    model = training.create_model(config, NUM_CLASSES)
    variables = _cast(training.init_variables(model, jax.random.key(config.seed)), networks.DTYPES[config.model.dtype])
    names: list[tuple[str, bool]] = []

    def forward(variables, images):
        captured = []

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                parent, root = context.module.parent, context.module
                while isinstance(root.parent, nn.Module):
                    root = root.parent
                group = {"MultiTaskNet": "main", "AuxiliaryModule": f"aux/{getattr(root, 'task', '')}"}.get(
                    type(root).__name__, type(root).__name__)
                linear = isinstance(parent, layers.ConvBN) and parent.activation is None
                names.append((f"{group}/{'/'.join(context.module.path)}", not linear))
                captured.append((args[0], out))
            return out

        with nn.intercept_methods(intercept):
            model.apply(variables, augment.model_input(images), train=True)
        return captured

    step = jax.jit(forward, in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)))
    with jax.set_mesh(mesh):
        captured = step(variables, parallel.global_batch({"image": batch["image"]}, mesh)["image"])
    return [(name, np.asarray(x), np.asarray(y), relu) for (name, relu), (x, y) in zip(names, captured)]


def kinks_crossed(a, b) -> int:
    """ReLU inputs (BatchNorm outputs that feed a ReLU / ReLU6) on different sides of 0 in two forwards."""
    return sum(int(np.sum((ya > 0) != (yb > 0))) for (_, _, ya, relu), (_, _, yb, _) in zip(a, b) if relu)


class Row(NamedTuple):
    label: str
    crop_size: tuple[int, int]
    batch_size: int
    epsilon: float = layers.BATCH_NORM_EPSILON

    @property
    def deepest_statistic(self) -> int:
        """Elements per channel statistic of the stride-32 BatchNorms (3x3 stride-2 convs give ceil(size / 2))."""
        return self.batch_size * -(-self.crop_size[0] // 32) * -(-self.crop_size[1] // 32)


ROWS = (
    Row("runlocal 32x40, batch 4", (32, 40), 4),
    Row("runlocal, BN eps 1e-3", (32, 40), 4, epsilon=1e-3),
    Row("32x40, batch 16", (32, 40), 16),
    Row("64x80, batch 8 (the test)", (64, 80), 8),
    Row("128x160, batch 8", (128, 160), 8),
)


def measure(row: Row) -> dict:
    """Every column of the table for one row."""
    config = equivalence_config(row.crop_size, row.batch_size)
    batch = rendered_batch(config)
    with batch_norm_epsilon(row.epsilon):
        g32 = {n: first_step_gradient(config, batch, n) for n in (1, 4)}
        forward32 = {n: batch_norm_activity(config, batch, n) for n in (1, 4)}
        with float64():
            config64 = equivalence_config(row.crop_size, row.batch_size, dtype="float64")
            g64 = {n: first_step_gradient(config64, batch, n) for n in (1, 4)}
            forward64 = batch_norm_activity(config64, batch, 1)
            # The images as the step sees them (model_input's values), changed by PERTURBATION relative noise.
            images = augment.normalise_image(batch["image"].astype(np.float32), augment.IMAGE_MEAN,
                                             augment.IMAGE_STD).astype(np.float64)
            noise = np.random.default_rng(0).standard_normal(images.shape)
            perturbed = first_step_gradient(config64, {**batch, "image": images * (1 + PERTURBATION * noise)}, 1)
    zero = zero_leaves(g64[1])

    def compared(a, b, scale=1.0):
        diffs = {name: value * scale for name, value in relative_differences(a, b).items() if name not in zero}
        name = max(diffs, key=diffs.get)
        return diffs[name], float(np.median(list(diffs.values()))), name

    return {"f32": compared(g32[1], g32[4]), "kinks": kinks_crossed(forward32[1], forward32[4]),
            "f32_1_64": compared(g64[1], g32[1]), "f32_4_64": compared(g64[1], g32[4]),
            "kinks_64": kinks_crossed(forward64, forward32[1]), "f64": compared(g64[1], g64[4]),
            "sensitivity": compared(g64[1], perturbed, ROUNDING / PERTURBATION), "zero": len(zero),
            "leaves": len(g64[1])}


def per_layer_table(row: Row) -> None:
    """Per BatchNorm layer (network order) at `row`'s size: elements per statistic, smallest batch variance / eps,
    the 1-vs-4-device relative difference of its output, and of its scale's gradient."""
    config = equivalence_config(row.crop_size, row.batch_size)
    batch = rendered_batch(config)
    one, four = batch_norm_activity(config, batch, 1), batch_norm_activity(config, batch, 4)
    g1, g4 = first_step_gradient(config, batch, 1), first_step_gradient(config, batch, 4)
    gradient = relative_differences(g1, g4)
    print(f"\nper BatchNorm layer, {row.label} (float32, 4 vs 1 devices):")
    print(f"{'layer':<52} {'n/stat':>6} {'min var/eps':>11} {'output diff':>11} {'scale grad diff':>15}")
    for (name, x, y1, _), (_, _, y4, _) in zip(one, four):
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        print(f"{name:<52} {x.shape[0]:>6} {x.var(0).min() / row.epsilon:>11.2e} "
              f"{np.linalg.norm(y4 - y1) / np.linalg.norm(y1):>11.1e} {gradient.get(name + '/scale', np.nan):>15.1e}")


def main(argv):
    del argv
    # Before the first device is touched: 4 virtual CPU devices and the tests' fast-compile flags.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")
    jax.config.update("jax_platforms", "cpu")
    assert jax.device_count() >= 4, "needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)"
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "auxmtl_jax_bench_cache"))
    print("Per-leaf relative differences of the step-1 gradient, ||g_b - g_a|| / ||g_a||: worst leaf (median "
          "over leaves), the exact-zero leaves left out. Kinks: ReLU inputs on the other side of 0.\n")
    print("| size | n/stat, stride 32 | f32: 4 vs 1 dev | kinks | f32 vs f64, 1 dev | f32 vs f64, 4 dev | kinks "
          "f32 vs f64 | f64: 4 vs 1 dev | f64 change for a 1e-7 change of the images | worst leaf, f32 4 vs 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        m = measure(row)
        pair = {key: f"{m[key][0]:.1e} ({m[key][1]:.1e})" for key in ("f32", "f32_1_64", "f32_4_64", "f64",
                                                                        "sensitivity")}
        print(f"| {row.label} | {row.deepest_statistic} | {pair['f32']} | {m['kinks']} | {pair['f32_1_64']} | "
              f"{pair['f32_4_64']} | {m['kinks_64']} | {pair['f64']} | {pair['sensitivity']} | {m['f32'][2]} |",
              flush=True)
    print(f"\n({m['zero']} of {m['leaves']} leaves have an exact gradient of zero.)")
    if _PER_LAYER.value:
        per_layer_table(ROWS[0])


if __name__ == "__main__":
    app.run(main)
