"""Runs an experiment: every (seed, run) as an ordinary workdir, resumable, finished runs read instead of redone.

Layout of an experiment dir:

    DIR/experiment.json          the experiment, size, dataset and overrides it was started with
    DIR/runs/<run>_seed<k>/      one training workdir per run and seed (resumes like any run)
    DIR/timing.json              training wall time of each run, summed over the invocations that trained it
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


def run_workdir(root: epath.Path, run: str, seed: int) -> epath.Path:
    return epath.Path(root) / RUNS_DIR / f"{run}_seed{seed}"


def run_config(experiment: Experiment, run: Run, seed: int, base: ml_collections.ConfigDict,
               root: epath.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """One run's config: the variant (with `{run}` replaced by that run's workdir of this seed), the `--set`
    overrides and the seed, which sets both the initialisation and the training data order."""
    variant = run.variant.format(**{name: str(run_workdir(root, name, seed).absolute())
                                    for name in experiment.dependencies(run)})
    config = copy.deepcopy(base)
    common.apply_variant(config, variant)
    apply_overrides(config, overrides)
    config.name = run.name
    config.seed = seed
    return config


def _check_experiment_dir(root: epath.Path, record: dict) -> None:
    """An experiment dir holds one experiment at one size; more seeds may be added later."""
    path = root / EXPERIMENT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
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
    path = workdir / train.RESULTS_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("step") != config.num_train_steps:
        return None
    checkpoint_lib.check_workdir_config(workdir, config, resume_step=record["step"])  # a changed config stops
    return record


def run_experiment(experiment: Experiment, root: str | epath.Path, *, seeds: Sequence[int], size: str,
                   dataset: str = "synthetic_scenes", overrides: Sequence[str] = ()) -> dict[str, dict[int, dict]]:
    """Trains (or reads) every run of every seed, seed by seed; returns {run: {seed: test metrics}}.

    Every run config is validated before the first run trains. An interrupted experiment continues where it
    stopped: a finished run is read from its results.json, an unfinished one resumes from its last checkpoint.
    """
    root = epath.Path(root)
    if not seeds:
        raise UserError("--seeds: expected at least one seed")
    base = base_config(experiment, size=size, dataset=dataset, overrides=overrides)
    configs = {}
    for seed in seeds:
        for run in experiment.runs:
            with errors.about(f"experiment {experiment.name!r}, run {run.name!r} (seed {seed})"):
                configs[(run.name, seed)] = run_config(experiment, run, seed, base, root, overrides)
                train.validate_config(configs[(run.name, seed)])
    _check_experiment_dir(root, {"experiment": experiment.name, "size": size, "dataset": dataset,
                                 "overrides": list(overrides)})
    timing = _read_timing(root)
    results: dict[str, dict[int, dict]] = {run.name: {} for run in experiment.runs}
    for seed in seeds:
        for run in experiment.runs:
            workdir, config = run_workdir(root, run.name, seed), configs[(run.name, seed)]
            record = finished_results(workdir, config)
            if record is None:
                log.info("experiment %s: training %s (seed %d) in %s", experiment.name, run.name, seed, workdir)
                start = time.perf_counter()
                try:
                    record = train.train_and_evaluate(config, str(workdir))
                finally:  # an interrupted run's time counts too; its resume adds the rest
                    timing[workdir.name] = timing.get(workdir.name, 0.0) + time.perf_counter() - start
                    _write_timing(root, timing)
            results[run.name][seed] = record["metrics"]
    return results


def _read_timing(root: epath.Path) -> dict[str, float]:
    path = root / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_timing(root: epath.Path, timing: Mapping[str, float]) -> None:
    if jax.process_index() == 0:
        checkpoint_lib._write_text_atomic(root / TIMING_FILE, json.dumps(dict(timing), indent=2, sort_keys=True))


def wall_seconds(root: epath.Path, experiment: Experiment, seeds: Sequence[int]) -> float:
    """Recorded training wall time of the experiment's runs (0 for runs trained before timing existed)."""
    timing = _read_timing(epath.Path(root))
    return sum(timing.get(run_workdir(root, run.name, seed).name, 0.0) for seed in seeds for run in experiment.runs)
