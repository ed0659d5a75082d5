"""The two shapes every weighting takes, and what they share: which terms are weighted, which parameters are shared.

* `reweighting`: the weighted sum Σ_t w_t·L_t (+ a regulariser) + the other terms, one ordinary backward pass. The
  weights may depend on the weighting's learned parameters (Kendall), its state (DWA, FAMO) or a random draw (RLW).
* `gradient_treatment`: per-task gradients of every parameter from one `jax.vmap` of the VJP over one-hot task
  cotangents (plus one row for the sum of the unweighted terms). A treatment sees only the Gram matrix of the
  tasks' gradients on the shared parameters and returns coefficients c; the shared gradient becomes Σ_t c_t·g_t.
  Every method here (MGDA, PCGrad, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, GradNorm) is such a combination, so one
  backward pass serves all and a treatment is a small function of a T×T matrix that is tested on its own.

Aux (and deep-supervision) terms are added unweighted after the treatment (the paper's Eq. 3); with
`aux_as_tasks` each aux term is weighted / treated as one more task instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError

MAIN_PREFIX = "loss/"
AUX_PREFIX = "aux_loss/"
AUX_NAME_PREFIX = "aux_"
LossTermsFn = Callable[[Any], tuple[Mapping[str, jax.Array], Any]]


class Weighted(NamedTuple):
    """What one weighting step gives the train step."""

    total: jax.Array  # the objective value that is logged as loss/total
    terms: dict[str, jax.Array]  # every loss term, unweighted by the weighting
    aux: Any  # whatever loss_terms_fn returned beside the terms (new BatchNorm statistics)
    grads: Any  # gradients shaped like the params
    state: dict  # the weighting's new state
    weights: dict[str, jax.Array]  # per weighted term: its weight, or its coefficient on the shared gradient


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """A weighting: `init(names)` makes its optimiser-trained parameters (kept at `params['loss_weighting']`),
    `init_state(names)` its own state (kept in `TrainState.weighting_state`), and `after_update(state, losses)`
    (optional) updates the state from the loss terms at the updated parameters on the same batch (FAMO).

    `value_and_grad(loss_terms_fn, representation_zeros=None)` gives the step function
    `(params, state, rng) -> Weighted`. `loss_terms_fn(params, perturbations=None) -> (terms, aux)`;
    `representation_zeros(params)` gives the zero perturbations of the shared representation that a treatment in
    representation space (MGDA-UB) differentiates against.
    """

    name: str
    init: Callable[[Sequence[str]], dict]
    init_state: Callable[[Sequence[str]], dict]
    value_and_grad: Callable[..., Callable[[Any, dict, jax.Array], Weighted]]
    after_update: Callable[[dict, Mapping[str, jax.Array]], dict] | None = None
    per_task_gradients: bool = False


def no_params(names: Sequence[str]) -> dict:
    del names
    return {}


def weighted_keys(terms: Mapping[str, jax.Array], aux_as_tasks: bool) -> list[str]:
    """The term keys a weighting weights, sorted: the main tasks and (with aux_as_tasks) the aux terms.

    Sorted because a dict that passes through a JAX transformation comes back with sorted keys: every vector of
    per-task values (losses, weights, state) uses this one order whichever dict it was taken from.
    """
    return sorted(key for key in terms if key.startswith(MAIN_PREFIX) or (aux_as_tasks and key.startswith(AUX_PREFIX)))


def term_name(key: str) -> str:
    """'loss/depth' -> 'depth'; 'aux_loss/depth' -> 'aux_depth' (the names of state entries and logged weights)."""
    if key.startswith(MAIN_PREFIX):
        return key[len(MAIN_PREFIX):]
    if key.startswith(AUX_PREFIX):
        return AUX_NAME_PREFIX + key[len(AUX_PREFIX):]
    return key


def weighted_names(tasks: Sequence[str], aux_tasks: Sequence[str], aux_as_tasks: bool) -> tuple[str, ...]:
    """The names `init` / `init_state` get: main tasks, then the aux tasks when they count as tasks."""
    return tuple(tasks) + (tuple(AUX_NAME_PREFIX + task for task in aux_tasks) if aux_as_tasks else ())


def unweighted_sum(terms: Mapping[str, jax.Array], weighted: Sequence[str]) -> jax.Array:
    """Sum of the terms outside `weighted` (aux, deep supervision), which every weighting adds as they are."""
    return sum((value for key, value in terms.items() if key not in weighted), jnp.zeros(()))


def shared_mask(params: Mapping[str, Any]) -> Any:
    """True on the parameters every task's loss reaches: `main` except the `<task>_decoder` modules (the encoder,
    and the context decoder's shared ASPP). Aux, deep-supervision and weighting parameters are task-specific."""
    def group_mask(group: str, subtree: Any) -> Any:
        if group != "main":
            return jax.tree.map(lambda _: False, subtree)
        return {module: jax.tree.map(lambda _, shared=not module.endswith("_decoder"): shared, value)
                for module, value in subtree.items()}

    return {group: group_mask(group, subtree) for group, subtree in params.items()}


