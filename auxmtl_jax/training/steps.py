"""The pure steps a run jits: the loss terms of a batch, one SGD step under the run's weighting, Fig. 5's gradient
statistics and one evaluation batch; `step_functions` jits them with the mesh's shardings."""

from __future__ import annotations

import functools

import jax
import optax

from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax import parallel
from auxmtl_jax import tasks as tasks_lib
from auxmtl_jax import weighting as weighting_lib
from auxmtl_jax.analysis import gradients
from auxmtl_jax.augment import model_input
from auxmtl_jax.models import MultiTaskModel
from auxmtl_jax.models.networks import ModelOutputs, merge_batch_stats
from auxmtl_jax.training.state import TrainState


def loss_terms(model: MultiTaskModel, config, params, batch_stats, batch,
               genotype: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> tuple[dict, dict]:
    """Named loss terms of one batch (`loss/<task>`, weighted `aux_loss/<task>`, `ds_loss/<task>`) and new BN stats.

    `genotype` is the int array a searchable Auxi-NAS model takes (None otherwise); `dropout_rng` the key of the
    decoders' dropout (None: no dropout).
    """
    outputs, new_batch_stats = model.apply({"params": params, "batch_stats": batch_stats},
                                           model_input(batch["image"]), train=True, genotype=genotype,
                                           dropout_rng=dropout_rng)
    return terms_of_outputs(config, outputs, batch), new_batch_stats


def terms_of_outputs(config, outputs: ModelOutputs, batch) -> dict:
    """The named loss terms of a forward's outputs."""
    terms = {f"loss/{task}": tasks_lib.task_loss(task, prediction, batch)
             for task, prediction in outputs.main.items()}
    for task, prediction in outputs.aux.items():
        terms[f"aux_loss/{task}"] = config.aux.weight * tasks_lib.task_loss(task, prediction, batch)
    for task, predictions in outputs.deep_supervision.items():
        terms[f"ds_loss/{task}"] = config.deep_supervision.weight * sum(
            tasks_lib.task_loss(task, prediction, batch) for prediction in predictions)
    return terms


TERM_PREFIXES = {"main": "loss/", "aux": "aux_loss/", "deep_supervision": "ds_loss/"}
_DROPOUT_STREAM = 1  # folded into the step's key for the dropout key, independent of the weighting's draws


def split_loss_terms(model: MultiTaskModel, config, batch_stats, batch, genotype: jax.Array | None = None,
                     dropout_rng: jax.Array | None = None) -> weighting_lib.SplitLoss:
    """`loss_terms` as heads ∘ shared part, each loss term's module reading its own copy of the representation
    (what lets a gradient treatment run at about one backward pass, `weighting.split_backward`)."""
    groups = {"main": model.tasks, "aux": model.aux_tasks, "deep_supervision": model.deep_supervision_tasks}
    readers = {TERM_PREFIXES[group] + task: (group, task) for group, tasks in groups.items() for task in tasks}

    def shared(params):
        return model.shared_forward({"params": params, "batch_stats": batch_stats}, model_input(batch["image"]),
                                    train=True)

    def heads(params, copies):
        reads = {group: {} for group in groups}
        for key, (group, task) in readers.items():
            copy = copies[key]
            reads[group][task] = copy.decoder_input if group == "main" else copy.stages
        outputs, new_batch_stats = model.heads_forward({"params": params, "batch_stats": batch_stats}, reads,
                                                       model_input(batch["image"]), train=True, genotype=genotype,
                                                       dropout_rng=dropout_rng)
        return terms_of_outputs(config, outputs, batch), new_batch_stats

    return weighting_lib.SplitLoss(shared=shared, heads=heads, term_keys=tuple(readers),
                                   merge_aux=merge_batch_stats, own_copies=model.reads_own_copies)


def train_step(state: TrainState, batch, genotype: jax.Array | None = None, *, model: MultiTaskModel, config,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               weighting: weighting_lib.LossWeighting | None = None) -> tuple[TrainState, dict]:
    """One SGD step on a global batch; returns the new state and the step's scalar metrics.

    `genotype`: the int array of a searchable Auxi-NAS model (the search trains many genotypes with one step).
    `weighting`: the run's (`run_weighting`); built from the config when None.
    """
    weighting = weighting or weighting_lib.from_config(config)
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)  # RLW's draw, PCGrad's order
    dropout_rng = jax.random.fold_in(rng, _DROPOUT_STREAM)  # the decoders' dropout (deeplab), same in every pass

    def terms_fn(params):
        return loss_terms(model, config, params, state.batch_stats, batch, genotype, dropout_rng)

    split = split_loss_terms(model, config, state.batch_stats, batch, genotype, dropout_rng)
    weighted = weighting.value_and_grad(terms_fn, split)(state.params, state.weighting_state, rng)
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


def gradient_statistics(state: TrainState, batch, coordinates, *, model: MultiTaskModel, config,
                        weighting: weighting_lib.LossWeighting | None = None) -> dict:
    """Fig. 5 statistics: mean |grad| of sampled encoder weights, in total and split into main and aux parts.

    The main part follows the weighting's main-task objective (Kendall's weighted sum; the plain sum otherwise).
    """
    weighting = weighting or weighting_lib.from_config(config, steps_per_epoch=1)

    def loss_parts(encoder_params):
        params = dict(state.params)
        params["main"] = {**params["main"], "encoder": encoder_params}
        terms, _ = loss_terms(model, config, params, state.batch_stats, batch)
        main_loss = weighting.main_objective(params.get("loss_weighting", {}), weighting_lib.main_terms(terms))
        return main_loss, weighting_lib.other_terms_sum(terms)

    return gradients.gradient_log_entries(loss_parts, state.params, coordinates)


def eval_step(main_variables, metric_state, batch, *, model: MultiTaskModel):
    """Adds one global test batch to the streaming metric state (inference runs `main` only)."""
    predictions = model.predict(main_variables, model_input(batch["image"]))
    return metrics_lib.update_state(metric_state, predictions, batch)


def step_functions(config, model, tx, learning_rate_fn, mesh, state_sharding, weighting):
    """The jitted train step (state donated) and Fig. 5's gradient-statistics function, sharded over `mesh`."""
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated_sharding(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, config=config, tx=tx, learning_rate_fn=learning_rate_fn,
                          weighting=weighting),
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    grad_fn = jax.jit(functools.partial(gradient_statistics, model=model, config=config, weighting=weighting),
                      in_shardings=(state_sharding, batch_sharding, replicated), out_shardings=replicated)
    return step_fn, grad_fn
