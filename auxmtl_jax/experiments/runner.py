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
import importlib.util
import json
import logging
import time
from typing import Mapping, Sequence

import jax
import ml_collections
from etils import epath

from auxmtl_jax import errors
from auxmtl_jax import variants
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.training import checks, loop
from auxmtl_jax.experiments.definitions import Experiment, Run

log = logging.getLogger("auxmtl_jax")
SIZES = ("tiny", "cpu", "gpu")
DEFAULT_SEEDS = {"tiny": 2, "cpu": 3, "gpu": 5}
DATASETS = ("synthetic_scenes", "nyu_v2", "sunrgbd")
EXPERIMENT_FILE = "experiment.json"
TIMING_FILE = "timing.json"
RUNS_DIR = "runs"
COMPILATION_CACHE_DIR = "compilation_cache"
EXPERIMENT_CONFIG = "configs/experiments.py"  # get_config("size=…,dataset=…,tasks=…"): an experiment's base config


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file named by path (run.py's `--config=FILE:ARG`); relative paths are tried
    from the working directory, then from the checkout this package lives in."""
    candidates = [epath.Path(path), epath.Path(__file__).parents[2] / path]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise MissingInputError(f"config file {path} does not exist; expected it in the working directory or the "
                                "repository checkout (run from the repository root)")
    spec = importlib.util.spec_from_file_location(f"_experiment_config_{found.stem}", str(found))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def base_config(experiment: Experiment, *, size: str, dataset: str,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config every run of `experiment` starts from, before its variant and seed."""
    if size not in SIZES:
        raise UserError(f"--size={size!r}; expected one of {', '.join(SIZES)}")
    if dataset not in DATASETS:
        raise UserError(f"--dataset={dataset!r}; expected one of {', '.join(DATASETS)}")
    config = load_config_file(EXPERIMENT_CONFIG, f"size={size},dataset={dataset},tasks={'+'.join(experiment.tasks)}")
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
        if key not in variants.config_keys(config):
            raise UserError(f"--set {override!r}: {key!r} is not a config key; expected one of the dotted keys of "
                            "the base config (configs/common.py)")
        variants.set_field(config, key, value)
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
    variants.apply_variant(config, variant)
    apply_overrides(config, overrides)
    config.name = run.name
    config.seed = seed
    return config


def experiment_record(experiment: Experiment, size: str, dataset: str, overrides: Sequence[str],
                      runs_dir: str | None, run_variants: Mapping[str, str] | None = None) -> dict:
    """What DIR/experiment.json holds; keys with their default value are left out, as before they existed."""
    record = {"experiment": experiment.name, "size": size, "dataset": dataset, "overrides": list(overrides)}
    if runs_dir:
        record["runs_dir"] = str(runs_dir)
    if run_variants:
        record["variants"] = dict(run_variants)
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
        workdir_lib.write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def finished_results(workdir: epath.Path, config) -> dict | None:
    """The results record of a run that has finished with this config, or None (not started, or unfinished)."""
    record = finished_record(workdir, config)
    if record is not None:
        workdir_lib.check_workdir_config(workdir, config, resume_step=record["step"])  # a changed config stops
    return record


def finished_record(workdir: epath.Path, config) -> dict | None:
    """The results record of a run that has reached `config.num_train_steps`, read only (no config check)."""
    path = workdir / workdir_lib.RESULTS_FILE
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
                checks.validate_config(configs[(run.name, seed)])
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
    workdir_lib.check_output_dir(root, "--workdir")
    workdir_lib.check_output_dir(runs, "--runs_dir")
    configs = run_configs(experiment, runs, seeds=seeds, size=size, dataset=dataset, overrides=overrides)
    run_variants = ({run.name: run.variant for run in experiment.runs} if experiment.name == "variants" else None)
    check_experiment_dir(root, experiment_record(experiment, size, dataset, overrides, runs_dir, run_variants))
    results: dict[str, dict[int, dict]] = {run.name: {} for run in experiment.runs}
    for seed in seeds:
        for run in experiment.runs:
            workdir, config = run_workdir(runs, run.name, seed), configs[(run.name, seed)]
            record = finished_results(workdir, config)
            if record is None:
                log.info("experiment %s: training %s (seed %d) in %s", experiment.name, run.name, seed, workdir)
                start = time.perf_counter()
                try:
                    record = loop.train_run(config, workdir).record
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
        workdir_lib.write_text_atomic(epath.Path(runs).parent / TIMING_FILE,
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
