"""Loss weightings and gradient treatments: how the loss terms of one step become gradients.

`config.loss_weighting` names the method and `config.weighting.<method>.*` holds its hyper-parameters:

| method        | kind                | reference                     | options (defaults)                        |
|---------------|---------------------|-------------------------------|-------------------------------------------|
| `equal`       | loss weighting      | the paper's Joint / Auxi      |                                           |
| `kendall`     | loss weighting      | Kendall et al. 2018           | learned log σ² (optimiser)                |
| `dwa`         | loss weighting      | Liu, Johns & Davison 2019     | temperature 2, period_steps 0 (one epoch) |
| `rlw`         | loss weighting      | Lin et al. 2021               |                                           |
| `famo`        | loss weighting      | Liu et al. 2023               | learning_rate 0.025, weight_decay 0.01    |
| `gradnorm`    | per-task gradients  | Chen et al. 2018              | alpha 1.5, learning_rate 0.025            |
| `mgda`        | per-task gradients  | Sener & Koltun 2018           | normalization none                        |
| `mgda_ub`     | representation grads| Sener & Koltun 2018 (UB)      | mgda.normalization                        |
| `pcgrad`      | per-task gradients  | Yu et al. 2020                |                                           |
| `cagrad`      | per-task gradients  | Liu et al. 2021               | c 0.4, rescale 1                          |
| `imtl_g`      | per-task gradients  | Liu et al. 2021 (IMTL)        |                                           |
| `aligned_mtl` | per-task gradients  | Senushkin et al. 2023         |                                           |
| `nash_mtl`    | per-task gradients  | Navon et al. 2022             | max_norm 1.0, iterations 20               |
| `<loss>+<treatment>` | chain        | e.g. `kendall+pcgrad`         | each part's own                           |

Each method is an optax-style pair of pure functions (`base.Method`: `init(names) -> state`, a NamedTuple, and
`update(losses, gram, state, rng, params, names) -> (coefficients, state)`), built by its constructor from its
hyper-parameters. `config.loss_weighting='kendall+pcgrad'` chains a loss weighting with a gradient treatment
(`chaining.chain`): the treatment combines the weighted tasks' gradients. A loss weighting's learned parameters live
at `params['loss_weighting']` and the state in `TrainState.weighting_state`, so checkpoints resume it exactly.
A treatment reads the tasks' gradients of the shared parameters (`base.shared_mask`): given the loss split into
shared part and heads (`SplitLoss`), one backward pass through the heads and one VJP of the shared part per task
give them (`split_backward`); `config.weighting.space='representation'` solves on the gradients of the
representation the decoders read instead (LibMTL's `rep_grad`; `mgda_ub` always does). Aux and deep-supervision
terms are added unweighted after the weighting (the paper's Eq. 3); `weighting.aux_as_tasks=True` weights /
treats each aux term as one more task.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting import build as build_lib, gradient_treatments, loss_weightings
from auxmtl_jax.weighting.base import (AUX_PREFIX, MAIN_PREFIX, EmptyState, Method, shared_mask, term_name,
                                       weighted_names)
from auxmtl_jax.weighting.chaining import Chain, ChainError, Coefficients, chain
from auxmtl_jax.weighting.build import LossWeighting
from auxmtl_jax.weighting.core import Weighted
from auxmtl_jax.weighting.split_backward import SPACES, SplitLoss

__all__ = ["AUX_PREFIX", "DEFAULT_OPTIONS", "Chain", "ChainError", "Coefficients", "EmptyState", "LossWeighting",
           "MAIN_PREFIX", "Method", "SPACES", "SplitLoss", "WEIGHTINGS", "Weighted", "build_method", "chain", "default_options",
           "from_config", "get_weighting", "main_terms", "other_terms_sum", "shared_mask",
           "state_names", "term_name", "weighted_names"]

# name -> constructor; its keyword arguments are the options `config.weighting.<name>.*`, their defaults the
# defaults (CONTEXT arguments excepted).
WEIGHTINGS: dict[str, Callable[..., Method]] = {
    "equal": loss_weightings.equal,
    "kendall": loss_weightings.kendall,
    "dwa": loss_weightings.dwa,
    "rlw": loss_weightings.rlw,
    "famo": loss_weightings.famo,
    "gradnorm": gradient_treatments.gradnorm,
    "mgda": gradient_treatments.mgda,
    "mgda_ub": gradient_treatments.mgda_ub,
    "pcgrad": gradient_treatments.pcgrad,
    "cagrad": gradient_treatments.cagrad,
    "imtl_g": gradient_treatments.imtl_g,
    "aligned_mtl": gradient_treatments.aligned_mtl,
    "nash_mtl": gradient_treatments.nash_mtl,
}

OPTIONS_OF = {"mgda_ub": "mgda"}  # methods that share another method's options
CONTEXT = ("steps_per_epoch",)  # constructor arguments the run supplies, not the config
CHAIN_SEPARATOR = "+"


def _options(constructor: Callable[..., Method]) -> dict[str, Any]:
    return {name: parameter.default for name, parameter in inspect.signature(constructor).parameters.items()
            if name not in CONTEXT}


DEFAULT_OPTIONS: dict[str, Any] = {
    "aux_as_tasks": False,
    "space": "parameters",  # where a treatment solves: 'parameters' or 'representation' (split_backward)
    **{name: _options(constructor) for name, constructor in WEIGHTINGS.items()
       if name not in OPTIONS_OF and _options(constructor)},
}


def default_options() -> ml_collections.ConfigDict:
    """`config.weighting`: every method's hyper-parameters at their defaults."""
    return ml_collections.ConfigDict(DEFAULT_OPTIONS)


