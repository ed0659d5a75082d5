r"""Unrolled against vmapped per-task VJPs of the shared part (`weighting.split_backward.SHARED_ROWS`): step time,
XLA FLOPs and bytes accessed of Joint and Auxi-all under one treatment, next to equal weighting, all interleaved.

  python benchmarks/shared_rows.py --config=configs/synthetic_three_task.py --treatment=pcgrad
"""

from __future__ import annotations

import statistics

from absl import app, flags

import train_step as bench
from auxmtl_jax.weighting import split_backward

_TREATMENT = flags.DEFINE_string("treatment", "pcgrad", "The gradient treatment (config.loss_weighting).")


def main(argv):
    del argv
    config = bench._CONFIG.value
    runs = []
    for strategy in bench._STRATEGIES.value:
        runs.append(bench.prepare(config, strategy, bench._NUM_CLASSES.value, "equal")._replace(
            name=f"{strategy} / equal"))
        for mode in ("vmap", "unrolled"):
            split_backward.SHARED_ROWS = mode  # read when the step is traced, inside prepare
            runs.append(bench.prepare(config, strategy, bench._NUM_CLASSES.value, _TREATMENT.value)._replace(
                name=f"{strategy} / {_TREATMENT.value}, {mode} rows"))
    seconds = {run.name: [] for run in runs}
    for _ in range(bench._BLOCKS.value):
        for index, run in enumerate(runs):
            runs[index], per_step = bench.time_block(run, bench._STEPS.value)
            seconds[run.name].append(per_step)
    print(f"batch {config.batch_size} x {tuple(config.input.crop_size)}  {bench._BLOCKS.value} blocks of "
          f"{bench._STEPS.value} steps, interleaved")
    print("| run | compile s | GFLOP/step | GB accessed/step | step ms |")
    print("|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.name} | {run.compile_seconds:.1f} | {run.flops / 1e9:.2f} | {run.bytes_accessed / 1e9:.2f} | "
              f"{1000 * statistics.median(seconds[run.name]):.0f} |")


if __name__ == "__main__":
    app.run(main)
