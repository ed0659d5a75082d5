"""Runs an experiment: every (seed, run) as an ordinary workdir, resumable, finished runs read instead of redone.

Layout of an experiment dir:

    DIR/experiment.json          the experiment, size, dataset and overrides it was started with (and --runs_dir)
    DIR/runs/<run>_seed<k>/      one training workdir per run and seed (resumes like any run); `--runs_dir=R`
                                 puts them in R instead, so experiments sharing R share the runs they have in
                                 common (same name, same config: a changed config stops with one line)
    R/../timing.json             training wall time of each run, summed over the invocations that trained it
    DIR/compilation_cache/       compiled XLA programs, shared by the seeds of a run (command line only)
    DIR/report.md, DIR/*.png     the report (`report.write_report`)
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Mapping, Sequence

import jax
import ml_collections
from etils import epath

from auxmtl_configs import common
from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import errors
from auxmtl_jax import train
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments.definitions import Experiment, Run

log = logging.getLogger("auxmtl_jax")
SIZES = ("tiny", "cpu", "gpu")
DEFAULT_SEEDS = {"tiny": 2, "cpu": 3, "gpu": 5}
DATASETS = ("synthetic_scenes", "nyu_v2", "sunrgbd")
EXPERIMENT_FILE = "experiment.json"
TIMING_FILE = "timing.json"
RUNS_DIR = "runs"
COMPILATION_CACHE_DIR = "compilation_cache"


def _synthetic_config(size: str) -> ml_collections.ConfigDict:
    """The demo config (96x128 scenes, MobileNetV2 x0.5, 400 steps) shrunk to `tiny` or grown to `gpu`."""
    from auxmtl_configs import synthetic_three_task

    config = synthetic_three_task.get_config("runlocal" if size == "tiny" else None)
    if size == "gpu":
        config.dataset.config = "default"  # 192x256, 2000 train / 500 test
        config.input.crop_size = (128, 160)
        config.model.width_multiplier = 1.0
        config.model.head_channels = 64
        config.aux.channels = 64
        config.batch_size = 16
        config.num_train_steps = 4000
        config.eval_every_steps = 4000
        config.checkpoint_every_steps = 500
        config.log_every_steps = 50
        config.analysis.grad_log_every_steps = 50
    return config


def _real_config(dataset: str, tasks: Sequence[str], size: str) -> ml_collections.ConfigDict:
    """A paper config of a built real dataset; `tiny` is its runlocal smoke size, `cpu` is not offered."""
    from auxmtl_configs import nyuv2_three_task, nyuv2_two_task, sunrgbd_three_task

    if size == "cpu":
        raise UserError(f"--size=cpu with --dataset={dataset}: the real datasets run at the paper's size "
                        "(--size=gpu) or as a smoke test (--size=tiny); expected one of those")
    module = {"nyu_v2": nyuv2_two_task if len(tasks) == 2 else nyuv2_three_task,
              "sunrgbd": sunrgbd_three_task}[dataset]
    config = module.get_config("runlocal" if size == "tiny" else None)
    config.analysis.grad_log_every_steps = config.log_every_steps
    return config


def base_config(experiment: Experiment, *, size: str, dataset: str,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config every run of `experiment` starts from, before its variant and seed."""
    if size not in SIZES:
        raise UserError(f"--size={size!r}; expected one of {', '.join(SIZES)}")
    if dataset not in DATASETS:
        raise UserError(f"--dataset={dataset!r}; expected one of {', '.join(DATASETS)}")
    config = _synthetic_config(size) if dataset == "synthetic_scenes" else _real_config(dataset, experiment.tasks,
                                                                                       size)
    config.runs = None
    config.tasks = experiment.tasks
    config.analysis.figures = False  # the report draws the experiment's figures
    config.progress_bar = False
    return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """`--set KEY=VALUE` overrides, in place; like run.py's `--config.KEY=VALUE` they apply after a run's variant,
    so a strategy's reset of its own fields (loss weighting, init_from, aux, ...) does not undo them."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise UserError(f"--set {override!r}; expected KEY=VALUE, e.g. model.encoder_init=/weights.pth")
        if key not in common.config_keys(config):
            raise UserError(f"--set {override!r}: {key!r} is not a config key; expected one of the dotted keys of "
                            "configs/common.py")
        common.set_field(config, key, value)
    return config


def use_compilation_cache(root: str | epath.Path) -> None:
    """Keeps compiled XLA programs in DIR/compilation_cache: the seeds of a run compile the same programs, so only
    the first pays for compilation (about 20 of the 80 seconds of a cpu-size run). A cache the user configured
    (JAX_COMPILATION_CACHE_DIR) is left in place."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(epath.Path(root) / COMPILATION_CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def runs_root(root: str | epath.Path, runs_dir: str | epath.Path | None = None) -> epath.Path:
    """Where the run workdirs of an experiment dir live: `runs_dir`, or DIR/runs."""
    return epath.Path(runs_dir) if runs_dir else epath.Path(root) / RUNS_DIR


