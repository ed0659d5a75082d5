"""The training program: one data-parallel jitted step, periodic evaluation, checkpoints, export and logs.

`train_and_evaluate(config, workdir)` is what `run.py` calls. A config with `runs` (a sweep such as the demo's
Joint vs Auxi-all) trains each run in WORKDIR/<name> and then prints and writes their comparison table.
Re-running the same command on the same workdir resumes every unfinished run from its last checkpoint.
`evaluate_checkpoint(config, workdir, step)` evaluates any kept checkpoint of a run on the test split.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import errors
from auxmtl_jax import input_pipeline
from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import parallel
from auxmtl_jax import reporting
from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.errors import MissingInputError, UserError
from auxmtl_jax.models import MultiTaskModel, build_model

log = logging.getLogger("auxmtl_jax")
AUX_GENOTYPE = "aux_genotype.json"  # the Auxi-NAS genotype a run trains, written next to config.json
RESULTS_FILE = "results.json"
RESULTS_TABLE = "results.txt"
COMPARISON_TABLE = "comparison.txt"


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN/Inf loss or train state; nothing non-finite was saved, so the last checkpoint is good.

    A user error: its message says which step, loss and batch, and how to continue with a lower learning rate.
    """


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: step counter, parameters, BatchNorm statistics, optimiser state and the loss
    weighting's own state (DWA's loss history, GradNorm's weights, FAMO's logits; empty for most)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    weighting_state: Any = flax.struct.field(default_factory=dict)


LR_SCHEDULES = ("poly", "constant")
SCRATCH = "scratch"  # model.encoder_init value: train the encoder from random init


def create_learning_rate_fn(optimizer_cfg, num_train_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Linear warm-up (optional), then the paper's poly decay lr·(1 − t/T)^power down to 0 at `num_train_steps`
    (`optimizer.schedule='poly'`) or a constant lr (`'constant'`: the paper's NYUv2 fine-tune at 1e-5).

    `scale` multiplies the base lr (the Prior strategy divides it by 10, paper Sec. 4.2 footnote 1).
    """
    base = optimizer_cfg.learning_rate * scale
    warmup = int(optimizer_cfg.warmup_steps)
    if optimizer_cfg.get("schedule", "poly") == "constant":
        after_warmup = optax.constant_schedule(base)
    else:
        after_warmup = optax.polynomial_schedule(init_value=base, end_value=0.0, power=optimizer_cfg.poly_power,
                                                 transition_steps=max(num_train_steps - warmup, 1))
    if warmup == 0:
        return after_warmup
    ramp = optax.linear_schedule(0.0, base, warmup)
    return optax.join_schedules([ramp, after_warmup], boundaries=[warmup])


def run_learning_rate_fn(config, num_train_steps: int) -> optax.Schedule:
    """The schedule of a run: `create_learning_rate_fn` with `init_from.base_lr_scale` applied when the run starts
    from another run's weights."""
    scale = config.init_from.get("base_lr_scale", 1.0) if config.init_from.path else 1.0
    return create_learning_rate_fn(config.optimizer, num_train_steps, scale)


def create_optimizer(config, learning_rate_fn: optax.Schedule, params,
                     loaded: Any = None) -> optax.GradientTransformation:
    """SGD with momentum and weight decay on every network weight (not on loss-weighting parameters).

    The modules loaded by `init_from` (``loaded``: their params tree) have their updates scaled by
    `init_from.lr_scale`.
    """
    decayed = _top_level_mask(params, exclude=("loss_weighting",))
    chain = [optax.add_decayed_weights(config.optimizer.weight_decay, mask=decayed),
             optax.sgd(learning_rate_fn, momentum=config.optimizer.momentum)]
    if loaded and config.init_from.lr_scale != 1.0:
        chain.append(optax.masked(optax.scale(config.init_from.lr_scale), _loaded_mask(params, loaded)))
    return optax.chain(*chain)


def _top_level_mask(params, *, exclude: tuple[str, ...]):
    return {key: jax.tree.map(lambda _: key not in exclude, subtree) for key, subtree in params.items()}


def _loaded_mask(params, loaded):
    """True on the leaves of the modules (group/module) that ``loaded`` holds."""
    def mark(path, _):
        group, module = (getattr(entry, "key", None) for entry in path[:2])
        return module in loaded.get(group, {})

    return jax.tree_util.tree_map_with_path(mark, params)


def task_channels(tasks, num_classes: int | None) -> dict[str, int]:
    """{task: output channels} for the config's tasks (segmentation takes the dataset's class count)."""
    return {task: tasks_lib.output_channels(task, num_classes if task == "segmentation" else None)
            for task in tasks}


def create_model(config, num_classes: int | None) -> MultiTaskModel:
    tasks_lib.validate_tasks(tuple(config.tasks), what="config.tasks")
    return build_model(config.model, task_channels(config.tasks, num_classes), aux_cfg=config.aux,
                       deep_supervision_cfg=config.deep_supervision)


# Parameters (shapes and values) do not depend on the image size, so they are made from a small image: an
# encoder of stride 32 still sees 2x2 at its deepest stage.
INIT_IMAGE_SIZE = 64
# The jitted init keeps only the random initialisers (XLA drops the unused forward pass) and runs once, so its
# compile time is all that counts: unoptimised code compiles about twice as fast.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(model: MultiTaskModel, rng: jax.Array) -> dict:
    """All variables of `model` (main, aux, deep supervision) in one jitted `init` on a small image."""
    init = jax.jit(model.init, compiler_options=_INIT_COMPILER_OPTIONS)
    return init(rng, jnp.zeros((1, INIT_IMAGE_SIZE, INIT_IMAGE_SIZE, 3), jnp.float32))


def create_train_state(config, model: MultiTaskModel, rng: jax.Array,
                       learning_rate_fn: optax.Schedule) -> tuple[TrainState, optax.GradientTransformation]:
    """Fresh variables (with `init_from` / `model.encoder_init` merged in) and optimiser state."""
    variables = init_variables(model, rng)
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    params, batch_stats, loaded = _load_initialisations(config, params, batch_stats)
    # The weighting's parameters and state do not depend on DWA's period, so any period builds them.
    weighting = weighting_lib.from_config(config, steps_per_epoch=1)
    names = weighting_lib.state_names(config, model.aux_tasks)
    loss_weighting_params = weighting.init(names)
    if loss_weighting_params:
        params["loss_weighting"] = loss_weighting_params
    tx = create_optimizer(config, learning_rate_fn, params, loaded)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params),
                       # a copy per leaf: the step donates the state, and donation refuses one buffer twice
                       weighting_state=jax.tree.map(jnp.array, weighting.init_state(names)))
    return state, tx


