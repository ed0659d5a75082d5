"""The backward passes a chain of methods needs, and the trainer-facing `LossWeighting` built around them.

* A loss weighting alone: the weighted sum Σ_t w_t·L_t (+ a regulariser) + the other terms, one ordinary backward
  pass. The weights may depend on the weighting's learned parameters (Kendall), its state (DWA, FAMO) or a random
  draw (RLW).
* A treatment (possibly after a loss weighting): per-task gradients of every parameter from one `jax.vmap` of the
  VJP over one-hot task cotangents (plus one row for the sum of the unweighted terms). The chain sees only the Gram
  matrix of the tasks' gradients on the shared parameters and returns coefficients c; the shared gradient becomes
  Σ_t c_t·g_t. Every treatment here (MGDA, PCGrad, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, GradNorm) is such a
  combination, so one backward pass serves all and a treatment is a small function of a T×T matrix.
* `split_backward` does the same treatments at about one backward pass when the loss is given split into the
  shared part and the heads, and also in the space of the representation the decoders read (MGDA-UB).

Aux (and deep-supervision) terms are added unweighted after the treatment (the paper's Eq. 3); with
`aux_as_tasks` each aux term is weighted / treated as one more task instead.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.weighting.base import shared_mask, term_name, unweighted_sum, weighted_keys
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
    gram: jax.Array | None = None  # a treatment's T×T Gram matrix of the tasks' gradients (None without one)


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
        gram = shared_gram(rows, mask, num_tasks)
        coefficients, new_state, weighting_grads = solve(chain, losses, gram, state, rng, params, terms, keys)
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
        return Weighted(total, dict(terms), aux, grads, new_state, dict(zip(names, coefficients.shared)), gram)

    return step
