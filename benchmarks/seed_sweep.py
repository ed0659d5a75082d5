r"""Trains config variants over several seeds and prints each variant's mean ± std and its paired gain over a
reference variant (same seed), so a claim such as "Auxi-all improves on Joint" rests on more than one run.

  python benchmarks/seed_sweep.py --config=configs/synthetic_three_task.py --workdir=workdirs/seeds \
    --variant=joint=strategy=joint --variant=auxi_all=strategy=auxi_all --seeds=0,1,2

Each run trains into WORKDIR/<variant>_seed<k> with `train.train_and_evaluate`, so re-running the command
resumes unfinished runs and re-reads finished ones. The first --variant is the reference of the paired gains.
"""

from __future__ import annotations

import copy
import statistics

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from auxmtl_configs import common
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with optional ':variant'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the runs.")
_VARIANTS = flags.DEFINE_multi_string("variant", None, "NAME=VARIANT_STRING; the first one is the reference.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_METRICS = flags.DEFINE_list("metrics", ["segmentation/miou", "depth/abs_err", "normal/mean"],
                             "task/metric columns to summarise.")
flags.mark_flags_as_required(["config", "workdir", "variant"])


def parse_variants(specs: list[str]) -> dict[str, str]:
    variants = {}
    for spec in specs:
        name, sep, variant = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--variant={spec!r}: expected NAME=VARIANT_STRING, e.g. auxi_all=strategy=auxi_all")
        variants[name] = variant
    return variants


def run(config, variant: str, seed: int, workdir: epath.Path) -> dict:
    """Test metrics of one (variant, seed) run, training it unless it has finished."""
    child = copy.deepcopy(config)
    child.runs = None
    common.apply_variant(child, variant)
    child.seed = seed
    return train.train_and_evaluate(child, str(workdir))["metrics"]


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(argv):
    del argv
    variants = parse_variants(_VARIANTS.value)
    seeds = [int(seed) for seed in _SEEDS.value]
    root = epath.Path(_WORKDIR.value)
    results = {name: {seed: run(_CONFIG.value, variant, seed, root / f"{name}_seed{seed}") for seed in seeds}
               for name, variant in variants.items()}
    reference = next(iter(variants))
    columns = [tuple(metric.split("/")) for metric in _METRICS.value]
    print(f"\n{len(seeds)} seeds {seeds}; paired Δm% against {reference} of the same seed")
    print("| variant | " + " | ".join(f"{task}/{metric}" for task, metric in columns) + " | Δm% vs reference |")
    print("|---" * (len(columns) + 2) + "|")
    for name in variants:
        cells = [mean_std([results[name][seed][task][metric] for seed in seeds]) for task, metric in columns]
        gains = [metrics_lib.delta_m(results[name][seed], results[reference][seed]) for seed in seeds]
        per_seed = ", ".join(f"{gain:+.2f}" for gain in gains)
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(gains):+.2f} ({per_seed}) |")


if __name__ == "__main__":
    app.run(main)