def run_weighting(config) -> weighting_lib.LossWeighting:
    """The run's weighting; DWA's default period (one epoch) is taken from the size of the training split."""
    steps_per_epoch = None
    if config.loss_weighting == "dwa" and not config.weighting.dwa.period_steps:
        train_examples = input_pipeline.split_size(config.dataset, config.dataset.train_split)
        steps_per_epoch = max(1, train_examples // config.batch_size)
    return weighting_lib.from_config(config, steps_per_epoch=steps_per_epoch)


def encoder_start(config) -> str | None:
    """What `model.encoder_init` starts the encoder from: None (random init), 'run' (a run of ours: its workdir
    or inference export) or 'file' (an ImageNet weight file)."""
    encoder_init = config.model.get("encoder_init")
    if not encoder_init or encoder_init == SCRATCH:
        return None
    return "run" if epath.Path(encoder_init).is_dir() else "file"


def _load_initialisations(config, params: dict, batch_stats: dict) -> tuple[dict, dict, dict]:
    """Merges `model.encoder_init` and `init_from` into fresh variables; returns them and the params tree that
    `init_from` loaded (empty without it)."""
    encoder_init = config.model.encoder_init
    if encoder_start(config) == "run":
        loaded = checkpoint_lib.load_init_variables(encoder_init, "encoder")
        params, batch_stats = _merge_loaded(params, batch_stats, loaded, f"config.model.encoder_init={encoder_init!r}")
    elif encoder_start(config) == "file":
        from auxmtl_jax import pretrained

        with errors.about("config.model.encoder_init"):
            encoder = pretrained.load_pretrained_encoder(encoder_init, config.model.encoder)
            merged = pretrained.merge_encoder({"params": params, "batch_stats": batch_stats}, encoder)
        params, batch_stats = dict(merged["params"]), dict(merged["batch_stats"])
    if not config.init_from.path:
        return params, batch_stats, {}
    loaded = checkpoint_lib.load_init_variables(config.init_from.path, config.init_from.scope)
    where = f"config.init_from.path={config.init_from.path!r} (scope {config.init_from.scope!r})"
    params, batch_stats = _merge_loaded(params, batch_stats, loaded, where)
    return params, batch_stats, loaded["params"]


def _merge_loaded(params: dict, batch_stats: dict, loaded: dict, where: str) -> tuple[dict, dict]:
    """`load_init_variables`' groups merged into the fresh variables; a group this model lacks is one UserError."""
    params, batch_stats = dict(params), dict(batch_stats)
    for collection, target in (("params", params), ("batch_stats", batch_stats)):
        for group, subtree in loaded[collection].items():
            if not subtree:
                continue
            if group not in target:
                raise UserError(f"Cannot load {where}: it has {group} modules ({', '.join(sorted(subtree))}) and "
                                 f"this model has none; configure them (e.g. aux.tasks) or use another scope.")
            target[group] = checkpoint_lib.merge_params(target[group], subtree, what=f"{where}, {collection}/{group}")
    return params, batch_stats


def loss_terms(model: MultiTaskModel, config, params, batch_stats, batch,
               genotype: jax.Array | None = None, perturbations: Any = None) -> tuple[dict, dict]:
    """Named loss terms of one batch (`loss/<task>`, weighted `aux_loss/<task>`, `ds_loss/<task>`) and new BN stats.

    `genotype` is the int array a searchable Auxi-NAS model takes (None otherwise); `perturbations` are added to
    the shared representation (`MultiTaskModel.representation_zeros`, for MGDA-UB).
    """
    outputs, new_batch_stats = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                           train=True, genotype=genotype, perturbations=perturbations)
    terms = {f"loss/{task}": tasks_lib.task_loss(task, prediction, batch)
             for task, prediction in outputs.main.items()}
    for task, prediction in outputs.aux.items():
        terms[f"aux_loss/{task}"] = config.aux.weight * tasks_lib.task_loss(task, prediction, batch)
    for task, predictions in outputs.deep_supervision.items():
        terms[f"ds_loss/{task}"] = config.deep_supervision.weight * sum(
            tasks_lib.task_loss(task, prediction, batch) for prediction in predictions)
    return terms, new_batch_stats


