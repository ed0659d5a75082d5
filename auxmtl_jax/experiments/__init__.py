"""The experiment layer: the paper's comparisons over seeds, with intervals and paired tests.

  python -m auxmtl_jax.experiments three_tasks --workdir=workdirs/exp_three_tasks --size=cpu --seeds=3
  python -m auxmtl_jax.experiments report workdirs/exp_three_tasks --delta_m=metric_set

`run_and_report` trains (or reads) every run of a named experiment for each seed, each an ordinary resumable
workdir, then writes report.md, summary.json and the figures (`report.write_report`). `rewrite_report` renders
them again from the finished runs (or, without the runs, from summary.json) and trains nothing.
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
from etils import epath

from auxmtl_jax import comparison
from auxmtl_jax.training.state import encoder_start
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import report, runner
from auxmtl_jax.experiments.definitions import PAPER_EXPERIMENTS, Claim, Experiment, Run, variants_experiment
from auxmtl_jax.experiments.premise import PREMISE_EXPERIMENTS

EXPERIMENTS = {**PAPER_EXPERIMENTS, **PREMISE_EXPERIMENTS}  # every named experiment, by name
__all__ = ["EXPERIMENTS", "Claim", "Experiment", "Run", "rewrite_report", "run_and_report", "setting_line"]


def setting_line(experiment: Experiment, size: str, dataset: str, overrides: Sequence[str] = ()) -> str:
    """One sentence on what each run is: data, network, schedule and the machine."""
    config = runner.base_config(experiment, size=size, dataset=dataset, overrides=overrides)
    device = jax.devices()[0]
    return (f"Size `{size}`: {config.dataset.name}/{config.dataset.config}, tasks {', '.join(config.tasks)}; "
            f"{_networks(experiment, config, overrides)}, aux width {config.aux.channels}; "
            f"{config.num_train_steps} steps of batch {config.batch_size} on {tuple(config.input.crop_size)} crops, "
            f"{'Adam' if config.optimizer.get('name') == 'adam' else 'SGD'} lr {config.optimizer.learning_rate} "
            f"({config.optimizer.schedule}); "
            f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"
            + (f"; overrides {', '.join(overrides)}" if overrides else ""))


def _networks(experiment: Experiment, base, overrides: Sequence[str]) -> str:
    """The encoder, width and start of the experiment's runs (their variants may change the base config's)."""
    described = []
    for run in experiment.runs:
        config = runner.run_config(experiment, run, 0, base, epath.Path("runs"), overrides)
        line = f"{config.model.encoder} x{config.model.width_multiplier} {_encoder_start(config)}"
        if line not in described:
            described.append(line)
    return " / ".join(described)


def _encoder_start(config) -> str:
    if encoder_start(config) is None:
        return "from scratch"
    return f"starting from the encoder of {config.model.encoder_init}"


def _named(experiment: str | Experiment) -> Experiment:
    if isinstance(experiment, Experiment):
        return experiment
    if experiment not in EXPERIMENTS:
        raise UserError(f"experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[experiment]


def run_and_report(experiment: str | Experiment, workdir: str, *, seeds: int | Sequence[int] | None = None,
                   size: str = "cpu", dataset: str = "synthetic_scenes", overrides: Sequence[str] = (),
                   runs_dir: str | None = None, delta_m: str = comparison.DELTA_M_DEFAULT) -> list[epath.Path]:
    """Runs `experiment` (a name of EXPERIMENTS or an Experiment) for `seeds` (a count: seeds 0..N-1, default by
    size) and writes its report; returns the report's files."""
    experiment = _named(experiment)
    comparison.delta_m_metrics(delta_m, experiment.tasks)  # a bad convention stops before any training
    seeds = runner.DEFAULT_SEEDS.get(size, 3) if seeds is None else seeds
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    results = runner.run_experiment(experiment, workdir, seeds=seeds, size=size, dataset=dataset,
                                    overrides=overrides, runs_dir=runs_dir)
    if jax.process_index() != 0:
        return []
    runs = runner.runs_root(workdir, runs_dir)
    return report.write_report(experiment, workdir, results, seeds=seeds, convention=delta_m, runs_dir=runs,
                               setting=setting_line(experiment, size, dataset, overrides),
                               wall_seconds=runner.wall_seconds(runs, experiment, seeds))


def rewrite_report(workdir: str, *, delta_m: str = comparison.DELTA_M_DEFAULT) -> list[epath.Path]:
    """Renders an experiment dir's report again, in the Δm% convention `delta_m`, and trains nothing.

    The results come from the finished runs (the seeds whose every run has finished), or, where the runs are
    gone (a committed docs/results dir), from summary.json, which keeps every metric of every run and seed.
    """
    root = epath.Path(workdir)
    record = runner.read_experiment_record(root)
    experiment = (variants_experiment(record["variants"]) if record.get("variants")
                  else _named(record["experiment"]))
    comparison.delta_m_metrics(delta_m, experiment.tasks)
    summary_path = root / report.SUMMARY_FILE
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else None
    runs = runner.runs_root(root, record.get("runs_dir"))
    results, seeds = {}, []
    if runs.exists():
        prefix = f"{experiment.runs[0].name}_seed"  # seeds finished since the last report count too
        candidates = sorted(set(previous["seeds"] if previous else ()) | {
            int(path.name[len(prefix):]) for path in runs.glob(f"{prefix}*") if path.name[len(prefix):].isdigit()})
        configs = runner.run_configs(experiment, runs, seeds=list(candidates), size=record["size"],
                                     dataset=record["dataset"], overrides=record["overrides"])
        found = runner.finished_seeds(experiment, configs, runs, list(candidates))
        seeds = sorted(found)
        results = {run.name: {seed: found[seed][run.name] for seed in seeds} for run in experiment.runs}
    if not seeds:
        if previous is None:
            raise UserError(f"{root}: no finished runs in {runs} and no {report.SUMMARY_FILE}; expected an "
                            "experiment that has run")
        results, seeds = report.results_from_summary(previous), list(previous["seeds"])
    if previous and not runs.exists():  # a committed report folder: its runs are elsewhere
        setting = previous["setting"]
    else:
        setting = setting_line(experiment, record["size"], record["dataset"], record["overrides"])
    return report.write_report(experiment, root, results, seeds=seeds, setting=setting, convention=delta_m,
                               runs_dir=runs if runs.exists() else None,
                               wall_seconds=previous["wall_seconds"] if previous and not runs.exists()
                               else runner.wall_seconds(runs, experiment, seeds))
