r"""How far representation space (`weighting.space='representation'`) moves each gradient treatment's update from
the parameter-space one, on the same network, weights and batches.

Use a strategy without aux modules (Joint): the aux and deep-supervision gradients are added to the shared update
untreated and would dominate the comparison. For each treatment: the cosine between the two shared-parameter
updates (encoder, and Context's ASPP) and between the whole updates, the ratio of the shared updates' norms, and the coefficients c in both spaces. Batches are real
synthetic scenes (`datasets/synthetic_scenes/render.py`, test split, cropped to the config's crop size); the
weights are the config's initialisation, or a trained start with `--config.model.encoder_init=<workdir>`.
No dataset needs preparing.

  python benchmarks/treatment_spaces.py --config=configs/synthetic_three_task.py:strategy=joint
  python benchmarks/treatment_spaces.py --config=configs/synthetic_three_task.py:strategy=joint \
      --config.model.encoder_init=workdirs/encoder_start
"""

from __future__ import annotations

import copy
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from auxmtl_jax import parallel
from auxmtl_jax import training as train
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.training.steps import loss_terms, split_loss_terms
from auxmtl_jax.weighting.base import GRADIENT, partition
from auxmtl_datasets.synthetic_scenes import render

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with optional ':variant'.")
_TREATMENTS = flags.DEFINE_list("treatments", ["all"], "Treatments to compare ('all': every gradient treatment).")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches to average over.")
flags.mark_flag_as_required("config")

SCENE_SIZE = (96, 128)


def scene_batch(config, first: int) -> dict[str, np.ndarray]:
    """`config.batch_size` rendered test scenes from index `first`, centre-cropped to the crop size."""
    height, width = config.input.crop_size
    top, left = (SCENE_SIZE[0] - height) // 2, (SCENE_SIZE[1] - width) // 2
    examples = [render.render_example(0, "test", first + index, *SCENE_SIZE) for index in range(config.batch_size)]
    crop = lambda array: array[top:top + height, left:left + width]
    batch = {"image": np.stack([crop(example["image"]) for example in examples]).astype(np.uint8)}
    if "segmentation" in config.tasks:
        batch["segmentation"] = np.stack([crop(example["segmentation"]) for example in examples]).astype(np.int32)
    if "depth" in config.tasks:
        batch["depth"] = np.stack([crop(example["depth"]) for example in examples]).astype(np.float32)
    if "normal" in config.tasks:
        batch["normal"] = np.stack([crop(example["normal"]) for example in examples]).astype(np.float32)
    return batch


def cosine(a, b) -> float:
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return float(dot / (norm(a) * norm(b) + 1e-30))


def norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def update_function(config, model, state, name: str, space: str):
    """`batch -> Weighted` of the treatment `name` in `space` at the state's weights, jitted."""
    options = copy.deepcopy(config.weighting)
    options.space = space
    weighting = weighting_lib.get_weighting(name, options, steps_per_epoch=100)
    params = dict(state.params)
    names = weighting_lib.state_names(config, model.aux_tasks)
    if weighting.init(names):
        params["loss_weighting"] = weighting.init(names)

    @jax.jit
    def step(batch):
        terms_fn = lambda p: loss_terms(model, config, p, state.batch_stats, batch)
        split = split_loss_terms(model, config, state.batch_stats, batch)
        return weighting.value_and_grad(terms_fn, split)(params, weighting.init_state(names), jax.random.key(0))

    return step


def main(argv):
    del argv
    config = _CONFIG.value
    model = train.create_model(config, len(render.CLASS_NAMES))
    mesh = parallel.create_mesh(1)
    state, _, _, _ = train.create_sharded_train_state(config, model, mesh)
    names = ([name for name in weighting_lib.WEIGHTINGS
              if weighting_lib.build_method(name, steps_per_epoch=1).kind == GRADIENT]
             if _TREATMENTS.value == ["all"] else _TREATMENTS.value)
    batches = [scene_batch(config, index * config.batch_size) for index in range(_BATCHES.value)]
    print(f"strategy aux tasks={model.aux_tasks}  decoder={config.model.decoder} width={config.model.width_multiplier}"
          f"  batch {config.batch_size} x {tuple(config.input.crop_size)}  {len(batches)} batches of rendered test "
          f"scenes  init={config.model.get('encoder_init') or 'config initialisation'}")
    print("| treatment | cos(shared updates) | cos(whole updates) | ‖shared‖ repr / params | c in parameter space |"
          " c in representation space |")
    print("|---|---|---|---|---|---|")
    for name in names:
        shared_cos, whole_cos, ratios, coefficients = [], [], [], {"parameters": [], "representation": []}
        functions = {space: update_function(config, model, state, name, space)
                     for space in ("parameters", "representation")}
        for batch in batches:
            results = {space: function(batch) for space, function in functions.items()}
            shared = {space: partition(result.grads)[0] for space, result in results.items()}
            whole = {space: {key: value for key, value in result.grads.items() if key != "loss_weighting"}
                     for space, result in results.items()}
            shared_cos.append(cosine(shared["parameters"], shared["representation"]))
            whole_cos.append(cosine(whole["parameters"], whole["representation"]))
            ratios.append(float(norm(shared["representation"]) / norm(shared["parameters"])))
            for space, result in results.items():
                coefficients[space].append(np.asarray([result.weights[key] for key in sorted(result.weights)]))
        mean_c = {space: [round(float(value), 3) for value in np.mean(values, axis=0)]
                  for space, values in coefficients.items()}
        print(f"| {name} | {statistics.mean(shared_cos):.3f} (min {min(shared_cos):.3f}) | "
              f"{statistics.mean(whole_cos):.3f} | {statistics.mean(ratios):.2f} | {mean_c['parameters']} | "
              f"{mean_c['representation']} |")


if __name__ == "__main__":
    app.run(main)
