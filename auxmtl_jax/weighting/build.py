"""The trainer's view of a weighting chain (`LossWeighting`) and which backward pass serves it.

* no treatment: one ordinary backward pass of the weighted objective (`core.reweighted_step`);
* a treatment, given the loss split into shared part and heads (`SplitLoss`): the heads' backward once and the
  shared part's per task (`split_backward`), in parameter or representation space;
* a treatment without a split (a plain loss function, or aux terms treated as tasks when they read each other):
  per-task gradients of every parameter (`core.treated_step`), parameter space only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting.base import REPRESENTATION, Names, term_name, weighted_keys
from auxmtl_jax.weighting.chaining import Chain, state_tree, typed_state
from auxmtl_jax.weighting.core import LossTermsFn, Weighted, reweighted_step, treated_step
from auxmtl_jax.weighting.split_backward import (PARAMETERS, REPRESENTATION_SPACE, SPACES, SplitLoss,
                                                 split_treated_step)


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """The trainer's view of a chain: `init(names)` makes its optimiser-trained parameters (kept at
    `params['loss_weighting']`), `init_state(names)` its state as a pytree of dicts (kept in
    `TrainState.weighting_state`), and `after_update(state, terms)` (None when no method needs it) updates the
    state from the loss terms at the updated parameters on the same batch (FAMO).

    `value_and_grad(loss_terms_fn, split=None)` gives the step function `(params, state, rng) -> Weighted`.
    `loss_terms_fn(params) -> (terms, aux)`; `split` (a `SplitLoss`, the same terms as heads ∘ shared part) lets a
    treatment run at about one backward pass, and is required in representation space.
    `main_objective(weighting_params, {task: loss})`: the main-task objective (`Chain.main_objective`).
    `space`: 'parameters' or 'representation', where a treatment solves.
    """

    name: str
    init: Callable[[Sequence[str]], dict]
    init_state: Callable[[Sequence[str]], dict]
    value_and_grad: Callable[..., Callable[[Any, dict, jax.Array], Weighted]]
    after_update: Callable[[dict, Mapping[str, jax.Array]], dict] | None = None
    per_task_gradients: bool = False
    main_objective: Callable[[dict, Mapping[str, jax.Array]], jax.Array] | None = None
    chain: Chain | None = None
    space: str = PARAMETERS


def build(chain: Chain, aux_as_tasks: bool, space: str = PARAMETERS) -> LossWeighting:
    """The `LossWeighting` of `chain`, weighting the main terms (and the aux terms with `aux_as_tasks`); a
    treatment solves in `space` (a REPRESENTATION-kind treatment, MGDA-UB, always in the representation's)."""
    treatment = chain.treatment
    if space not in SPACES:
        raise UserError(f"config.weighting.space={space!r}; expected one of {SPACES}.")
    if treatment is not None and treatment.kind == REPRESENTATION:
        space = REPRESENTATION_SPACE
    if treatment is not None and space == REPRESENTATION_SPACE and aux_as_tasks:
        raise UserError(f"config.loss_weighting={chain.name!r} in representation space works on the gradients of "
                        "the representation the decoders read, which aux losses never reach; expected "
                        "weighting.aux_as_tasks=False (or weighting.space='parameters').")

    def init_state(names: Names) -> dict:
        return state_tree(chain, chain.init(names))

    def value_and_grad(loss_terms_fn: LossTermsFn, split: SplitLoss | None = None):
        if treatment is None:
            return reweighted_step(chain, loss_terms_fn, aux_as_tasks)
        splittable = split is not None and (split.own_copies or not aux_as_tasks)
        if space == REPRESENTATION_SPACE:
            if not splittable:
                raise ValueError(f"{chain.name} in representation space needs the loss split into shared part "
                                 "and heads (a SplitLoss)")
            return split_treated_step(chain, split, aux_as_tasks, space)
        if splittable:
            return split_treated_step(chain, split, aux_as_tasks, space)
        return treated_step(chain, loss_terms_fn, aux_as_tasks)

    def after_update(state: dict, terms: Mapping[str, jax.Array]) -> dict:
        keys = weighted_keys(terms, aux_as_tasks)
        names = tuple(term_name(key) for key in keys)
        new_state = chain.after_update(typed_state(chain, names, state), jnp.stack([terms[key] for key in keys]))
        return state_tree(chain, new_state)

    return LossWeighting(chain.name, init=chain.init_params, init_state=init_state, value_and_grad=value_and_grad,
                         after_update=after_update if chain.has_after_update else None,
                         per_task_gradients=treatment is not None, main_objective=chain.main_objective,
                         chain=chain, space=space if treatment is not None else PARAMETERS)
