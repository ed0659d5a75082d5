r"""Search throughput: candidates per hour with one compiled population step vs a fresh model per candidate.

(a) the search's way (``auxmtl_jax.nas.search``): the searchable network compiled once, ``--population``
    candidates trained together per generation (vmap), genotypes as data;
(b) the naive loop: per candidate, build the static network of its genotype, create its train state, jit and run
    its train step and its evaluation.

Both use the config's proxy schedule (``search.steps``, meta-train / meta-val slices) and the same genotypes, in
one process, one after the other. Printed: seconds per candidate in steady state, the one-off compile cost, and
candidates per hour for a search of ``--search_size`` candidates (compile amortised over it).

  python benchmarks/nas_throughput.py --config=configs/nas_search.py --generations=3 --naive=3
  python benchmarks/nas_throughput.py --config=configs/nas_search.py:runlocal --generations=2 --naive=2
"""

from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auxmtl_jax import input_pipeline
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import training as train_lib
from auxmtl_jax.models import build_model
from auxmtl_jax.nas import genotype_from_json_dict
from auxmtl_jax.nas import ppo as ppo_lib
from auxmtl_jax.nas import reward as reward_lib
from auxmtl_jax.nas import search as search_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A search config (configs/nas_search.py).")
_GENERATIONS = flags.DEFINE_integer("generations", 3, "Generations timed for (a); the first includes compiling.")
_NAIVE = flags.DEFINE_integer("naive", 3, "Candidates timed for (b).")
_SEARCH_SIZE = flags.DEFINE_integer("search_size", 2000, "Candidates of the search the rates are quoted for.")
flags.mark_flag_as_required("config")


def time_population(config) -> tuple[float, float, list]:
    """(first generation's seconds incl. compiling, steady seconds per candidate, genotypes sampled)."""
    search = search_lib.prepare_search(config)
    ppo_state = ppo_lib.init_ppo_state(search.controller.init(jax.random.key(config.seed + 1)),
                                       search_lib.ppo_config(config), search.controller)
    durations, genotypes, reference = [], [], math.nan
    for generation in range(_GENERATIONS.value):
        start = time.perf_counter()
        _, _, records, reference = search_lib.run_generation(search, ppo_state, generation, reference)
        durations.append(time.perf_counter() - start)
        genotypes += [record["genotype"] for record in records]
    steady = float(np.median(durations[1:])) / config.search.population if len(durations) > 1 else math.nan
    return durations[0], steady, genotypes


def time_naive(config, genotypes) -> list[float]:
    """Seconds per candidate when each genotype gets its own network, train state and compiled steps."""
    dataset = input_pipeline.dataset_info(config.dataset)
    train_cfg, val_cfg = search_lib.meta_dataset_configs(config)
    channels = train_lib.task_channels(config.tasks, dataset.num_classes)
    seconds = []
    for genotype in genotypes:
        start = time.perf_counter()
        aux = SimpleNamespace(genotype=genotype_from_json_dict(genotype), channels=config.aux.channels)
        model = build_model(config.model, channels, aux_cfg=aux)
        lr_fn = train_lib.run_learning_rate_fn(config, sum(config.search.steps))
        state, tx = train_lib.create_train_state(config, model, jax.random.key(config.seed), lr_fn)
        step = jax.jit(functools.partial(train_lib.train_step, model=model, config=config, tx=tx,
                                         learning_rate_fn=lr_fn))
        batches = input_pipeline.create_train_iterator(train_cfg, config.input, tasks=tuple(config.tasks),
                                                       global_batch_size=config.batch_size, seed=config.seed)
        for _ in range(sum(config.search.steps)):
            state, metrics = step(state, next(batches))
        batches.close()
        evaluate = jax.jit(functools.partial(train_lib.eval_step, model=model))
        metric_state = metrics_lib.init_state(tuple(config.tasks), dataset.num_classes)
        for batch in input_pipeline.create_eval_dataset(val_cfg, config.input, tasks=tuple(config.tasks),
                                                        global_batch_size=config.eval_batch_size):
            metric_state = evaluate(train_lib.main_variables(state), metric_state, batch)
        reward_lib.reward(metrics_lib.compute(metric_state))
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv):
    del argv
    config = _CONFIG.value
    first, steady, genotypes = time_population(config)
    naive = time_naive(config, genotypes[:_NAIVE.value])
    size = _SEARCH_SIZE.value
    population_hours = (first + steady * (size - config.search.population)) / 3600
    naive_hours = float(np.median(naive)) * size / 3600
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"population {config.search.population}  steps {tuple(config.search.steps)}  "
          f"batch {config.batch_size} x {tuple(config.input.crop_size)}  width {config.model.width_multiplier}")
    print("| way | first generation / candidate (s, incl. compile) | steady s / candidate | "
          f"candidates / hour over {size} |")
    print("|---|---|---|---|")
    print(f"| (a) one compile, vmapped population | {first:.1f} (generation) | {steady:.2f} | "
          f"{size / population_hours:.0f} |")
    print(f"| (b) fresh model per candidate | {naive[0]:.1f} | {np.median(naive):.2f} | {size / naive_hours:.0f} |")
    print(f"(a) / (b): {naive_hours / population_hours:.1f}x")


if __name__ == "__main__":
    app.run(main)
