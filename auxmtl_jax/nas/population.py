"""Candidate evaluation for the search: a population of genotypes trained at once by one compiled step.

Every candidate starts from the same train state (same `main`, same aux initialisation) and differs only in its
genotype, which the searchable aux build takes as data. The population is the real training step
(``training.steps.train_step``) under ``jax.vmap`` over the stacked train states and genotypes, with the batch shared, so
one compilation serves the whole search; on a mesh with a ``candidates`` axis the stacked leading axis is sharded
over devices (and hosts). After each step the `main` parameters' Polyak average is updated (Nekrasov et al. rank
short runs by their averaged weights); evaluation runs `main` with those averages, aux modules dropped, as at
inference. Candidates marked inactive (early-terminated) keep their state unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auxmtl_jax import metrics as metrics_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.models import MultiTaskModel
from auxmtl_jax.training.state import TrainState
from auxmtl_jax.training.steps import eval_step, train_step

CANDIDATES_AXIS = "candidates"


class PopulationState(flax.struct.PyTreeNode):
    """Stacked per-candidate state: leading axis = candidate."""

    train: TrainState
    polyak: Any  # Polyak (exponential moving) average of each candidate's `main` params
    genotypes: jax.Array  # int32 [C, T, n, 5]
    active: jax.Array  # bool [C]: False freezes a candidate (early termination)


def start_population(start: TrainState, genotypes: Any) -> PopulationState:
    """C copies of one starting train state, one per genotype of ``genotypes`` (int [C, T, n, 5])."""
    genotypes = jnp.asarray(genotypes, jnp.int32)
    count = genotypes.shape[0]
    stacked = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (count, *jnp.shape(leaf))), start)
    return PopulationState(train=stacked, polyak=stacked.params["main"], genotypes=genotypes,
                           active=jnp.ones((count,), bool))


def population_train_step(population: PopulationState, batch, *, model: MultiTaskModel, config,
                          tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
                          polyak_decay: float) -> tuple[PopulationState, dict]:
    """One training step of every active candidate on the shared batch; returns per-candidate step metrics."""
    step = functools.partial(train_step, model=model, config=config, tx=tx,
                             learning_rate_fn=learning_rate_fn)
    trained, metrics = jax.vmap(step, in_axes=(0, None, 0))(population.train, batch, population.genotypes)
    keep = population.active

    def select(new, old):
        return jnp.where(keep.reshape(keep.shape + (1,) * (new.ndim - 1)), new, old)

    trained = jax.tree.map(select, trained, population.train)
    polyak = jax.tree.map(lambda average, params: select(polyak_decay * average + (1 - polyak_decay) * params,
                                                         average),
                          population.polyak, trained.params["main"])
    return population.replace(train=trained, polyak=polyak), metrics


def population_eval_step(population: PopulationState, metric_states, batch, *, model: MultiTaskModel):
    """Adds one meta-val batch to every candidate's streaming metrics, predicting with `main`'s Polyak average."""
    def one(polyak, batch_stats, metric_state):
        return eval_step({"params": polyak, "batch_stats": batch_stats.get("main", {})}, metric_state,
                                   batch, model=model)

    return jax.vmap(one, in_axes=(0, 0, 0))(population.polyak, population.train.batch_stats, metric_states)


def empty_metric_states(tasks: tuple[str, ...], num_classes: int | None, count: int):
    """Fresh streaming-metric states for ``count`` candidates, stacked."""
    state = metrics_lib.init_state(tasks, num_classes)
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (count, *jnp.shape(leaf))), state)


def candidate_metrics(metric_states, index: int) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of one candidate from the stacked metric states."""
    return metrics_lib.compute(jax.tree.map(lambda leaf: np.asarray(leaf)[index], metric_states))


def candidates_mesh(devices=None) -> Mesh:
    """A 1-D mesh whose axis ``candidates`` splits the population over devices (all devices by default)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (CANDIDATES_AXIS,))


def search_mesh(population: int, devices=None) -> Mesh | None:
    """The ``candidates`` mesh a search of ``population`` candidates per generation runs on: the most devices that
    split the population evenly; None on one device (then the population is plain ``vmap``)."""
    devices = list(jax.local_devices() if devices is None else devices)
    size = max(count for count in range(1, len(devices) + 1) if population % count == 0)
    return None if size == 1 else candidates_mesh(devices[:size])


def population_sharding(mesh: Mesh, population: PopulationState):
    """Shardings that split every leaf's leading (candidate) axis over the mesh's ``candidates`` axis."""
    size = mesh.shape[CANDIDATES_AXIS]
    count = population.active.shape[0]
    if count % size:
        raise UserError(f"population of {count} candidates does not split over {size} devices of the "
                         f"'{CANDIDATES_AXIS}' axis; use a multiple of {size}")
    return jax.tree.map(lambda _: candidate_sharding(mesh), population)


def candidate_sharding(mesh: Mesh) -> NamedSharding:
    """Splits a leaf's leading (candidate) axis over the mesh's ``candidates`` axis."""
    return NamedSharding(mesh, PartitionSpec(CANDIDATES_AXIS))


def shard_over_candidates(function, mesh: Mesh, candidate_args: int = 1):
    """``function(*per_candidate, shared)`` with each device running its share of the candidates: the first
    ``candidate_args`` arguments and every output are split on their leading axis, the last argument (the batch)
    is shared. An explicit shard_map, because XLA's partitioner cannot split vmapped convolutions itself."""
    candidates = PartitionSpec(CANDIDATES_AXIS)
    return jax.shard_map(function, mesh=mesh, in_specs=(candidates,) * candidate_args + (PartitionSpec(),),
                         out_specs=candidates)
