r"""Train-step cost of a config's network under several strategies and loss weightings, on random data.

For each strategy (x weighting): train-state creation time (jitted init), compile time, XLA's FLOP count and bytes
accessed per step, and step time / images/s. Steps are timed in interleaved blocks (strategy A, B, A, B, ...) and
the median block is reported, so the ratios hold on a noisy shared machine. No dataset is needed.

  # the paper net (MobileNetV2 U-shape, 3 tasks, 385x385, batch 12): Joint vs Auxi-all
  python benchmarks/train_step.py --config=configs/sunrgbd_three_task.py --strategies=joint,auxi_all
  # the same in bfloat16, and with the aux modules aggregating at the finest stage
  python benchmarks/train_step.py --config=configs/sunrgbd_three_task.py:dtype=bfloat16
  python benchmarks/train_step.py --config=configs/sunrgbd_three_task.py --config.aux.resolution=finest
  # a quick look on a laptop
  python benchmarks/train_step.py --config=configs/synthetic_three_task.py --blocks=3
  # the cost of each loss weighting / gradient treatment at the demo size, Joint and Auxi-all (README table)
  python benchmarks/train_step.py --config=configs/synthetic_three_task.py --weightings=all
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auxmtl_jax import parallel, variants
from auxmtl_jax import training as train
from auxmtl_jax import weighting as weighting_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with optional ':variant'.")
_STRATEGIES = flags.DEFINE_list("strategies", ["joint", "auxi_all"], "Strategies to compare (config variants).")
_WEIGHTINGS = flags.DEFINE_list("weightings", ["equal"], "Loss weightings to run each strategy with "
                                "(config.loss_weighting values, or 'all'); times are relative to the first run.")
_ONE_GROUP = flags.DEFINE_bool("one_group", False, "With several weightings, time every strategy x weighting in one "
                                "interleaved group (so strategies compare too), not one group per strategy.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 13, "Segmentation classes of the benchmarked head.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed block.")
_BLOCKS = flags.DEFINE_integer("blocks", 3, "Timed blocks per strategy (interleaved).")
flags.mark_flag_as_required("config")


def random_batch(config, num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global batch with the config's crop size and the layouts of its tasks (ARCHITECTURE.md batch contract):
    uint8 images, normalised inside the step as the input pipeline's are."""
    height, width = config.input.crop_size
    batch = {"image": rng.integers(0, 256, (config.batch_size, height, width, 3), dtype=np.uint8)}
    if "segmentation" in config.tasks:
        batch["segmentation"] = rng.integers(0, num_classes, (config.batch_size, height, width), dtype=np.int32)
    if "depth" in config.tasks:
        batch["depth"] = rng.uniform(0.5, 8.0, (config.batch_size, height, width, 1)).astype(np.float32)
    if "normal" in config.tasks:
        normal = rng.standard_normal((config.batch_size, height, width, 3)).astype(np.float32)
        batch["normal"] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
    return batch


class Prepared(NamedTuple):
    name: str
    step: Any
    state: Any
    batch: Any
    init_seconds: float
    compile_seconds: float
    flops: float
    bytes_accessed: float


def prepare(config, strategy: str, num_classes: int, weighting: str = "equal") -> Prepared:
    """Creates the train state and compiles the real training step (`training.train_step`) for one strategy and
    loss weighting."""
    config = variants.apply_strategy(copy.deepcopy(config), strategy)
    config.loss_weighting = weighting
    model = train.create_model(config, num_classes)
    mesh = parallel.create_mesh(config.get("num_devices"))
    start = time.perf_counter()
    state, state_sharding, tx, lr_fn = train.create_sharded_train_state(config, model, mesh)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    # DWA's period (one epoch by default) does not change the step's cost.
    step = functools.partial(train.train_step, model=model, config=config, tx=tx, learning_rate_fn=lr_fn,
                             weighting=weighting_lib.from_config(config, steps_per_epoch=100))
    step_fn = jax.jit(step,
                      in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sharding, parallel.replicated_sharding(mesh)), donate_argnums=0)
    batch = parallel.global_batch(random_batch(config, num_classes, np.random.default_rng(0)), mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    name = strategy if weighting == "equal" and len(_WEIGHTINGS.value) == 1 else f"{strategy} / {weighting}"
    return Prepared(name, compiled, state, batch, init_seconds, compile_seconds, float(cost.get("flops", np.nan)),
                    float(cost.get("bytes accessed", np.nan)))


def time_block(prepared: Prepared, steps: int) -> tuple[Prepared, float]:
    """Seconds per step over `steps` steps; returns the advanced state too (the step donates it)."""
    state = prepared.state
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = prepared.step(state, prepared.batch)
    jax.block_until_ready(metrics)
    return prepared._replace(state=state), (time.perf_counter() - start) / steps


def timed_group(config, strategies, weightings) -> list[tuple[Prepared, float]]:
    """Prepares the runs of `strategies` x `weightings`, times them in interleaved blocks and returns each with its
    median seconds per step (the compiled programs are freed when the caller drops them)."""
    runs = [prepare(config, strategy, _NUM_CLASSES.value, weighting)
            for strategy in strategies for weighting in weightings]
    seconds = {run.name: [] for run in runs}
    for _ in range(_BLOCKS.value):
        for index, run in enumerate(runs):
            runs[index], per_step = time_block(run, _STEPS.value)
            seconds[run.name].append(per_step)
    return [(run._replace(step=None, state=None, batch=None), statistics.median(seconds[run.name])) for run in runs]


def main(argv):
    del argv
    config = _CONFIG.value
    weightings = list(weighting_lib.WEIGHTINGS) if _WEIGHTINGS.value == ["all"] else _WEIGHTINGS.value
    per_strategy = len(weightings) > 1
    # With several weightings each strategy is its own group: a dozen compiled steps at a time fit in memory.
    groups = ([[strategy] for strategy in _STRATEGIES.value] if per_strategy and not _ONE_GROUP.value
              else [_STRATEGIES.value])
    timed = []
    for strategies in groups:
        timed += timed_group(config, strategies, weightings)
        jax.clear_caches()

    first, first_step = timed[0]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"encoder={config.model.encoder} decoder={config.model.decoder} width={config.model.width_multiplier} "
          f"dtype={config.model.dtype} aux.resolution={config.aux.resolution}  "
          f"batch {config.batch_size} x {tuple(config.input.crop_size)}  "
          f"{_BLOCKS.value} blocks of {_STEPS.value} steps")
    against = f"time vs {weightings[0]}" if per_strategy else "time vs first"
    print(f"| run | init s | compile s | GFLOP/step | FLOPs vs first | GB accessed/step | step ms | images/s | "
          f"{against} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index, (run, step) in enumerate(timed):
        reference_step = timed[index - index % len(weightings)][1] if per_strategy else first_step
        print(f"| {run.name} | {run.init_seconds:.1f} | {run.compile_seconds:.1f} | {run.flops / 1e9:.1f} | "
              f"{run.flops / first.flops:.3f}x | {run.bytes_accessed / 1e9:.2f} | {1000 * step:.0f} | "
              f"{config.batch_size / step:.1f} | {step / reference_step:.2f}x |")


if __name__ == "__main__":
    app.run(main)
