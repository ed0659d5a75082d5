r"""Compile time and train-step throughput (images/s) of a config's network on random data.

No dataset needed: batches are random tensors with the config's crop size and task layouts.

  python benchmarks/train_step.py --config=configs/synthetic_three_task.py:strategy=auxi_all
  python benchmarks/train_step.py --config=configs/sunrgbd_three_task.py --num_classes=13 --steps=20
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auxmtl_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with optional ':variant'.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 13, "Segmentation classes of the benchmarked head.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.mark_flag_as_required("config")


def random_batch(config, num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    height, width = config.input.crop_size
    batch = {"image": rng.standard_normal((config.batch_size, height, width, 3), dtype=np.float32)}
    if "segmentation" in config.tasks:
        batch["segmentation"] = rng.integers(0, num_classes, (config.batch_size, height, width), dtype=np.int32)
    if "depth" in config.tasks:
        batch["depth"] = rng.uniform(0.5, 8.0, (config.batch_size, height, width, 1)).astype(np.float32)
    if "normal" in config.tasks:
        normal = rng.standard_normal((config.batch_size, height, width, 3)).astype(np.float32)
        batch["normal"] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
    return batch


def main(argv):
    del argv
    config = _CONFIG.value
    model = train.create_model(config, _NUM_CLASSES.value)
    mesh = parallel.create_mesh(config.get("num_devices"))
    lr_fn = train.create_learning_rate_fn(config.optimizer, config.num_train_steps)
    state, tx = train.create_train_state(config, model, jax.random.key(0), (*config.input.crop_size, 3), lr_fn)
    state_sharding = jax.tree.map(lambda _: parallel.replicated_sharding(mesh), state)
    state = jax.device_put(state, state_sharding)
    step_fn = jax.jit(functools.partial(train.train_step, model=model, config=config, tx=tx, learning_rate_fn=lr_fn),
                      in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sharding, parallel.replicated_sharding(mesh)), donate_argnums=0)
    batch = parallel.global_batch(random_batch(config, _NUM_CLASSES.value, np.random.default_rng(0)), mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(state.params["main"]))
    print(f"device: {jax.devices()[0].device_kind} x{mesh.size}  config: {config.name}  "
          f"encoder={config.model.encoder} decoder={config.model.decoder} width={config.model.width_multiplier} "
          f"tasks={','.join(config.tasks)} aux={','.join(config.aux.tasks) or '-'} dtype={config.model.dtype}")
    print(f"batch {config.batch_size} x {tuple(config.input.crop_size)}  main params {params / 1e6:.2f}M")
    print(f"compile {compile_seconds:.1f} s   step {1000 * seconds / _STEPS.value:.1f} ms   "
          f"{_STEPS.value * config.batch_size / seconds:.1f} images/s   loss {float(metrics['loss/total']):.4f}")


if __name__ == "__main__":
    app.run(main)