def train_step(state: TrainState, batch, genotype: jax.Array | None = None, *, model: MultiTaskModel, config,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               weighting: weighting_lib.LossWeighting | None = None) -> tuple[TrainState, dict]:
    """One SGD step on a global batch; returns the new state and the step's scalar metrics.

    `genotype`: the int array of a searchable Auxi-NAS model (the search trains many genotypes with one step).
    `weighting`: the run's (`run_weighting`); built from the config when None.
    """
    weighting = weighting or weighting_lib.from_config(config)

    def terms_fn(params, perturbations=None):
        return loss_terms(model, config, params, state.batch_stats, batch, genotype, perturbations)

    def representation_zeros(params):
        return model.representation_zeros(params["main"], batch["image"])

    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)  # RLW's draw, PCGrad's order
    weighted = weighting.value_and_grad(terms_fn, representation_zeros)(state.params, state.weighting_state, rng)
    updates, opt_state = tx.update(weighted.grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    weighting_state = weighted.state
    if weighting.after_update is not None:
        terms_after, _ = terms_fn(params)
        weighting_state = weighting.after_update(weighting_state, terms_after)
    step_metrics = {"loss/total": weighted.total, **weighted.terms, "lr": learning_rate_fn(state.step)}
    for name, weight in weighted.weights.items():
        step_metrics[f"weight/{name}"] = weight
    for task, log_var in state.params.get("loss_weighting", {}).get("log_var", {}).items():
        step_metrics[f"log_var/{task}"] = log_var
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=weighted.aux,
                              opt_state=opt_state, weighting_state=weighting_state)
    return new_state, step_metrics


