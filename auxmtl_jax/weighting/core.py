"""The backward passes a chain of methods needs, and the trainer-facing `LossWeighting` built around them.

* A loss weighting alone: the weighted sum Σ_t w_t·L_t (+ a regulariser) + the other terms, one ordinary backward
  pass. The weights may depend on the weighting's learned parameters (Kendall), its state (DWA, FAMO) or a random
  draw (RLW).
* A treatment (possibly after a loss weighting): per-task gradients of every parameter from one `jax.vmap` of the
  VJP over one-hot task cotangents (plus one row for the sum of the unweighted terms). The chain sees only the Gram
  matrix of the tasks' gradients on the shared parameters and returns coefficients c; the shared gradient becomes
  Σ_t c_t·g_t. Every treatment here (MGDA, PCGrad, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, GradNorm) is such a
  combination, so one backward pass serves all and a treatment is a small function of a T×T matrix.
* A treatment of the shared representation's gradients (MGDA-UB): the same, on the representation the decoders
  read, then one ordinary backward pass of the c-weighted losses.

Aux (and deep-supervision) terms are added unweighted after the treatment (the paper's Eq. 3); with
`aux_as_tasks` each aux term is weighted / treated as one more task instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting.base import (GRADIENT, REPRESENTATION, Names, shared_mask, term_name,
                                       unweighted_sum, weighted_keys)
from auxmtl_jax.weighting.chaining import Chain, Coefficients, state_tree, typed_state

LossTermsFn = Callable[..., tuple[Mapping[str, jax.Array], Any]]


class Weighted(NamedTuple):
    """What one weighting step gives the train step."""

    total: jax.Array  # the objective value that is logged as loss/total
    terms: dict[str, jax.Array]  # every loss term, unweighted by the weighting
    aux: Any  # whatever loss_terms_fn returned beside the terms (new BatchNorm statistics)
    grads: Any  # gradients shaped like the params
    state: dict  # the weighting's new state
    weights: dict[str, jax.Array]  # per weighted term: its coefficient on the shared gradient (a loss weight)


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """The trainer's view of a chain: `init(names)` makes its optimiser-trained parameters (kept at
    `params['loss_weighting']`), `init_state(names)` its state as a pytree of dicts (kept in
    `TrainState.weighting_state`), and `after_update(state, terms)` (None when no method needs it) updates the
    state from the loss terms at the updated parameters on the same batch (FAMO).

    `value_and_grad(loss_terms_fn, representation_zeros=None)` gives the step function
    `(params, state, rng) -> Weighted`. `loss_terms_fn(params, perturbations=None) -> (terms, aux)`;
    `representation_zeros(params)` gives the zero perturbations of the shared representation that a treatment in
    representation space (MGDA-UB) differentiates against.
    `main_objective(weighting_params, {task: loss})`: the main-task objective (`Chain.main_objective`).
    """

    name: str
    init: Callable[[Sequence[str]], dict]
    init_state: Callable[[Sequence[str]], dict]
    value_and_grad: Callable[..., Callable[[Any, dict, jax.Array], Weighted]]
    after_update: Callable[[dict, Mapping[str, jax.Array]], dict] | None = None
    per_task_gradients: bool = False
    main_objective: Callable[[dict, Mapping[str, jax.Array]], jax.Array] | None = None
    chain: Chain | None = None


def build(chain: Chain, aux_as_tasks: bool) -> LossWeighting:
    """The `LossWeighting` of `chain`, weighting the main terms (and the aux terms with `aux_as_tasks`)."""
    treatment = chain.treatment
    if treatment is not None and treatment.kind == REPRESENTATION and aux_as_tasks:
        raise UserError(f"config.loss_weighting={chain.name!r} works on the gradients of the representation the "
                        "decoders read, which aux losses never reach; expected weighting.aux_as_tasks=False.")

    def init_state(names: Names) -> dict:
        return state_tree(chain, chain.init(names))

    def value_and_grad(loss_terms_fn: LossTermsFn, representation_zeros=None):
        if treatment is None:
            return reweighted_step(chain, loss_terms_fn, aux_as_tasks)
        if treatment.kind == GRADIENT:
            return treated_step(chain, loss_terms_fn, aux_as_tasks)
        if representation_zeros is None:
            raise ValueError(f"{chain.name} needs representation_zeros (the shared representation's zero "
                             "perturbations)")
        return representation_step(chain, loss_terms_fn, representation_zeros)

    def after_update(state: dict, terms: Mapping[str, jax.Array]) -> dict:
        keys = weighted_keys(terms, aux_as_tasks)
        names = tuple(term_name(key) for key in keys)
        new_state = chain.after_update(typed_state(chain, names, state), jnp.stack([terms[key] for key in keys]))
        return state_tree(chain, new_state)

    return LossWeighting(chain.name, init=chain.init_params, init_state=init_state, value_and_grad=value_and_grad,
                         after_update=after_update if chain.has_after_update else None,
                         per_task_gradients=treatment is not None, main_objective=chain.main_objective,
                         chain=chain)


def objective_value(coefficients: Coefficients, losses: jax.Array, terms: Mapping[str, jax.Array],
                    keys: Sequence[str]) -> jax.Array:
    """Σ loss weights·losses (+ the regulariser) + the unweighted terms: the logged total, and what a loss
    weighting's learned parameters descend."""
    total = jnp.dot(coefficients.loss, losses)
    if coefficients.regulariser is not None:
        total = total + coefficients.regulariser
    return total + unweighted_sum(terms, keys)