def build_method(name: str, options=None, *, steps_per_epoch: int | Callable[[], int] | None = None) -> Method:
    """The single method registered under `name`, with its options from `options` (a `config.weighting`)."""
    options = default_options() if options is None else _with_defaults(options)
    constructor = WEIGHTINGS[name]
    key = OPTIONS_OF.get(name, name)
    kwargs = {option: options[key][option] for option in DEFAULT_OPTIONS.get(key, {})}
    if "steps_per_epoch" in inspect.signature(constructor).parameters:
        kwargs["steps_per_epoch"] = steps_per_epoch
    return constructor(**kwargs)


def get_weighting(name: str, options=None, *,
                  steps_per_epoch: int | Callable[[], int] | None = None) -> LossWeighting:
    """The weighting `name` names (one method, or a loss weighting and a treatment joined by '+') with `options`
    (a `config.weighting`; the defaults when None).

    `steps_per_epoch` (or a function returning it, called only when needed) resolves DWA's `period_steps=0`.
    """
    parts = [part.strip() for part in name.split(CHAIN_SEPARATOR)] if isinstance(name, str) else [name]
    for part in parts:
        if part not in WEIGHTINGS:
            known = ", ".join(WEIGHTINGS)
            if len(parts) == 1:
                raise UserError(f"config.loss_weighting={name!r} is unknown; expected one of: {known}.")
            raise UserError(f"config.loss_weighting={name!r} names {part!r}, which is unknown; expected "
                            f"'{CHAIN_SEPARATOR}'-joined names from: {known}.")
    options = default_options() if options is None else _with_defaults(options)
    methods = [build_method(part, options, steps_per_epoch=steps_per_epoch) for part in parts]
    if not isinstance(options.aux_as_tasks, bool):
        raise UserError(f"config.weighting.aux_as_tasks={options.aux_as_tasks!r}; expected True or False.")
    try:
        chained = chain(*methods)
    except ChainError as error:
        raise UserError(f"config.loss_weighting={name!r}: {error}") from error
    return build_lib.build(chained, options.aux_as_tasks, options.space)


def _with_defaults(options) -> ml_collections.ConfigDict:
    """`options` over the defaults, so a config written before a method existed still names all its fields."""
    merged = default_options()
    for key, value in dict(options).items():
        if isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict):
            merged[key].update(dict(value))
        else:
            merged[key] = value
    return merged


def from_config(config, steps_per_epoch: int | Callable[[], int] | None = None) -> LossWeighting:
    """The weighting `config.loss_weighting` names, with `config.weighting`'s options. `steps_per_epoch` may be a
    function: it is called only when a method needs it (DWA with `period_steps=0`)."""
    return get_weighting(config.loss_weighting, config.get("weighting"), steps_per_epoch=steps_per_epoch)


def state_names(config, aux_tasks: Sequence[str]) -> tuple[str, ...]:
    """The names a run's weighting is initialised with: its tasks, then its aux tasks when they count as tasks."""
    options = config.get("weighting") or default_options()
    return weighted_names(tuple(config.tasks), tuple(aux_tasks), bool(options.get("aux_as_tasks", False)))


def main_terms(terms: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The main-task terms `{task: loss}` out of all terms."""
    return {key[len(MAIN_PREFIX):]: value for key, value in terms.items() if key.startswith(MAIN_PREFIX)}


def other_terms_sum(terms: Mapping[str, jax.Array]) -> jax.Array:
    """Sum of the non-main terms (aux, deep supervision)."""
    return sum((value for key, value in terms.items() if not key.startswith(MAIN_PREFIX)), jnp.zeros(()))