def gradient_statistics(state: TrainState, batch, coordinates, *, model: MultiTaskModel, config) -> dict:
    """Fig. 5 statistics: mean |grad| of sampled encoder weights, in total and split into main and aux parts."""
    from auxmtl_jax.analysis import gradients

    def loss_parts(encoder_params):
        params = dict(state.params)
        params["main"] = {**params["main"], "encoder": encoder_params}
        terms, _ = loss_terms(model, config, params, state.batch_stats, batch)
        main_loss = weighting_lib.fig5_main_loss(params.get("loss_weighting", {}), terms, config.loss_weighting)
        return main_loss, weighting_lib.other_terms_sum(terms)

    return gradients.gradient_log_entries(loss_parts, state.params, coordinates)


def eval_step(main_variables, metric_state, batch, *, model: MultiTaskModel):
    """Adds one global test batch to the streaming metric state (inference runs `main` only)."""
    predictions = model.predict(main_variables, batch["image"])
    return metrics_lib.update_state(metric_state, predictions, batch)


def main_variables(state: TrainState) -> dict:
    """What inference needs: the `main` params and BatchNorm statistics."""
    return {"params": state.params["main"], "batch_stats": state.batch_stats.get("main", {})}


class Evaluator:
    """Streams the whole test split through `main` of a train state into on-device metrics; callable repeatedly."""

    def __init__(self, config, model: MultiTaskModel, dataset: input_pipeline.DatasetInfo, mesh: Mesh):
        self.mesh = mesh
        replicated = parallel.replicated_sharding(mesh)
        self.data = input_pipeline.create_eval_dataset(config.dataset, config.input, tasks=tuple(config.tasks),
                                                       global_batch_size=config.eval_batch_size)
        # The step donates its metric state, so every evaluation starts from newly made zeros.
        self._new_metric_state = jax.jit(
            functools.partial(metrics_lib.init_state, tuple(config.tasks), dataset.num_classes),
            out_shardings=replicated)
        self._eval_step = jax.jit(functools.partial(eval_step, model=model),
                                  in_shardings=(replicated, replicated, parallel.batch_sharding(mesh)),
                                  out_shardings=replicated, donate_argnums=1)

    def __call__(self, state: TrainState) -> dict:
        metric_state = self._new_metric_state()
        variables = main_variables(state)
        for local_batch in self.data:
            metric_state = self._eval_step(variables, metric_state, parallel.global_batch(local_batch, self.mesh))
        return metrics_lib.compute(metric_state)


def reference_results(config) -> dict | None:
    """Single-task reference numbers for Δm%: a {task: {metric: value}} dict or a path to a results.json."""
    references = config.get("reference_results")
    if references is None:
        return None
    where = f"config.reference_results={references!r}"
    expected = "expected a run's results.json or a {task: {metric: number}} dict"
    if isinstance(references, str):
        path = epath.Path(references)
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


def _results_delta_m(results, references) -> float | None:
    if references is None:
        return None
    try:
        return metrics_lib.delta_m(results, references)
    except ValueError:
        return None


def write_results(workdir: epath.Path, name: str, step: int, results: dict, references) -> dict:
    """WORKDIR/results.json and a readable results.txt, both written atomically."""
    record = {"name": name, "step": int(step), "metrics": results, "delta_m": _results_delta_m(results, references),
              "delta_m_convention": metrics_lib.DELTA_M_DEFAULT}
    if jax.process_index() == 0:
        checkpoint_lib._write_text_atomic(workdir / RESULTS_FILE, json.dumps(record, indent=2, allow_nan=True))
        checkpoint_lib._write_text_atomic(workdir / RESULTS_TABLE,
                                          metrics_lib.format_table({name: results}, references) + "\n")
    return record


def first_non_finite(window: list[tuple[int, dict]]) -> tuple[int, str] | None:
    """(step, loss name) of the first NaN/Inf loss in a window of host metrics, or None."""
    for step, values in window:
        for key, value in values.items():
            if "loss" in key and not math.isfinite(float(value)):
                return step, key
    return None


def _is_float(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.inexact)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if _is_float(leaf)]))


@jax.jit
def _finite_per_leaf(tree):
    return jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)) if _is_float(leaf) else jnp.asarray(True), tree)