def reweighted_step(chain: Chain, loss_terms_fn: LossTermsFn, aux_as_tasks: bool):
    """A loss weighting alone: one backward pass of the weighted objective, the weights differentiable in the
    weighting's parameters only (the losses they read are gradient-stopped)."""
    def step(params, state: dict, rng: jax.Array) -> Weighted:
        def objective(params):
            terms, aux = loss_terms_fn(params)
            keys = weighted_keys(terms, aux_as_tasks)
            names = tuple(term_name(key) for key in keys)
            losses = jnp.stack([terms[key] for key in keys])
            coefficients, new_state = chain.update(jax.lax.stop_gradient(losses), None,
                                                   typed_state(chain, names, state), rng,
                                                   params.get("loss_weighting", {}), names)
            total = objective_value(coefficients, losses, terms, keys)
            return total, (terms, aux, state_tree(chain, new_state), dict(zip(names, coefficients.shared)))

        (total, (terms, aux, new_state, weights)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return Weighted(total, terms, aux, grads, new_state, jax.lax.stop_gradient(weights))

    return step


def solve(chain: Chain, losses: jax.Array, gram: jax.Array, state: dict, rng: jax.Array, params,
          terms: Mapping[str, jax.Array], keys: Sequence[str]):
    """(coefficients, new state, gradient of the loss weighting's parameters or None) from the Gram matrix: the
    loss weighting's parameters descend the objective (`objective_value`), as they do alone."""
    names = tuple(term_name(key) for key in keys)

    def update(weighting_params):
        return chain.update(losses, gram, typed_state(chain, names, state), rng, weighting_params, names)

    def objective(weighting_params):
        coefficients, new_state = update(weighting_params)
        return objective_value(coefficients, losses, terms, keys), (coefficients, new_state)

    weighting_params = params.get("loss_weighting", {})
    if chain.weighting is None:
        coefficients, new_state = update(weighting_params)
        return coefficients, state_tree(chain, new_state), None
    (_, (coefficients, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(weighting_params)
    return coefficients, state_tree(chain, new_state), grads


def with_weighting_grads(grads, weighting_grads):
    """`grads` with the loss weighting's parameters' gradient (the network's backward pass never reaches them)."""
    return {**grads, "loss_weighting": weighting_grads} if weighting_grads else grads


def per_task_gradients(loss_terms_fn: LossTermsFn, params, keys_of: Callable[[Mapping[str, jax.Array]], list[str]]):
    """(terms, aux, keys, rows, has_others): `rows` holds, for each weighted term, the gradient of every parameter
    and, last when `has_others`, the gradient of the sum of the other terms. One forward, one batched backward."""
    terms, vjp_fn, aux = jax.vjp(loss_terms_fn, params, has_aux=True)
    keys = keys_of(terms)
    others = [key for key in terms if key not in keys]
    num_rows = len(keys) + (1 if others else 0)
    basis = jnp.eye(num_rows, dtype=jnp.float32)
    cotangents = {key: basis[keys.index(key) if key in keys else len(keys)] for key in terms}
    (rows,) = jax.vmap(vjp_fn)(cotangents)
    return terms, aux, keys, rows, bool(others)


def shared_gram(rows, mask, num_tasks: int) -> jax.Array:
    """T×T Gram matrix of the task rows' gradients on the shared parameters (float32, summed leaf by leaf)."""
    grams = [jnp.einsum("ti,si->ts", leaf[:num_tasks].reshape(num_tasks, -1),
                        leaf[:num_tasks].reshape(num_tasks, -1), preferred_element_type=jnp.float32)
             for leaf, shared in zip(jax.tree.leaves(rows), jax.tree.leaves(mask)) if shared]
    return sum(grams, jnp.zeros((num_tasks, num_tasks), jnp.float32))


def treated_step(chain: Chain, loss_terms_fn: LossTermsFn, aux_as_tasks: bool):
    """A treatment of the per-task parameter gradients (after a loss weighting, if any).

    Scope 'shared': the shared gradient is Σ_t c_t·g_t and every task-specific module (decoders) keeps its own
    task's gradient (w_t·g_t after a loss weighting), as in LibMTL (the Nash-MTL and MGDA reference codes scale the
    decoders by c instead). Scope 'all': c weights every parameter's gradient (GradNorm's loss weights).
    The unweighted terms' gradient is added to both afterwards.
    """
    scope_all = chain.treatment.scope == "all"

    def step(params, state: dict, rng: jax.Array) -> Weighted:
        terms, aux, keys, rows, has_others = per_task_gradients(
            loss_terms_fn, params, lambda terms: weighted_keys(terms, aux_as_tasks))
        num_tasks = len(keys)
        names = tuple(term_name(key) for key in keys)
        mask = shared_mask(params)
        losses = jnp.stack([terms[key] for key in keys])
        coefficients, new_state, weighting_grads = solve(
            chain, losses, shared_gram(rows, mask, num_tasks), state, rng, params, terms, keys)
        own = None if chain.weighting is None else jax.lax.stop_gradient(coefficients.loss)

        def combine(row, shared):
            if shared or scope_all:
                grad = jnp.tensordot(coefficients.shared.astype(row.dtype), row[:num_tasks], axes=1)
            elif own is None:
                grad = jnp.sum(row[:num_tasks], axis=0)
            else:
                grad = jnp.tensordot(own.astype(row.dtype), row[:num_tasks], axes=1)
            return grad + row[num_tasks] if has_others else grad

        grads = with_weighting_grads(jax.tree.map(combine, rows, mask), weighting_grads)
        total = objective_value(coefficients, losses, terms, keys)
        return Weighted(total, dict(terms), aux, grads, new_state, dict(zip(names, coefficients.shared)))

    return step


def representation_step(chain: Chain, loss_terms_fn: LossTermsFn, representation_zeros):
    """A treatment in the shared representation's space (Sener & Koltun's upper bound, MGDA-UB): the Gram matrix is
    that of the tasks' gradients with respect to the representation the decoders read, which needs a backward pass
    through the decoders only; the coefficients then weight the task losses in one ordinary backward pass, so they
    scale the decoders' gradients too, as in Sener & Koltun's code (which, with a normalisation, weights the raw
    losses by the normalised problem's weights; here the normalised gradients are combined, LibMTL's convention).
    Aux terms never reach that representation, so they cannot count as tasks here (`build` refuses that)."""
    def step(params, state: dict, rng: jax.Array) -> Weighted:
        terms, vjp_fn, aux = jax.vjp(loss_terms_fn, params, representation_zeros(params), has_aux=True)
        keys = weighted_keys(terms, False)
        names = tuple(term_name(key) for key in keys)
        basis = jnp.eye(len(keys), dtype=jnp.float32)
        cotangents = {key: basis[keys.index(key)] if key in keys else jnp.zeros((len(keys),), jnp.float32)
                      for key in terms}
        _, representation_rows = jax.vmap(vjp_fn)(cotangents)  # the parameter rows are dead code
        gram = shared_gram(representation_rows, jax.tree.map(lambda _: True, representation_rows), len(keys))
        losses = jnp.stack([terms[key] for key in keys])
        coefficients, new_state, weighting_grads = solve(chain, losses, gram, state, rng, params, terms, keys)
        grads, _ = vjp_fn({key: coefficients.shared[keys.index(key)] if key in keys else jnp.ones((), jnp.float32)
                           for key in terms})
        grads = with_weighting_grads(grads, weighting_grads)
        total = objective_value(coefficients, losses, terms, keys)
        return Weighted(total, dict(terms), aux, grads, new_state, dict(zip(names, coefficients.shared)))

    return step
