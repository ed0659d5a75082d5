"""Model size at the paper's settings, and (``--train-step``) compile time and train-step throughput.

    python benchmarks/model_size.py                 # `main` parameter counts vs the paper's Table 1
    python benchmarks/model_size.py --train-step    # + MobileNetV2 U-shape, 3 tasks, aux for all, 385x385, batch 12

Parameter counts come from ``jax.eval_shape`` (nothing is compiled). The train step is a plain SGD-momentum
step on the sum of main and auxiliary task losses over a synthetic batch, run on whatever backend JAX picks.
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax

from auxmtl_jax import tasks as task_lib
from auxmtl_jax.models import DECODERS, build_model

# Liu et al., Table 1: MobileNetV2 (width 1.0), NYUv2 segmentation (40 classes) + depth.
PAPER_MAIN_PARAMETERS_MILLIONS = {"baseline": 3.31, "context": 3.98, "ushape": 4.19}
PAPER_TASKS = {"segmentation": 40, "depth": 1}
THREE_TASKS = {"segmentation": 13, "depth": 1, "normal": 3}


def model_config(decoder: str, dtype: str = "float32") -> SimpleNamespace:
    return SimpleNamespace(encoder="mobilenet_v2", width_multiplier=1.0, output_stride=None, decoder=decoder,
                           head_channels=None, dtype=dtype)


def parameter_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def print_parameter_table() -> None:
    """`main` parameter counts per decoder next to the paper's Table 1."""
    print("| decoder  | main params (ours) | paper (Table 1) | gap    |")
    print("|----------|--------------------|-----------------|--------|")
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    for decoder in DECODERS:
        model = build_model(model_config(decoder), PAPER_TASKS)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        ours = parameter_count(variables["params"]["main"]) / 1e6
        paper = PAPER_MAIN_PARAMETERS_MILLIONS[decoder]
        print(f"| {decoder:<8} | {ours:17.2f}M | {paper:14.2f}M | {100 * (ours - paper) / paper:+5.1f}% |")


def synthetic_batch(batch_size: int, size: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 4)
    normal = jax.random.normal(keys[3], (batch_size, size, size, 3))
    return {
        "image": jax.random.normal(keys[0], (batch_size, size, size, 3)),
        "segmentation": jax.random.randint(keys[1], (batch_size, size, size), 0, THREE_TASKS["segmentation"]),
        "depth": jax.random.uniform(keys[2], (batch_size, size, size, 1), minval=0.5, maxval=10.0),
        "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True),
    }


def benchmark_train_step(batch_size: int, size: int, steps: int, dtype: str) -> None:
    """Compile time and images/s of one SGD step of the full paper net (main + aux for every task)."""
    aux_cfg = SimpleNamespace(tasks=tuple(THREE_TASKS), features=(), adaptor="conv1x1", aggregate="concat",
                              channels=64)
    model = build_model(model_config("ushape", dtype), THREE_TASKS, aux_cfg)
    batch = synthetic_batch(batch_size, size)
    optimizer = optax.sgd(0.01, momentum=0.9)

    start = time.perf_counter()
    variables = jax.jit(model.init)(jax.random.key(0), batch["image"][:1])
    jax.block_until_ready(variables)
    print(f"init (compile + run): {time.perf_counter() - start:.1f}s; params: main "
          f"{parameter_count(variables['params']['main']) / 1e6:.2f}M, aux "
          f"{parameter_count(variables['params']['aux']) / 1e6:.2f}M")

    def loss_fn(params, batch_stats, batch):
        outputs, new_batch_stats = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                               train=True)
        main_losses = task_lib.task_losses(outputs.main, batch)
        aux_losses = task_lib.task_losses(outputs.aux, batch)
        return sum(main_losses.values()) + sum(aux_losses.values()), new_batch_stats

    def train_step(params, batch_stats, opt_state, batch):
        (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, opt_state, loss

    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"train step compile: {compile_seconds:.1f}s; XLA cost analysis: "
          f"{cost.get('flops', float('nan')) / 1e12:.2f} TFLOP per step")

    params, batch_stats, opt_state, loss = compiled(*state, batch)  # warm-up
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(steps):
        params, batch_stats, opt_state, loss = compiled(params, batch_stats, opt_state, batch)
    jax.block_until_ready(loss)
    seconds = (time.perf_counter() - start) / steps
    print(f"train step ({jax.devices()[0].platform}, {len(jax.devices())} device(s), batch {batch_size}, "
          f"{size}x{size}, {dtype}): {seconds:.2f}s/step, {batch_size / seconds:.2f} images/s, "
          f"loss {float(loss):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-step", action="store_true", help="also time a full train step")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--size", type=int, default=385)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    print_parameter_table()
    if args.train_step:
        benchmark_train_step(args.batch_size, args.size, args.steps, args.dtype)


if __name__ == "__main__":
    main()