def first_non_finite_leaf(tree) -> str | None:
    """Path ('params/main/encoder/...') of the first leaf holding a NaN/Inf, or None; one reduced flag when clean."""
    if bool(jax.device_get(_all_finite(tree))):
        return None
    flags, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(_finite_per_leaf(tree)))
    for path, finite in flags:
        if not finite:
            return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
    return None


def model_export_config(config, dataset: input_pipeline.DatasetInfo) -> dict:
    """The model description stored next to exported weights: enough to rebuild `main` and preprocess images."""
    return {"model": config.model.to_dict(),
            "tasks": task_channels(config.tasks, dataset.num_classes),
            "class_names": list(dataset.class_names or []),
            "input": {"mean": list(config.input.mean), "std": list(config.input.std),
                      "eval_size": list(config.input.eval_size or dataset.image_size)},
            "dataset": {"name": config.dataset.name, "config": config.dataset.config}}


def validate_config(config) -> None:
    """Schedule and batch fields that would otherwise fail deep inside the loop."""
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
    if schedule not in LR_SCHEDULES:
        raise UserError(f"config.optimizer.schedule={schedule!r}; expected one of {', '.join(LR_SCHEDULES)}.")
    if config.init_from.scope not in checkpoint_lib.INIT_SCOPES:
        raise UserError(f"config.init_from.scope={config.init_from.scope!r}; expected one of "
                         f"{', '.join(checkpoint_lib.INIT_SCOPES)}.")
    for key in ("lr_scale", "base_lr_scale"):
        value = config.init_from.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"config.init_from.{key}={value!r}; expected a number > 0.")
    tasks_lib.validate_tasks(tuple(config.tasks), what="config.tasks")
    weighting_lib.from_config(config, steps_per_epoch=1)
    checkpoint_lib.parse_accepted_keys(config.get("accept_changed_keys"),
                                       checkpoint_lib.flatten_config(json.loads(checkpoint_lib.config_to_json(config))))
    if not config.tasks:
        raise UserError("config.tasks is empty; expected at least one of " + ", ".join(tasks_lib.TASK_NAMES))


def check_input_files(config) -> None:
    """Every file and folder the config names exists and is what it should be: reference results, encoder
    weights, the run `init_from` starts from, the Auxi-NAS genotype. Cheap checks, run before the dataset is
    prepared; the weights are checked against the model's shapes by `check_initialisations`."""
    reference_results(config)
    encoder_init = config.model.get("encoder_init")
    if encoder_start(config) == "run":
        checkpoint_lib.init_source(encoder_init, "encoder", what="config.model.encoder_init")
    elif encoder_start(config) == "file":
        from auxmtl_jax import pretrained

        with errors.about("config.model.encoder_init"):
            pretrained.check_weight_file(encoder_init)
    if config.init_from.path:
        checkpoint_lib.init_source(config.init_from.path, config.init_from.scope)
    genotype = config.get("aux", {}).get("genotype")
    if isinstance(genotype, str) and genotype:
        from auxmtl_jax import nas

        with errors.about("config.aux.genotype"):
            nas.load_genotype(genotype)


def check_initialisations(config, model: MultiTaskModel) -> None:
    """Loads `model.encoder_init` and `init_from` onto the model's variable shapes (no initialiser runs), so a
    file that does not fit stops the run before it writes anything."""
    if not (config.init_from.path or encoder_start(config)):
        return
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INIT_IMAGE_SIZE, INIT_IMAGE_SIZE, 3), jnp.float32))
    _load_initialisations(config, dict(shapes["params"]), dict(shapes.get("batch_stats", {})))


