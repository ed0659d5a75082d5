"""Loss weightings: how the per-term losses of one step become gradients.

A weighting is a pair of pure functions (optax style): `init(tasks) -> params` creates its learnable parameters
(kept at `params['loss_weighting']`, outside `main`), and `value_and_grad(loss_terms_fn)` turns a function
`params -> (terms, aux)` into `params -> ((total, (terms, aux)), grads)`. Weightings that only reweight losses
(`equal`, `kendall`) build on `combine`; gradient treatments (PCGrad, CAGrad, GradNorm) can replace
`value_and_grad` with per-term gradients without touching the train step.

Loss terms are named `loss/<task>` (main tasks), `aux_loss/<task>` and `ds_loss/<task>`; the trainer applies the
fixed aux / deep-supervision weights before handing terms over, and weightings reweight the main terms only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from auxmtl_jax.errors import UserError

MAIN_PREFIX = "loss/"
LossTermsFn = Callable[[Any], tuple[Mapping[str, jax.Array], Any]]


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """`init(tasks) -> params`; `value_and_grad(loss_terms_fn) -> fn(params) -> ((total, (terms, aux)), grads)`."""

    name: str
    init: Callable[[Sequence[str]], dict]
    value_and_grad: Callable[[LossTermsFn], Callable]


def main_terms(terms: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The main-task terms `{task: loss}` out of all terms."""
    return {key[len(MAIN_PREFIX):]: value for key, value in terms.items() if key.startswith(MAIN_PREFIX)}


def other_terms_sum(terms: Mapping[str, jax.Array]) -> jax.Array:
    """Sum of the non-main terms (aux, deep supervision), which every weighting adds unweighted."""
    return sum((value for key, value in terms.items() if not key.startswith(MAIN_PREFIX)), jnp.zeros(()))


def equal_combine(weighting_params: dict, terms: Mapping[str, jax.Array]) -> jax.Array:
    """Σ main losses + Σ other terms (the paper's Joint and Auxi objectives)."""
    del weighting_params
    return sum(main_terms(terms).values(), jnp.zeros(())) + other_terms_sum(terms)


def kendall_combine(weighting_params: dict, terms: Mapping[str, jax.Array]) -> jax.Array:
    """Uncertainty weighting (Kendall et al. 2018): Σ_t ½·exp(−s_t)·L_t + ½·s_t with s_t = log σ_t² learned."""
    total = other_terms_sum(terms)
    for task, loss in main_terms(terms).items():
        log_var = weighting_params["log_var"][task]
        total = total + 0.5 * jnp.exp(-log_var) * loss + 0.5 * log_var
    return total


def combine_value_and_grad(combine: Callable[[dict, Mapping[str, jax.Array]], jax.Array]):
    """The default gradient treatment: one backward pass through `combine` of the terms."""

    def value_and_grad(loss_terms_fn: LossTermsFn):
        def total_fn(params):
            terms, aux = loss_terms_fn(params)
            return combine(params.get("loss_weighting", {}), terms), (terms, aux)

        return jax.value_and_grad(total_fn, has_aux=True)

    return value_and_grad


def equal() -> LossWeighting:
    return LossWeighting("equal", init=lambda tasks: {}, value_and_grad=combine_value_and_grad(equal_combine))


def kendall() -> LossWeighting:
    def init(tasks: Sequence[str]) -> dict:
        return {"log_var": {task: jnp.zeros((), jnp.float32) for task in tasks}}

    return LossWeighting("kendall", init=init, value_and_grad=combine_value_and_grad(kendall_combine))


WEIGHTINGS: dict[str, Callable[[], LossWeighting]] = {"equal": equal, "kendall": kendall}


def get_weighting(name: str) -> LossWeighting:
    """The weighting registered under `name` (config key `loss_weighting`)."""
    if name not in WEIGHTINGS:
        raise UserError(f"config.loss_weighting={name!r} is unknown; expected one of: {', '.join(WEIGHTINGS)}.")
    return WEIGHTINGS[name]()