WeightsFn = Callable[[dict, dict, jax.Array, jax.Array, tuple[str, ...]], tuple[jax.Array, jax.Array, dict]]


def reweighting(name: str, weights_fn: WeightsFn, *, aux_as_tasks: bool, init=no_params, init_state=no_params,
                after_update=None) -> LossWeighting:
    """A weighting of the losses: `weights_fn(weighting_params, state, losses, rng, names) -> (weights, regulariser,
    new_state)` with `losses` the weighted terms as a vector (gradient stopped) and `weights` differentiable in
    `weighting_params` only. The objective is Σ weights·losses + regulariser + the unweighted terms.
    `after_update(state, losses)` (optional) gets the same vector at the updated parameters.
    """

    def terms_after_update(state: dict, terms: Mapping[str, jax.Array]) -> dict:
        return after_update(state, jnp.stack([terms[key] for key in weighted_keys(terms, aux_as_tasks)]))

    def value_and_grad(loss_terms_fn: LossTermsFn, representation_zeros=None):
        def step(params, state: dict, rng: jax.Array) -> Weighted:
            def objective(params):
                terms, aux = loss_terms_fn(params)
                keys = weighted_keys(terms, aux_as_tasks)
                names = tuple(term_name(key) for key in keys)
                losses = jnp.stack([terms[key] for key in keys])
                weights, regulariser, new_state = weights_fn(params.get("loss_weighting", {}), state,
                                                             jax.lax.stop_gradient(losses), rng, names)
                total = jnp.dot(weights, losses) + regulariser + unweighted_sum(terms, keys)
                return total, (terms, aux, new_state, dict(zip(names, weights)))

            (total, (terms, aux, new_state, weights)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return Weighted(total, terms, aux, grads, new_state, jax.lax.stop_gradient(weights))

        return step

    return LossWeighting(name, init=init, init_state=init_state, value_and_grad=value_and_grad,
                         after_update=terms_after_update if after_update else None)


CoefficientsFn = Callable[[jax.Array, jax.Array, dict, jax.Array], tuple[jax.Array, dict]]


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


def treated(terms, aux, grads, state: dict, keys: list[str], coefficients: jax.Array,
            loss_weights: jax.Array) -> Weighted:
    """A treatment's result: the logged total is Σ loss_weights·losses + the unweighted terms, the logged weights
    are the coefficients."""
    losses = jnp.stack([terms[key] for key in keys])
    total = jnp.dot(loss_weights, losses) + unweighted_sum(terms, keys)
    return Weighted(total, dict(terms), aux, grads, state, dict(zip((term_name(key) for key in keys), coefficients)))


def gradient_treatment(name: str, coefficients_fn: CoefficientsFn, *, aux_as_tasks: bool, init_state=no_params,
                       scope: str = "shared") -> LossWeighting:
    """A treatment of the per-task gradients: `coefficients_fn(gram, losses, state, rng) -> (c, new_state)`.

    `scope='shared'`: the shared gradient is Σ_t c_t·g_t and every task-specific module (decoders) keeps its own
    task's plain gradient, as in LibMTL (the Nash-MTL and MGDA reference codes scale the decoders by c instead).
    `scope='all'`: c weights every parameter's gradient (GradNorm's loss weights).
    The unweighted terms' gradient is added to both afterwards.
    """
    if scope not in ("shared", "all"):
        raise ValueError(f"gradient_treatment scope={scope!r}; expected 'shared' or 'all'")

    def value_and_grad(loss_terms_fn: LossTermsFn, representation_zeros=None):
        def step(params, state: dict, rng: jax.Array) -> Weighted:
            terms, aux, keys, rows, has_others = per_task_gradients(
                loss_terms_fn, params, lambda terms: weighted_keys(terms, aux_as_tasks))
            num_tasks = len(keys)
            mask = shared_mask(params)
            losses = jnp.stack([terms[key] for key in keys])
            coefficients, new_state = coefficients_fn(shared_gram(rows, mask, num_tasks), losses, state, rng)
            coefficients = jax.lax.stop_gradient(coefficients)

            def combine(row, shared):
                treated = shared or scope == "all"
                grad = (jnp.tensordot(coefficients.astype(row.dtype), row[:num_tasks], axes=1) if treated
                        else jnp.sum(row[:num_tasks], axis=0))
                return grad + row[num_tasks] if has_others else grad

            grads = jax.tree.map(combine, rows, mask)
            loss_weights = coefficients if scope == "all" else jnp.ones_like(coefficients)
            return treated(terms, aux, grads, new_state, keys, coefficients, loss_weights)

        return step

    return LossWeighting(name, init=no_params, init_state=init_state, value_and_grad=value_and_grad,
                         per_task_gradients=True)


def representation_treatment(name: str, coefficients_fn: CoefficientsFn, *, aux_as_tasks: bool,
                             init_state=no_params) -> LossWeighting:
    """A treatment in the shared representation's space (Sener & Koltun's upper bound, MGDA-UB): the Gram matrix is
    that of the tasks' gradients with respect to the representation the decoders read, which needs a backward pass
    through the decoders only; the coefficients then weight the task losses in one ordinary backward pass, so they
    scale the decoders' gradients too, as in Sener & Koltun's code (which, with a normalisation, weights the raw
    losses by the normalised problem's weights; here the normalised gradients are combined, LibMTL's convention).
    Aux terms never reach that representation, so they cannot count as tasks here."""
    if aux_as_tasks:
        raise UserError(f"config.loss_weighting={name!r} works on the gradients of the representation the decoders "
                        "read, which aux losses never reach; expected weighting.aux_as_tasks=False.")

    def value_and_grad(loss_terms_fn: LossTermsFn, representation_zeros=None):
        if representation_zeros is None:
            raise ValueError(f"{name} needs representation_zeros (the shared representation's zero perturbations)")

        def step(params, state: dict, rng: jax.Array) -> Weighted:
            terms, vjp_fn, aux = jax.vjp(loss_terms_fn, params, representation_zeros(params), has_aux=True)
            keys = weighted_keys(terms, False)
            basis = jnp.eye(len(keys), dtype=jnp.float32)
            cotangents = {key: basis[keys.index(key)] if key in keys else jnp.zeros((len(keys),), jnp.float32)
                          for key in terms}
            _, representation_rows = jax.vmap(vjp_fn)(cotangents)  # the parameter rows are dead code
            gram = shared_gram(representation_rows, jax.tree.map(lambda _: True, representation_rows), len(keys))
            losses = jnp.stack([terms[key] for key in keys])
            coefficients, new_state = coefficients_fn(gram, losses, state, rng)
            coefficients = jax.lax.stop_gradient(coefficients)
            grads, _ = vjp_fn({key: coefficients[keys.index(key)] if key in keys else jnp.ones((), jnp.float32)
                               for key in terms})
            return treated(terms, aux, grads, new_state, keys, coefficients, coefficients)

        return step

    return LossWeighting(name, init=no_params, init_state=init_state, value_and_grad=value_and_grad,
                         per_task_gradients=True)
