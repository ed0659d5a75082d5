"""Pre-flight checks: everything a run verifies before it writes anything (config values, the files it names, the
dataset, the devices, that loaded weights fit the model)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import comparison
from auxmtl_jax import errors
from auxmtl_jax import input_pipeline
from auxmtl_jax import input_sizing
from auxmtl_jax import parallel
from auxmtl_jax import pretrained
from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.models import MultiTaskModel
from auxmtl_jax.models.auxiliary import check_min_head_size
from auxmtl_jax.models.decoders import check_aspp_rates
from auxmtl_jax.models.genotype import load_genotype
from auxmtl_jax.training import selection as selection_lib
from auxmtl_jax.training import state as state_lib


def non_finite_numbers(value: Any, key: str = "config") -> Iterator[tuple[str, float]]:
    """(full key, value) of every NaN or ±inf float anywhere in a (nested) config: ConfigDicts, dicts, lists and
    tuples (as `key[i]`), numpy scalars and arrays included."""
    if hasattr(value, "items") and callable(value.items):  # ConfigDict, FrozenConfigDict, dict
        for name, item in value.items():
            yield from non_finite_numbers(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from non_finite_numbers(item, f"{key}[{index}]")
    elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        bad = value[~np.isfinite(value)]
        if bad.size:
            yield key, float(bad.flat[0])
    elif isinstance(value, (float, np.floating)) and not math.isfinite(value):
        yield key, float(value)


def check_finite_numbers(config) -> None:
    """Every float of the config is finite: one generic check over the whole (nested) config, before any work.

    No field takes NaN, and none takes ±inf either: a setting that means "no limit" spells it 0 or None
    (`weighting.nash_mtl.max_norm=0`, `search.devices=0`, `input.num_workers=None`), never inf. The first
    offending field is one UserError `config.<key>=<value>; expected a finite number.`
    """
    for key, value in non_finite_numbers(config):
        raise UserError(f"{key}={value!r}; expected a finite number.")


def validate_config(config) -> None:
    """Every float finite, then schedule and batch fields that would otherwise fail deep inside the loop."""
    check_finite_numbers(config)
    positive = ("num_train_steps", "batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "max_checkpoints_to_keep")
    for key in positive:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"config.{key}={value!r}; expected a positive integer.")
    if config.optimizer.learning_rate <= 0:
        raise UserError(f"config.optimizer.learning_rate={config.optimizer.learning_rate!r}; expected > 0.")
    if config.model.get("pretrained_required") and not config.model.encoder_init:
        raise UserError(
            "config.model.encoder_init is not set, and this paper config trains from an ImageNet-pretrained "
            f"{config.model.encoder} (paper Sec. 4.1); expected --config.model.encoder_init=<weight file> (a "
            "torchvision/timm .pth, .pt, .safetensors or .npz; README 'Pretrained encoders'), or "
            "--config.model.encoder_init=scratch to train from scratch on purpose.")
    schedule = config.optimizer.get("schedule", "poly")
    if schedule not in state_lib.LR_SCHEDULES:
        raise UserError(f"config.optimizer.schedule={schedule!r}; expected one of {', '.join(state_lib.LR_SCHEDULES)}.")
    check_optimizer(config.optimizer)
    if config.init_from.scope not in checkpoint_lib.INIT_SCOPES:
        raise UserError(f"config.init_from.scope={config.init_from.scope!r}; expected one of "
                         f"{', '.join(checkpoint_lib.INIT_SCOPES)}.")
    for key in ("lr_scale", "base_lr_scale"):
        value = config.init_from.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"config.init_from.{key}={value!r}; expected a number > 0.")
    tasks_lib.validate_tasks(tuple(config.tasks), what="config.tasks")
    check_aspp_rates(config.model.get("aspp_rates", "paper"), "config.model.aspp_rates")
    check_min_head_size(config.aux.get("min_head_size", 0), "config.aux.min_head_size")
    selection_lib.evaluation_plan(config)
    input_sizing.resolve(config.input)  # config.input.num_workers / num_threads: None or a count
    weighting_lib.from_config(config, steps_per_epoch=1)
    workdir_lib.parse_accepted_keys(config.get("accept_changed_keys"),
                                    workdir_lib.flatten_config(json.loads(workdir_lib.config_to_json(config))))
    if not config.tasks:
        raise UserError("config.tasks is empty; expected at least one of " + ", ".join(tasks_lib.TASK_NAMES))


def check_optimizer(optimizer) -> None:
    """`optimizer.name` is known, `step_every_steps` a positive integer and `step_factor` in (0, 1] (checked
    whatever the schedule, so a typo shows before a run that switches to it)."""
    name = optimizer.get("name", "sgd")
    if name not in state_lib.OPTIMIZERS:
        raise UserError(f"config.optimizer.name={name!r}; expected one of {', '.join(state_lib.OPTIMIZERS)}.")
    every, factor = optimizer.get("step_every_steps", 1), optimizer.get("step_factor", 1.0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(f"config.optimizer.step_every_steps={every!r}; expected a positive integer.")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise UserError(f"config.optimizer.step_factor={factor!r}; expected a number in (0, 1].")


def check_input_files(config) -> None:
    """Every file and folder the config names exists and is what it should be: reference results, encoder
    weights, the run `init_from` starts from, the Auxi-NAS genotype, the dataset folders. Cheap checks, run
    before the dataset is prepared; the weights are checked against the model's shapes by
    `check_initialisations`."""
    check_dataset_dirs(config)
    references = reference_results(config)
    if (references is not None and config.dataset.get("validation_split")
            and selection_lib.evaluation_plan(config).select_by == selection_lib.DELTA_M_CRITERION):
        needed = comparison.delta_m_metrics(comparison.DELTA_M_DEFAULT, config.tasks)
        missing = [f"{task}/{metric}" for task, names in needed.items() for metric in names
                   if metric not in references.get(task, {})]
        if missing:
            raise UserError(f"config.evaluation.select_by='delta_m' selects on Δm% against config.reference_results, "
                            f"which lacks {', '.join(missing)}; expected every metric of the "
                            f"{comparison.DELTA_M_DEFAULT!r} convention for config.tasks.")
    encoder_init = config.model.get("encoder_init")
    if state_lib.encoder_start(config) == "run":
        checkpoint_lib.init_source(encoder_init, "encoder", what="config.model.encoder_init")
    elif state_lib.encoder_start(config) == "file":
        with errors.about("config.model.encoder_init"):
            pretrained.check_weight_file(encoder_init)
    if config.init_from.path:
        checkpoint_lib.init_source(config.init_from.path, config.init_from.scope)
    genotype = config.get("aux", {}).get("genotype")
    if isinstance(genotype, str) and genotype:
        with errors.about("config.aux.genotype"):
            load_genotype(genotype)


def check_dataset_dirs(config) -> None:
    """`dataset.data_dir` is a directory, or missing under a directory (a missing dataset is reported by
    `input_pipeline.prepare_dataset`, with how to build it; whether a build may write there is checked when one is
    needed); `dataset.manual_dir` is a directory when it exists (only a build reads it, and the builder says so
    when it is missing)."""
    dataset = config.dataset
    if dataset.get("data_dir"):
        workdir_lib.check_input_dir(dataset.data_dir, "config.dataset.data_dir", may_be_missing=True)
    manual_dir = dataset.get("manual_dir")
    if manual_dir and os.path.lexists(os.path.expanduser(manual_dir)):
        workdir_lib.check_input_dir(manual_dir, "config.dataset.manual_dir")


def check_initialisations(config, model: MultiTaskModel) -> None:
    """Loads `model.encoder_init` and `init_from` onto the model's variable shapes (no initialiser runs), so a
    file that does not fit stops the run before it writes anything."""
    if not (config.init_from.path or state_lib.encoder_start(config)):
        return
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, state_lib.INIT_IMAGE_SIZE, state_lib.INIT_IMAGE_SIZE, 3), jnp.float32))
    state_lib.load_initialisations(config, dict(shapes["params"]), dict(shapes.get("batch_stats", {})))


def check_run(config) -> tuple[input_pipeline.DatasetInfo, MultiTaskModel, Mesh]:
    """Every check a run makes before it writes anything: config values, the files it names, the dataset
    (built first when `dataset.prepare`), the devices, and that loaded weights fit the model."""
    validate_config(config)
    check_input_files(config)
    dataset, model, mesh = prepare_run(config)
    check_initialisations(config, model)
    return dataset, model, mesh


def prepare_run(config) -> tuple[input_pipeline.DatasetInfo, MultiTaskModel, Mesh]:
    """Checks a validated config against the (prepared) dataset and the devices; returns dataset info, model and
    mesh."""
    input_pipeline.prepare_dataset(config.dataset)
    dataset = input_pipeline.dataset_info(config.dataset)
    input_pipeline.check_splits(config.dataset)
    selection_lib.check_disjoint_splits(config.dataset, dataset.splits)
    missing = [task for task in config.tasks if task not in dataset.tasks]
    if missing:
        raise UserError(f"config.tasks asks for {missing} but dataset {dataset.name!r} has only {list(dataset.tasks)}.")
    model = state_lib.create_model(config, dataset.num_classes)
    mesh = parallel.create_mesh(config.get("num_devices"))
    parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    return dataset, model, mesh


def check_workdir_genotype(workdir: epath.Path, model: MultiTaskModel, *, resume_step: int) -> None:
    """Keeps a copy of the trained genotype in WORKDIR/aux_genotype.json; a resumed run must train the same one."""
    genotype, record = model.aux_genotype, workdir / workdir_lib.AUX_GENOTYPE
    if resume_step and record.exists():
        recorded = load_genotype(record)
        if recorded != genotype:
            raise UserError(f"{workdir} was trained with the genotype in {record}, but aux.genotype now names a "
                             "different one; train it in a new workdir (or restore the genotype file).")
    elif genotype is not None and jax.process_index() == 0:
        genotype.save(record)


def reference_results(config) -> dict | None:
    """Single-task reference numbers for Δm%: a {task: {metric: value}} dict or a path to a results.json."""
    references = config.get("reference_results")
    if references is None:
        return None
    where = f"config.reference_results={references!r}"
    expected = "expected a run's results.json or a {task: {metric: number}} dict"
    if isinstance(references, str):
        path = epath.Path(references)
        if path.is_dir():
            raise UserError(f"{where} is a directory; {expected}.")
        if not path.is_file():
            raise MissingInputError(f"{where} does not exist; {expected}.")
        try:
            references = json.loads(path.read_text())["metrics"]
        except (ValueError, KeyError, TypeError) as error:  # not UTF-8, not JSON, or no "metrics"
            problem = f"no {error} key" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            raise UserError(f"{where} is unreadable ({problem}); {expected}.") from None
    try:
        checked = {task: {metric: float(value) for metric, value in dict(values).items()}
                   for task, values in dict(references).items()}
    except (ValueError, TypeError) as error:
        raise UserError(f"{where} holds {type(references).__name__} values that are not {{task: {{metric: number}}}} "
                        f"({error}); {expected}.") from None
    unknown = sorted(set(checked) - set(tasks_lib.TASK_NAMES))
    if unknown:
        raise UserError(f"{where} has unknown task(s) {unknown}; expected some of {', '.join(tasks_lib.TASK_NAMES)}.")
    return checked