def check_run(config) -> tuple[input_pipeline.DatasetInfo, MultiTaskModel, Mesh]:
    """Every check a run makes before it writes anything: config values, the files it names, the dataset
    (built first when `dataset.prepare`), the devices, and that loaded weights fit the model."""
    validate_config(config)
    check_input_files(config)
    dataset, model, mesh = prepare_run(config)
    check_initialisations(config, model)
    return dataset, model, mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates one run, every run of a sweep (`config.runs`), or an Auxi-NAS search (`config.search`)."""
    parallel.initialize_distributed(config.distributed)
    workdir = epath.Path(workdir)
    if config.get("search"):
        from auxmtl_jax.nas import search

        return search.run_search(config, workdir)
    if config.get("runs"):
        return train_sweep(config, workdir)
    return train_single(config, workdir)


def run_config(config: ml_collections.ConfigDict, name: str, variant: str) -> ml_collections.ConfigDict:
    """The config of one sweep run: `variant` applied to a copy, named `name`."""
    from auxmtl_configs import common

    child = copy.deepcopy(config)
    child.runs = None
    common.apply_variant(child, variant)
    child.name = name
    return child


def train_sweep(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """Trains every run of `config.runs` into WORKDIR/<name>; writes the comparison table (and figures)."""
    runs = {name: run_config(config, name, variant) for name, variant in dict(config.runs).items()}
    for name, child in runs.items():  # a bad run stops the sweep before any run trains
        with errors.about(f"sweep run {name!r}"):
            check_run(child)
    records = {name: train_single(child, workdir / name, checked=True) for name, child in runs.items()}
    references = reference_results(config)
    table = metrics_lib.format_table({name: record["metrics"] for name, record in records.items()}, references)
    if jax.process_index() == 0:
        checkpoint_lib._write_text_atomic(workdir / COMPARISON_TABLE, table + "\n")
        print(f"\n{table}\n(written to {workdir / COMPARISON_TABLE})", flush=True)
        if config.analysis.figures:
            _write_sweep_figures(config, workdir, {name: workdir / name for name in runs})
    return records


def _write_sweep_figures(config, workdir: epath.Path, run_workdirs: Mapping[str, epath.Path]) -> None:
    from auxmtl_jax.analysis import figures

    task = "depth" if "depth" in config.tasks else config.tasks[0]
    paths = figures.write_sweep_figures({name: str(path) for name, path in run_workdirs.items()}, str(workdir),
                                        task=task)
    for path in paths:
        log.info("wrote %s", path)


def _step_functions(config, model, tx, learning_rate_fn, mesh, state_sharding, weighting):
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated_sharding(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, config=config, tx=tx, learning_rate_fn=learning_rate_fn,
                          weighting=weighting),
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    grad_fn = jax.jit(functools.partial(gradient_statistics, model=model, config=config),
                      in_shardings=(state_sharding, batch_sharding, replicated), out_shardings=replicated)
    return step_fn, grad_fn


def prepare_run(config) -> tuple[input_pipeline.DatasetInfo, MultiTaskModel, Mesh]:
    """Checks a validated config against the (prepared) dataset and the devices; returns dataset info, model and
    mesh."""
    input_pipeline.prepare_dataset(config.dataset)
    dataset = input_pipeline.dataset_info(config.dataset)
    input_pipeline.check_splits(config.dataset)
    missing = [task for task in config.tasks if task not in dataset.tasks]
    if missing:
        raise UserError(f"config.tasks asks for {missing} but dataset {dataset.name!r} has only {list(dataset.tasks)}.")
    model = create_model(config, dataset.num_classes)
    mesh = parallel.create_mesh(config.get("num_devices"))
    parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    return dataset, model, mesh


def create_sharded_train_state(config, model: MultiTaskModel, mesh: Mesh):
    """A fresh train state placed (replicated) on the mesh, its sharding, the optimiser and the lr schedule.

    Checkpoints restore onto this state's global shardings, so every process gets its part of the mesh.
    """
    learning_rate_fn = run_learning_rate_fn(config, config.num_train_steps)
    state, tx = create_train_state(config, model, jax.random.key(config.seed), learning_rate_fn)
    state_sharding = jax.tree.map(lambda _: parallel.replicated_sharding(mesh), state)
    return jax.device_put(state, state_sharding), state_sharding, tx, learning_rate_fn


def check_workdir_genotype(workdir: epath.Path, model: MultiTaskModel, *, resume_step: int) -> None:
    """Keeps a copy of the trained genotype in WORKDIR/aux_genotype.json; a resumed run must train the same one."""
    from auxmtl_jax import nas

    genotype, record = model.aux_genotype, workdir / AUX_GENOTYPE
    if resume_step and record.exists():
        recorded = nas.load_genotype(record)
        if recorded != genotype:
            raise UserError(f"{workdir} was trained with the genotype in {record}, but aux.genotype now names a "
                             "different one; train it in a new workdir (or restore the genotype file).")
    elif genotype is not None and jax.process_index() == 0:
        genotype.save(record)


def train_single(config: ml_collections.ConfigDict, workdir: epath.Path, checked: bool = False) -> dict:
    """One run in `workdir`: resumes from its last checkpoint, evaluates, exports `main`, writes results.

    Nothing is written before `check_run` passes (`checked`: the caller has run it on this config).
    """
    dataset, model, mesh = prepare_run(config) if checked else check_run(config)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
    writer = None
    try:
        start_step = checkpointer.latest_step() or 0
        checkpoint_lib.check_workdir_config(workdir, config, resume_step=start_step)
        check_workdir_genotype(workdir, model, resume_step=start_step)
        state, state_sharding, tx, learning_rate_fn = create_sharded_train_state(config, model, mesh)
        train_iter = input_pipeline.create_train_iterator(config.dataset, config.input, tasks=tuple(config.tasks),
                                                          global_batch_size=config.batch_size, seed=config.seed)
        if start_step:
            start_step, state, data_state = checkpointer.restore_latest_intact(state)
            train_iter.set_state(data_state)
            log.info("resumed %s from step %d", workdir, start_step)
        writer = reporting.MetricWriter(workdir)
        writer.truncate_after(start_step)
        if start_step == 0 and jax.process_index() == 0:
            log.info("parameters of %s:\n%s", config.name, reporting.parameter_overview(state.params))

        step_fn, grad_fn = _step_functions(config, model, tx, learning_rate_fn, mesh, state_sharding,
                                           run_weighting(config))
        evaluator = Evaluator(config, model, dataset, mesh)
        coordinates = _gradient_coordinates(config, state)
        loop = _TrainLoop(config, workdir, mesh, writer, checkpointer, train_iter)
        with jax.set_mesh(mesh):
            state = loop.run(state, start_step, step_fn, grad_fn, coordinates, evaluator)
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
    results = loop.final_results
    record = write_results(workdir, config.name, config.num_train_steps, results, reference_results(config))
    if jax.process_index() == 0:
        checkpoint_lib.export_inference(workdir, main_variables(state), model_export_config(config, dataset))
        print(f"\n{config.name} (step {config.num_train_steps}):\n"
              f"{metrics_lib.format_table({config.name: results}, reference_results(config))}", flush=True)
        if config.analysis.figures:
            _write_prediction_figure(config, workdir, model, state, evaluator.data, dataset)
    return record


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Test-split metrics {task: {metric: value}} of checkpoint `step` of a run (its latest when None).

    `config` is the run's config. Nothing is written to the workdir.
    """
    parallel.initialize_distributed(config.distributed)
    validate_config(config)
    dataset, model, mesh = prepare_run(config)
    checkpointer = checkpoint_lib.Checkpointer(epath.Path(workdir), read_only=True)
    try:
        step = checkpointer.checked_step(step)
        state, _, _, _ = create_sharded_train_state(config, model, mesh)
        state, _ = checkpointer.restore(step, state)
    finally:
        checkpointer.close()
    with jax.set_mesh(mesh):
        return Evaluator(config, model, dataset, mesh)(state)