def run_workdir(runs: epath.Path, run: str, seed: int) -> epath.Path:
    """The workdir of one run and seed inside a runs dir (`runs_root`)."""
    return epath.Path(runs) / f"{run}_seed{seed}"


def run_config(experiment: Experiment, run: Run, seed: int, base: ml_collections.ConfigDict,
               runs: epath.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """One run's config: the variant (with `{run}` replaced by that run's workdir of this seed), the `--set`
    overrides and the seed, which sets both the initialisation and the training data order."""
    variant = run.variant.format(**{name: str(run_workdir(runs, name, seed).absolute())
                                    for name in experiment.dependencies(run)})
    config = copy.deepcopy(base)
    common.apply_variant(config, variant)
    apply_overrides(config, overrides)
    config.name = run.name
    config.seed = seed
    return config


def experiment_record(experiment: Experiment, size: str, dataset: str, overrides: Sequence[str],
                      runs_dir: str | None, variants: Mapping[str, str] | None = None) -> dict:
    """What DIR/experiment.json holds; keys with their default value are left out, as before they existed."""
    record = {"experiment": experiment.name, "size": size, "dataset": dataset, "overrides": list(overrides)}
    if runs_dir:
        record["runs_dir"] = str(runs_dir)
    if variants:
        record["variants"] = dict(variants)
    return record


def read_experiment_record(root: epath.Path) -> dict:
    path = epath.Path(root) / EXPERIMENT_FILE
    if not path.exists():
        raise UserError(f"{root} has no {EXPERIMENT_FILE}; expected an experiment dir written by "
                        "`python -m auxmtl_jax.experiments NAME --workdir=DIR`")
    return json.loads(path.read_text())


def check_experiment_dir(root: epath.Path, record: dict) -> None:
    """An experiment dir holds one experiment at one size; more seeds may be added later."""
    path = root / EXPERIMENT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if "variants" not in saved:  # written before variants were recorded
            record = {key: value for key, value in record.items() if key != "variants"}
        if saved != record:
            differing = {key: (saved.get(key), record.get(key)) for key in set(saved) | set(record)
                         if saved.get(key) != record.get(key)}
            raise UserError(f"{root} holds another experiment setting ({differing}, saved vs asked); expected the "
                            f"same experiment, size, dataset and --set overrides, or another --workdir")
    elif jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint_lib._write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def finished_results(workdir: epath.Path, config) -> dict | None:
    """The results record of a run that has finished with this config, or None (not started, or unfinished)."""
    record = finished_record(workdir, config)
    if record is not None:
        checkpoint_lib.check_workdir_config(workdir, config, resume_step=record["step"])  # a changed config stops
    return record


def finished_record(workdir: epath.Path, config) -> dict | None:
    """The results record of a run that has reached `config.num_train_steps`, read only (no config check)."""
    path = workdir / train.RESULTS_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("step") == config.num_train_steps else None


def run_configs(experiment: Experiment, runs: epath.Path, *, seeds: Sequence[int], size: str, dataset: str,
                overrides: Sequence[str]) -> dict[tuple[str, int], ml_collections.ConfigDict]:
    """{(run, seed): config}, every one validated (so a bad input stops before any run trains)."""
    base = base_config(experiment, size=size, dataset=dataset, overrides=overrides)
    configs = {}
    for seed in seeds:
        for run in experiment.runs:
            with errors.about(f"experiment {experiment.name!r}, run {run.name!r} (seed {seed})"):
                configs[(run.name, seed)] = run_config(experiment, run, seed, base, runs, overrides)
                train.validate_config(configs[(run.name, seed)])
    return configs


def run_experiment(experiment: Experiment, root: str | epath.Path, *, seeds: Sequence[int], size: str,
                   dataset: str = "synthetic_scenes", overrides: Sequence[str] = (),
                   runs_dir: str | None = None) -> dict[str, dict[int, dict]]:
    """Trains (or reads) every run of every seed, seed by seed; returns {run: {seed: test metrics}}.

    Every run config is validated before the first run trains. An interrupted experiment continues where it
    stopped: a finished run is read from its results.json, an unfinished one resumes from its last checkpoint.
    """
    root, runs = epath.Path(root), runs_root(root, runs_dir)
    if not seeds:
        raise UserError("--seeds: expected at least one seed")
    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs_dir={runs}: not a directory; expected a folder for the run workdirs (created if "
                        "missing)")
    configs = run_configs(experiment, runs, seeds=seeds, size=size, dataset=dataset, overrides=overrides)
    variants = ({run.name: run.variant for run in experiment.runs} if experiment.name == "variants" else None)
    check_experiment_dir(root, experiment_record(experiment, size, dataset, overrides, runs_dir, variants))
    results: dict[str, dict[int, dict]] = {run.name: {} for run in experiment.runs}
    for seed in seeds:
        for run in experiment.runs:
            workdir, config = run_workdir(runs, run.name, seed), configs[(run.name, seed)]
            record = finished_results(workdir, config)
            if record is None:
                log.info("experiment %s: training %s (seed %d) in %s", experiment.name, run.name, seed, workdir)
                start = time.perf_counter()
                try:
                    record = train.train_and_evaluate(config, str(workdir))
                finally:  # an interrupted run's time counts too; its resume adds the rest
                    timing = _read_timing(runs)  # another experiment sharing the runs dir may have added some
                    timing[workdir.name] = timing.get(workdir.name, 0.0) + time.perf_counter() - start
                    _write_timing(runs, timing)
            results[run.name][seed] = record["metrics"]
    return results


def _read_timing(runs: epath.Path) -> dict[str, float]:
    path = epath.Path(runs).parent / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_timing(runs: epath.Path, timing: Mapping[str, float]) -> None:
    if jax.process_index() == 0:
        epath.Path(runs).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_lib._write_text_atomic(epath.Path(runs).parent / TIMING_FILE,
                                          json.dumps(dict(timing), indent=2, sort_keys=True))


def wall_seconds(runs: epath.Path, experiment: Experiment, seeds: Sequence[int]) -> float:
    """Recorded training wall time of the experiment's runs (0 for runs trained before timing existed)."""
    timing = _read_timing(epath.Path(runs))
    return sum(timing.get(run_workdir(runs, run.name, seed).name, 0.0) for seed in seeds for run in experiment.runs)


def finished_seeds(experiment: Experiment, configs: Mapping[tuple[str, int], ml_collections.ConfigDict],
                   runs: epath.Path, seeds: Sequence[int]) -> dict[int, dict[str, dict]]:
    """{seed: {run: metrics}} for the seeds whose every run has finished; reads only, trains nothing."""
    found = {}
    for seed in seeds:
        records = {run.name: finished_record(run_workdir(runs, run.name, seed), configs[(run.name, seed)])
                   for run in experiment.runs}
        if all(record is not None for record in records.values()):
            found[seed] = {name: record["metrics"] for name, record in records.items()}
    return found
