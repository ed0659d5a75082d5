"""What every weighting method is, in optax's shape, and the naming of the terms it weights.

A method is a pair of pure functions (`Method.init`, `Method.update`), like `optax.GradientTransformation`:

    state = method.init(names)                      # a NamedTuple per method; `EmptyState()` when it keeps none
    coefficients, state = method.update(losses, gram, state, rng, params, names)

with `losses` the weighted terms as a vector (sorted term keys, see `weighted_keys`), `gram` the T×T Gram matrix
of their shared gradients (None for a loss weighting, which reads no gradients), `params` the weighting's learned
parameters (`params['loss_weighting']`, `{}` for most) and `names` the tasks' names in the vector's order.
A loss weighting's coefficients weight the losses and may depend on `params` (Kendall); a treatment's weight the
tasks' shared gradients. Hyper-parameters are the constructors' arguments, checked there (`check_number`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError

MAIN_PREFIX = "loss/"
AUX_PREFIX = "aux_loss/"
AUX_NAME_PREFIX = "aux_"

LOSS = "loss"  # weights the task losses: one ordinary backward pass
GRADIENT = "gradient"  # combines the tasks' gradients of the shared parameters
REPRESENTATION = "representation"  # combines the tasks' gradients of the shared representation (MGDA-UB)
KINDS = (LOSS, GRADIENT, REPRESENTATION)
SCOPES = ("shared", "all")

Names = Sequence[str]
UpdateFn = Callable[[jax.Array, "jax.Array | None", Any, jax.Array, dict, tuple[str, ...]], tuple[jax.Array, Any]]


class EmptyState(NamedTuple):
    """The state of a method that keeps none."""


def init_empty_state(names: Names) -> EmptyState:
    del names
    return EmptyState()


def no_params(names: Names) -> dict:
    """The learned parameters of a method that learns none."""
    del names
    return {}


class Method(NamedTuple):
    """One weighting method: `init(names) -> state` and `update(losses, gram, state, rng, params, names) ->
    (coefficients, state)` (see the module docstring), plus what the backward pass needs to know about it.

    kind: LOSS, GRADIENT or REPRESENTATION. scope (treatments): 'shared' combines the shared parameters' gradients
    and leaves each task-specific module its task's gradient (LibMTL's convention); 'all' scales every parameter's
    gradient by the coefficients, i.e. weights the losses (GradNorm, MGDA-UB).
    init_params(names): the learned parameters, trained by the network's optimiser at `params['loss_weighting']`.
    regulariser(params, names): a term added to the objective (Kendall's ½Σ log σ²).
    after_update(state, losses): the state updated from the losses at the updated parameters, same batch (FAMO).
    main_objective(params, {task: loss}): the main-task objective the network's gradient follows, when the
    weights are learned parameters (Kendall); every other method's is the plain sum (`plain_sum`).
    """

    name: str
    kind: str
    init: Callable[[Names], NamedTuple]
    update: UpdateFn
    scope: str = "shared"
    init_params: Callable[[Names], dict] = no_params
    regulariser: Callable[[dict, tuple[str, ...]], jax.Array] | None = None
    after_update: Callable[[Any, jax.Array], Any] | None = None
    main_objective: Callable[[dict, Mapping[str, jax.Array]], jax.Array] | None = None


def plain_sum(losses: Mapping[str, jax.Array]) -> jax.Array:
    return sum(losses.values(), jnp.zeros(()))


def check_number(method: str, key: str, value: Any, *, minimum: float, strict: bool, integer: bool = False) -> None:
    """One UserError naming `config.weighting.<method>.<key>` when `value` is not a number (an integer) above
    (`strict`) or at least `minimum`."""
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or value < minimum or (strict and value == minimum):
        kind = "an integer" if integer else "a number"
        raise UserError(f"config.weighting.{method}.{key}={value!r}; expected {kind} "
                        f"{'>' if strict else '>='} {minimum}.")


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


DECODER_SUFFIX = "_decoder"
OWNER_PREFIXES = {"main": MAIN_PREFIX, "aux": AUX_PREFIX, "deep_supervision": "ds_loss/"}


def is_shared_module(group: str, module: str) -> bool:
    """True for the modules every task's loss reaches: `main` except the `<task>_decoder` modules (the encoder, and
    the Context decoder's shared ASPP). Aux, deep-supervision and weighting parameters are task-specific."""
    return group == "main" and not module.endswith(DECODER_SUFFIX)


def shared_mask(params: Mapping[str, Any]) -> Any:
    """True on the leaves of the shared modules (`is_shared_module`), False elsewhere."""
    return {group: {module: jax.tree.map(lambda _, shared=is_shared_module(group, module): shared, value)
                    for module, value in subtree.items()} if isinstance(subtree, Mapping)
            else jax.tree.map(lambda _: False, subtree)
            for group, subtree in params.items()}


def partition(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(shared, task-specific): the shared modules (`{'main': {...}}`) and everything else, as two trees."""
    shared = {"main": {module: value for module, value in params.get("main", {}).items()
                       if is_shared_module("main", module)}}
    specific = {group: ({module: value for module, value in subtree.items() if not is_shared_module(group, module)}
                        if group == "main" else subtree)
                for group, subtree in params.items()}
    return shared, specific


def combine(shared: Mapping[str, Any], specific: Mapping[str, Any]) -> dict:
    """The inverse of `partition`."""
    return {**specific, "main": {**shared.get("main", {}), **specific.get("main", {})}}


def owner_keys(specific: Mapping[str, Any]) -> Any:
    """A tree like `specific` (from `partition`) holding, at each leaf, the key of the loss term that owns it:
    `main/<task>_decoder` -> 'loss/<task>', `aux/<task>` -> 'aux_loss/<task>', `deep_supervision/<task>` ->
    'ds_loss/<task>'; '' for the weighting's own parameters."""
    def owner(group: str, module: str) -> str:
        if group not in OWNER_PREFIXES:
            return ""
        return OWNER_PREFIXES[group] + (module.removesuffix(DECODER_SUFFIX) if group == "main" else module)

    return {group: {module: jax.tree.map(lambda _, key=owner(group, module): key, value)
                    for module, value in subtree.items()} if isinstance(subtree, Mapping)
            else jax.tree.map(lambda _: "", subtree)
            for group, subtree in specific.items()}
