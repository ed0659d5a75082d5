"""The programs `run.py` chooses from: a name -> program registry (scenic's trainer-registry pattern).

`train` trains and evaluates one run; `sweep` trains every run of `config.runs` into WORKDIR/<name> and writes
their comparison table; `search` runs an Auxi-NAS search (and re-scores its best genotypes). `run(config, workdir)` picks the program the config
asks for (`program_name`), runs it and then draws its figures; re-running the same command resumes.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
from etils import epath

from auxmtl_jax import comparison
from auxmtl_jax import errors
from auxmtl_jax import parallel
from auxmtl_jax import variants
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.augment import model_input
from auxmtl_jax.errors import UserError
from auxmtl_jax.nas import rescore as rescore_lib
from auxmtl_jax.nas import search as search_lib
from auxmtl_jax.training import checks, loop
from auxmtl_jax.training.state import main_variables

log = logging.getLogger("auxmtl_jax")
Program = Callable[[ml_collections.ConfigDict, epath.Path], dict]


def train(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """One run: its results.json record; the prediction figure after it when `analysis.figures`."""
    trained = loop.train_run(config, workdir)
    _after_run(config, workdir, trained)
    return trained.record


def run_config(config: ml_collections.ConfigDict, name: str, variant: str) -> ml_collections.ConfigDict:
    """The config of one sweep run: `variant` applied to a copy, named `name`."""
    child = copy.deepcopy(config)
    child.runs = None
    variants.apply_variant(child, variant)
    child.name = name
    return child


def sweep(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """Trains every run of `config.runs` into WORKDIR/<name>; writes the comparison table (and figures)."""
    runs = {name: run_config(config, name, variant) for name, variant in dict(config.runs).items()}
    for name, child in runs.items():  # a bad run stops the sweep before any run trains
        with errors.about(f"sweep run {name!r}"):
            workdir_lib.check_output_dir(workdir / name, "workdir")
            checks.check_run(child)
    records = {}
    for name, child in runs.items():
        trained = loop.train_run(child, workdir / name, checked=True)
        _after_run(child, workdir / name, trained)
        records[name] = trained.record
    references = checks.reference_results(config)
    table = comparison.format_table({name: record["metrics"] for name, record in records.items()}, references)
    if jax.process_index() == 0:
        workdir_lib.write_text_atomic(workdir / workdir_lib.COMPARISON_TABLE, table + "\n")
        print(f"\n{table}\n(written to {workdir / workdir_lib.COMPARISON_TABLE})", flush=True)
        if config.analysis.figures:
            _write_sweep_figures(config, workdir, {name: workdir / name for name in runs})
    return records


def search(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """An Auxi-NAS search (or its resumption): the best candidate's record; then the re-scoring of its top
    genotypes under other seeds (`search.rescore`) and the search figures."""
    best = search_lib.run_search(config, workdir)
    rescore_lib.run_rescore(config, workdir)
    if jax.process_index() == 0:
        from auxmtl_jax.analysis import search_plot  # matplotlib loads with the first figure, not with every command
        for path in search_plot.write_search_figures(workdir):
            log.info("wrote %s", path)
    return best


PROGRAMS: dict[str, Program] = {"train": train, "sweep": sweep, "search": search}


def program_name(config: ml_collections.ConfigDict) -> str:
    """The program a config asks for: `search` when it has a `search` section, `sweep` when it has `runs`,
    otherwise `train`."""
    if config.get("search"):
        return "search"
    return "sweep" if config.get("runs") else "train"


def get_program(name: str) -> Program:
    """The program registered under `name`; one UserError naming the known ones otherwise."""
    if name not in PROGRAMS:
        raise UserError(f"program {name!r} is unknown; expected one of: {', '.join(PROGRAMS)}.")
    return PROGRAMS[name]


def run(config: ml_collections.ConfigDict, workdir: str, program: str | None = None):
    """Runs `program` (the config's own, `program_name`, when None) in `workdir` and returns what it returns:
    a results record (train), {run: record} (sweep) or the best candidate (search). A `workdir` that cannot
    hold a run (a file, not writable) stops it before anything is written."""
    chosen = get_program(program or program_name(config))
    workdir_lib.check_output_dir(workdir, "--workdir")
    parallel.initialize_distributed(config.distributed)
    return chosen(config, epath.Path(workdir))


def _after_run(config, workdir: epath.Path, trained: loop.TrainedRun) -> None:
    if config.analysis.figures and jax.process_index() == 0:
        _write_prediction_figure(config, workdir, trained)


def _write_sweep_figures(config, workdir: epath.Path, run_workdirs: Mapping[str, epath.Path]) -> None:
    from auxmtl_jax.analysis import figures  # matplotlib loads with the first figure, not with every command
    task = "depth" if "depth" in config.tasks else config.tasks[0]
    paths = figures.write_sweep_figures({name: str(path) for name, path in run_workdirs.items()}, str(workdir),
                                        task=task)
    for path in paths:
        log.info("wrote %s", path)


def _write_prediction_figure(config, workdir: epath.Path, trained: loop.TrainedRun) -> None:
    """predictions.png: inputs, targets and `main`'s predictions for the first test images."""
    from auxmtl_jax.analysis import images  # matplotlib loads with the first figure, not with every command
    model, state, dataset = trained.model, trained.state, trained.dataset
    batch = next(iter(trained.eval_data))
    count = min(4, len(batch["image"]))
    examples = {key: np.asarray(value[:count]) for key, value in batch.items()}
    predictions = jax.device_get(model.predict(jax.device_get(main_variables(state)), model_input(examples["image"])))
    targets = {task: examples[task] for task in predictions}
    paths = images.write_prediction_grid(examples["image"], predictions, targets,
                                         str(workdir / workdir_lib.PREDICTIONS_FIGURE),
                                         num_classes=dataset.num_classes,
                                         denormalise=(config.input.mean, config.input.std))
    log.info("wrote %s", ", ".join(map(str, paths)))
