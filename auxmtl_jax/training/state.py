"""The train state and what builds it: the optimiser and its schedules, the model, initial weights (random,
another run's, or an ImageNet file), and the run's loss weighting."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.sharding import Mesh

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import coordination
from auxmtl_jax import errors
from auxmtl_jax import input_pipeline
from auxmtl_jax import parallel
from auxmtl_jax import pretrained
from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.models import MultiTaskModel, build_model


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: step counter, parameters, BatchNorm statistics, optimiser state and the loss
    weighting's own state (DWA's loss history, GradNorm's weights, FAMO's logits; empty for most)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    weighting_state: Any = flax.struct.field(default_factory=dict)


LR_SCHEDULES = ("poly", "constant", "step")
OPTIMIZERS = ("sgd", "adam")


SCRATCH = "scratch"  # model.encoder_init value: train the encoder from random init


def create_learning_rate_fn(optimizer_cfg, num_train_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Linear warm-up (optional), then the paper's poly decay lr·(1 − t/T)^power down to 0 at `num_train_steps`
    (`optimizer.schedule='poly'`), a constant lr (`'constant'`: the paper's NYUv2 fine-tune at 1e-5) or a step
    decay lr·factor^⌊t/every⌋ (`'step'`, with `optimizer.step_every_steps` and `optimizer.step_factor`: torch's
    StepLR, LibMTL's default `--scheduler step`; t counts from the first step, warm-up included).

    `scale` multiplies the base lr (the Prior strategy divides it by 10, paper Sec. 4.2 footnote 1).
    """
    base = optimizer_cfg.learning_rate * scale
    warmup = int(optimizer_cfg.warmup_steps)
    schedule = optimizer_cfg.get("schedule", "poly")
    if schedule == "constant":
        after_warmup = optax.constant_schedule(base)
    elif schedule == "step":
        after_warmup = _step_schedule(base, int(optimizer_cfg.step_every_steps), float(optimizer_cfg.step_factor),
                                      offset=warmup)
    else:
        after_warmup = optax.polynomial_schedule(init_value=base, end_value=0.0, power=optimizer_cfg.poly_power,
                                                 transition_steps=max(num_train_steps - warmup, 1))
    if warmup == 0:
        return after_warmup
    ramp = optax.linear_schedule(0.0, base, warmup)
    return optax.join_schedules([ramp, after_warmup], boundaries=[warmup])


def _step_schedule(base: float, every: int, factor: float, offset: int = 0) -> optax.Schedule:
    """lr·factor^⌊(count + offset)/every⌋ (`offset`: the warm-up steps `join_schedules` subtracts)."""
    def schedule(count):
        return base * factor ** ((count + offset) // every)

    return schedule


def run_learning_rate_fn(config, num_train_steps: int) -> optax.Schedule:
    """The schedule of a run: `create_learning_rate_fn` with `init_from.base_lr_scale` applied when the run starts
    from another run's weights."""
    scale = config.init_from.get("base_lr_scale", 1.0) if config.init_from.path else 1.0
    return create_learning_rate_fn(config.optimizer, num_train_steps, scale)


def create_optimizer(config, learning_rate_fn: optax.Schedule, params,
                     loaded: Any = None) -> optax.GradientTransformation:
    """`optimizer.name`: 'sgd' (default: SGD with momentum) or 'adam' (torch.optim.Adam: betas (0.9, 0.999), eps
    1e-8, LibMTL's optimiser), each with coupled weight decay (L2 added to the gradient, as torch's SGD and Adam
    do) on every network weight (not on loss-weighting parameters).

    The modules loaded by `init_from` (``loaded``: their params tree) have their updates scaled by
    `init_from.lr_scale`.
    """
    decayed = _top_level_mask(params, exclude=("loss_weighting",))
    if config.optimizer.get("name", "sgd") == "adam":
        update = optax.adam(learning_rate_fn, b1=0.9, b2=0.999, eps=1e-8)
    else:
        update = optax.sgd(learning_rate_fn, momentum=config.optimizer.momentum)
    chain = [optax.add_decayed_weights(config.optimizer.weight_decay, mask=decayed), update]
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
                       deep_supervision_cfg=config.deep_supervision, input_size=tuple(config.input.crop_size))


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
    params, batch_stats, loaded = load_initialisations(config, params, batch_stats)
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


def create_sharded_train_state(config, model: MultiTaskModel, mesh: Mesh):
    """A fresh train state placed (replicated) on the mesh, its sharding, the optimiser and the lr schedule.

    Checkpoints restore onto this state's global shardings, so every process gets its part of the mesh.
    """
    learning_rate_fn = run_learning_rate_fn(config, config.num_train_steps)
    state, tx = create_train_state(config, model, jax.random.key(config.seed), learning_rate_fn)
    state_sharding = jax.tree.map(lambda _: parallel.replicated_sharding(mesh), state)
    coordination.barrier("initialised train state")  # placing it compares every process's copy (a collective)
    return jax.device_put(state, state_sharding), state_sharding, tx, learning_rate_fn


def run_weighting(config) -> weighting_lib.LossWeighting:
    """The run's weighting; a method that counts in epochs (DWA's default period) asks for the epoch's length,
    which is read from the size of the training split only then."""
    def steps_per_epoch() -> int:
        return max(1, input_pipeline.split_size(config.dataset, config.dataset.train_split) // config.batch_size)

    return weighting_lib.from_config(config, steps_per_epoch=steps_per_epoch)


def encoder_start(config) -> str | None:
    """What `model.encoder_init` starts the encoder from: None (random init), 'run' (a run of ours: its workdir
    or inference export) or 'file' (an ImageNet weight file)."""
    encoder_init = config.model.get("encoder_init")
    if not encoder_init or encoder_init == SCRATCH:
        return None
    return "run" if epath.Path(encoder_init).is_dir() else "file"


def load_initialisations(config, params: dict, batch_stats: dict) -> tuple[dict, dict, dict]:
    """Merges `model.encoder_init` and `init_from` into fresh variables; returns them and the params tree that
    `init_from` loaded (empty without it)."""
    encoder_init = config.model.encoder_init
    if encoder_start(config) == "run":
        loaded = checkpoint_lib.load_init_variables(encoder_init, "encoder")
        params, batch_stats = _merge_loaded(params, batch_stats, loaded, f"config.model.encoder_init={encoder_init!r}")
    elif encoder_start(config) == "file":
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


def main_variables(state: TrainState) -> dict:
    """What inference needs: the `main` params and BatchNorm statistics."""
    return {"params": state.params["main"], "batch_stats": state.batch_stats.get("main", {})}