def _gradient_coordinates(config, state: TrainState):
    if not config.analysis.grad_log_every_steps:
        return None
    from auxmtl_jax.analysis import gradients

    return gradients.sample_coordinates(jax.device_get(state.params["main"]["encoder"]),
                                        samples_per_layer=config.analysis.grad_samples_per_layer,
                                        seed=config.seed)


def _write_prediction_figure(config, workdir, model, state, eval_data, dataset) -> None:
    from auxmtl_jax.analysis import figures

    batch = next(iter(eval_data))
    count = min(4, len(batch["image"]))
    images = {key: np.asarray(value[:count]) for key, value in batch.items()}
    predictions = jax.device_get(model.predict(jax.device_get(main_variables(state)), images["image"]))
    targets = {task: images[task] for task in predictions}
    paths = figures.write_prediction_grid(images["image"], predictions, targets, str(workdir / "predictions.png"),
                                         num_classes=dataset.num_classes,
                                         denormalise=(config.input.mean, config.input.std))
    log.info("wrote %s", ", ".join(map(str, paths)))


class _TrainLoop:
    """The step loop with its periodic duties: logging, NaN checks, gradient statistics, checkpoints, eval."""

    def __init__(self, config, workdir, mesh, writer, checkpointer, train_iter):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.writer, self.checkpointer, self.train_iter = writer, checkpointer, train_iter
        self.window: list[tuple[int, Any]] = []
        self.final_results: dict | None = None

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.num_train_steps

    def run(self, state, start_step, step_fn, grad_fn, coordinates, evaluate_fn: Callable[[TrainState], dict]):
        config = self.config
        progress = reporting.Progress(total=config.num_train_steps, initial=start_step,
                                      batch_size=config.batch_size, enabled=config.progress_bar)
        grad_every = config.analysis.grad_log_every_steps
        try:
            for step in range(start_step, config.num_train_steps):
                batch = parallel.global_batch(next(self.train_iter), self.mesh)
                extra = {}
                if grad_every and (step + 1) % grad_every == 0:
                    extra = jax.device_get(grad_fn(state, batch, coordinates))
                state, step_metrics = step_fn(state, batch)
                done = step + 1
                self.window.append((done, step_metrics))
                if self._due(done, config.log_every_steps) or extra:
                    self._log(done, progress, extra)
                    self.checkpointer.record_committed()
                if self._due(done, config.checkpoint_every_steps):
                    self._check_finite()
                    self._check_state_finite(done, state)
                    self.checkpointer.save(done, state, self.train_iter.get_state())
                if self._due(done, config.eval_every_steps):
                    results = evaluate_fn(state)
                    self.writer.write(done, "eval", _flatten_results(results))
                    if done == config.num_train_steps:
                        self.final_results = results
        finally:
            progress.close()
        if self.final_results is None:  # resumed after the last step: evaluate the restored state
            self.final_results = evaluate_fn(state)
        return state

    def _check_finite(self) -> None:
        host = [(step, jax.device_get(values)) for step, values in self.window]
        bad = first_non_finite(host)
        if bad is not None:
            step, key = bad
            raise NonFiniteError(self._non_finite_message(
                f"{key} became non-finite at step {step} ({self._batch_position(step, host[-1][0])})"))
        self.window = host

    def _batch_position(self, step: int, latest: int) -> str:
        """Where the batch that `step` trained on sits in the data order, so that it can be inspected."""
        next_batch = self.train_iter.get_state().get("next_batch")
        if not isinstance(next_batch, int):
            return "its batch position is unknown"
        position = next_batch - (latest - step) - 1
        return (f"its batch is number {position} of the training data order for seed {self.config.seed}: "
                f"input_pipeline.create_train_iterator(...) with set_state(dict(it.get_state(), "
                f"next_batch={position})) yields it")

    def _check_state_finite(self, step: int, state: TrainState) -> None:
        """Never saves a checkpoint holding NaN/Inf parameters or optimiser state."""
        leaf = first_non_finite_leaf(state)
        if leaf is not None:
            raise NonFiniteError(self._non_finite_message(
                f"the train state became non-finite by step {step} (first non-finite leaf: {leaf}); it was not saved"))

    def _non_finite_message(self, what: str) -> str:
        self.checkpointer.wait()
        last = self.checkpointer.latest_step()
        kept = f"the last good checkpoint is step {last}" if last else "no checkpoint was saved"
        return (f"{what} in {self.workdir}; training stopped and {kept}. Lower optimizer.learning_rate (or check "
                f"the data) and continue from that checkpoint by re-running with "
                f"--config.optimizer.learning_rate=NEW_LR --config.accept_changed_keys=optimizer.learning_rate.")

    def _log(self, step: int, progress: reporting.Progress, extra: Mapping[str, Any]) -> None:
        self._check_finite()
        values = {key: float(np.mean([float(v[key]) for _, v in self.window])) for key in self.window[-1][1]}
        values["images_per_sec"] = progress.update(step, values["loss/total"])
        self.writer.write(step, "train", {**values, **{k: float(v) for k, v in extra.items()}})
        self.window = []


def _flatten_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{task}/{metric}": value for task, values in results.items() for metric, value in values.items()}
