"""The experiment layer: the paper's comparisons over seeds, with intervals and paired tests.

  python -m auxmtl_jax.experiments three_tasks --workdir=workdirs/exp_three_tasks --size=cpu --seeds=3

`run_and_report` trains (or reads) every run of a named experiment for each seed, each an ordinary resumable
workdir, then writes report.md, summary.json and the figures (`report.write_report`).
"""

from __future__ import annotations

from typing import Sequence

import jax
from etils import epath

from auxmtl_jax import train
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import report, runner
from auxmtl_jax.experiments.definitions import EXPERIMENTS, Claim, Experiment, Run

__all__ = ["EXPERIMENTS", "Claim", "Experiment", "Run", "run_and_report", "setting_line"]


def setting_line(experiment: Experiment, size: str, dataset: str, overrides: Sequence[str] = ()) -> str:
    """One sentence on what each run is: data, network, schedule and the machine."""
    config = runner.base_config(experiment, size=size, dataset=dataset, overrides=overrides)
    device = jax.devices()[0]
    return (f"Size `{size}`: {config.dataset.name}/{config.dataset.config}, tasks {', '.join(config.tasks)}; "
            f"{config.model.encoder} x{config.model.width_multiplier} {_encoder_start(config)}, "
            f"aux width {config.aux.channels}; "
            f"{config.num_train_steps} steps of batch {config.batch_size} on {tuple(config.input.crop_size)} crops, "
            f"SGD lr {config.optimizer.learning_rate} ({config.optimizer.schedule}); "
            f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"
            + (f"; overrides {', '.join(overrides)}" if overrides else ""))


def _encoder_start(config) -> str:
    if train.encoder_start(config) is None:
        return "from scratch"
    return f"starting from the encoder of {config.model.encoder_init}"


def run_and_report(experiment: str | Experiment, workdir: str, *, seeds: int | Sequence[int] | None = None,
                   size: str = "cpu", dataset: str = "synthetic_scenes",
                   overrides: Sequence[str] = ()) -> list[epath.Path]:
    """Runs `experiment` (a name of EXPERIMENTS or an Experiment) for `seeds` (a count: seeds 0..N-1, default by
    size) and writes its report; returns the report's files."""
    if isinstance(experiment, str):
        if experiment not in EXPERIMENTS:
            raise UserError(f"experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
        experiment = EXPERIMENTS[experiment]
    seeds = runner.DEFAULT_SEEDS.get(size, 3) if seeds is None else seeds
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    results = runner.run_experiment(experiment, workdir, seeds=seeds, size=size, dataset=dataset,
                                    overrides=overrides)
    if jax.process_index() != 0:
        return []
    return report.write_report(experiment, workdir, results, seeds=seeds,
                               setting=setting_line(experiment, size, dataset, overrides),
                               wall_seconds=runner.wall_seconds(epath.Path(workdir), experiment, seeds))
