"""Where an experiment's seed-to-seed spread comes from: the test set, or training itself.

    python benchmarks/experiment_noise.py workdirs/exp_strategies_cpu --runs=joint,auxi_both --test_sets=10

For each seed, the exported models of runs A and B are evaluated on `--test_sets` fresh, disjoint test sets of
`--scenes` synthetic scenes each (rendered after the stored test split, so none was seen or reported), and the
paired Δm% of B against A (same seed) is printed per set. The spread over test sets is what test-set sampling
alone adds to one comparison; the spread over seeds of the per-seed means is what training adds. Only
`synthetic_scenes` experiments can be re-rendered.
"""

from __future__ import annotations

import argparse
import json
import math

import jax.numpy as jnp
import numpy as np
from etils import epath

from auxmtl_jax import comparison
from auxmtl_jax import inference
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax.experiments import runner
from auxmtl_datasets.synthetic_scenes import builder, render


def fresh_test_sets(dataset_config: str, num_sets: int, scenes: int) -> list[dict[str, np.ndarray]]:
    """`num_sets` disjoint sets of `scenes` test scenes, indexed after the builder's stored test split."""
    config = next(c for c in builder.SyntheticScenes.BUILDER_CONFIGS if c.name == dataset_config)
    sets = []
    for k in range(num_sets):
        first = config.num_test + k * scenes
        examples = [render.render_example(config.seed, "test", first + i, config.height, config.width)
                    for i in range(scenes)]
        sets.append({key: np.stack([example[key] for example in examples]) for key in examples[0]})
    return sets


def evaluate(predictor: inference.Predictor, test_set: dict[str, np.ndarray], batch: int = 50) -> dict:
    """Test metrics of an exported model on one rendered set (segmentation scored from its logits)."""
    predict = inference._predict_fn(predictor.model)
    state = metrics_lib.init_state(predictor.tasks, predictor.num_classes)
    for start in range(0, len(test_set["image"]), batch):
        images = predictor.normalise(test_set["image"][start:start + batch])
        labels = {task: jnp.asarray(test_set[task][start:start + batch]) for task in predictor.tasks}
        state = metrics_lib.update_state(state, predict(predictor.variables, jnp.asarray(images)), labels)
    return metrics_lib.compute(state)


def seeds_of(runs: epath.Path, run: str) -> list[int]:
    prefix = f"{run}_seed"
    return sorted(int(path.name[len(prefix):]) for path in runs.glob(f"{prefix}*")
                  if (path / "inference").exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment_dir")
    parser.add_argument("--runs", default="joint,auxi_both", help="A,B: Δm%% of B is measured against A")
    parser.add_argument("--test_sets", type=int, default=10)
    parser.add_argument("--scenes", type=int, default=200, help="scenes per test set (the demo split has 200)")
    args = parser.parse_args()
    root = epath.Path(args.experiment_dir)
    runs = runner.runs_root(root, runner.read_experiment_record(root).get("runs_dir"))
    run_a, run_b = args.runs.split(",")
    seeds = sorted(set(seeds_of(runs, run_a)) & set(seeds_of(runs, run_b)))
    if len(seeds) < 2:
        raise SystemExit(f"{root}: runs {run_a} and {run_b} share {len(seeds)} finished seeds; expected at least 2")
    run_config = json.loads((runner.run_workdir(runs, run_a, seeds[0]) / "config.json").read_text())
    if run_config["dataset"]["name"] != "synthetic_scenes":
        raise SystemExit(f"{root}: dataset {run_config['dataset']['name']!r}; only synthetic_scenes can be re-rendered")
    test_sets = fresh_test_sets(run_config["dataset"]["config"], args.test_sets, args.scenes)

    print(f"Δm% of {run_b} against {run_a} of the same seed, on {args.test_sets} fresh sets of {args.scenes} scenes")
    per_seed = {}
    for seed in seeds:
        predictors = {run: inference.Predictor.load(runner.run_workdir(runs, run, seed) / "inference")
                      for run in (run_a, run_b)}
        results = {run: [evaluate(predictor, test_set) for test_set in test_sets]
                   for run, predictor in predictors.items()}
        per_seed[seed] = [comparison.delta_m(b, a) for a, b in zip(results[run_a], results[run_b])]
        stored = [json.loads((runner.run_workdir(runs, run, seed) / "results.json").read_text())["metrics"]
                  for run in (run_a, run_b)]
        print(f"seed {seed}: stored test split {comparison.delta_m(stored[1], stored[0]):+6.2f}; fresh sets "
              f"mean {np.mean(per_seed[seed]):+6.2f}, sd {np.std(per_seed[seed], ddof=1):.2f} "
              f"[{', '.join(f'{value:+.1f}' for value in per_seed[seed])}]")
    test_sd = math.sqrt(np.mean([np.var(values, ddof=1) for values in per_seed.values()]))
    seed_means = [np.mean(values) for values in per_seed.values()]
    print(f"test-set sampling: sd {test_sd:.2f} Δm% points per comparison on {args.scenes} scenes (pooled over seeds)")
    print(f"training: sd {np.std(seed_means, ddof=1):.2f} Δm% points between seeds "
          f"(of the per-seed means over {args.test_sets * args.scenes} scenes)")


if __name__ == "__main__":
    main()
