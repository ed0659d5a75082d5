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

A weighting is an optax-style bundle of pure functions (`core.LossWeighting`); its learned parameters live at
`params['loss_weighting']` and its state in `TrainState.weighting_state`, so checkpoints resume it exactly.
Per-task gradients come from one `jax.vmap` of the VJP; the treatments act on the shared encoder's gradient
(`core.shared_mask`). Aux and deep-supervision terms are added unweighted after the weighting (the paper's
Eq. 3); `weighting.aux_as_tasks=True` weights / treats each aux term as one more task.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from auxmtl_jax.errors import UserError
from auxmtl_jax.weighting import gradient_treatments, loss_weightings
from auxmtl_jax.weighting.core import (AUX_PREFIX, MAIN_PREFIX, LossWeighting, Weighted, shared_mask, term_name,
                                       weighted_names)

__all__ = ["AUX_PREFIX", "DEFAULT_OPTIONS", "LossWeighting", "MAIN_PREFIX", "WEIGHTINGS", "Weighted",
           "default_options", "from_config", "get_weighting", "shared_mask", "state_names", "term_name",
           "weighted_names"]

WEIGHTINGS: dict[str, Callable[[Any, bool], LossWeighting]] = {
    "equal": loss_weightings.equal,
    "kendall": loss_weightings.kendall,
    "dwa": loss_weightings.dwa,
    "rlw": loss_weightings.rlw,
    "famo": loss_weightings.famo,
    "gradnorm": loss_weightings.gradnorm,
    "mgda": gradient_treatments.mgda,
    "mgda_ub": gradient_treatments.mgda_ub,
    "pcgrad": gradient_treatments.pcgrad,
    "cagrad": gradient_treatments.cagrad,
    "imtl_g": gradient_treatments.imtl_g,
    "aligned_mtl": gradient_treatments.aligned_mtl,
    "nash_mtl": gradient_treatments.nash_mtl,
}

OPTIONS_OF = {"mgda_ub": "mgda"}  # methods that share another method's options

DEFAULT_OPTIONS: dict[str, Any] = {
    "aux_as_tasks": False,
    "dwa": {"temperature": 2.0, "period_steps": 0},
    "famo": {"learning_rate": 0.025, "weight_decay": 0.01},
    "gradnorm": {"alpha": 1.5, "learning_rate": 0.025},
    "mgda": {"normalization": "none"},
    "cagrad": {"c": 0.4, "rescale": 1},
    "nash_mtl": {"max_norm": 1.0, "iterations": 20},
}


def default_options() -> ml_collections.ConfigDict:
    """`config.weighting`: every method's hyper-parameters at their defaults."""
    return ml_collections.ConfigDict(DEFAULT_OPTIONS)


def _check_options(name: str, options) -> None:
    """One UserError naming the bad `config.weighting.*` value of the chosen method."""
    def number(key: str, *, minimum: float, strict: bool, integer: bool = False):
        value = options[name][key]
        ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        if not ok or value < minimum or (strict and value == minimum):
            kind = "an integer" if integer else "a number"
            raise UserError(f"config.weighting.{name}.{key}={value!r}; expected {kind} "
                            f"{'>' if strict else '>='} {minimum}.")

    if name == "dwa":
        number("temperature", minimum=0, strict=True)
        number("period_steps", minimum=0, strict=False, integer=True)
    elif name in ("famo", "gradnorm"):
        number("learning_rate", minimum=0, strict=True)
        number("weight_decay" if name == "famo" else "alpha", minimum=0, strict=False)
    elif name == "cagrad":
        number("c", minimum=0, strict=False)
        if options.cagrad.rescale not in gradient_treatments.CAGRAD_RESCALES:
            raise UserError(f"config.weighting.cagrad.rescale={options.cagrad.rescale!r}; expected one of "
                            f"{gradient_treatments.CAGRAD_RESCALES}.")
    elif name in ("mgda", "mgda_ub") and options.mgda.normalization not in gradient_treatments.MGDA_NORMALIZATIONS:
        raise UserError(f"config.weighting.mgda.normalization={options.mgda.normalization!r}; expected one of "
                        f"{', '.join(gradient_treatments.MGDA_NORMALIZATIONS)}.")
    elif name == "nash_mtl":
        number("max_norm", minimum=0, strict=False)
        number("iterations", minimum=1, strict=False, integer=True)
    if not isinstance(options.aux_as_tasks, bool):
        raise UserError(f"config.weighting.aux_as_tasks={options.aux_as_tasks!r}; expected True or False.")


def get_weighting(name: str, options=None, *, steps_per_epoch: int | None = None) -> LossWeighting:
    """The weighting registered under `name` with `options` (a `config.weighting`; the defaults when None).

    `steps_per_epoch` resolves DWA's `period_steps=0` (one epoch).
    """
    if name not in WEIGHTINGS:
        raise UserError(f"config.loss_weighting={name!r} is unknown; expected one of: {', '.join(WEIGHTINGS)}.")
    options = default_options() if options is None else _with_defaults(options)
    _check_options(name, options)
    if name == "dwa" and options.dwa.period_steps == 0:
        if not steps_per_epoch:
            raise ValueError("dwa with weighting.dwa.period_steps=0 (one epoch) needs steps_per_epoch")
        options = ml_collections.ConfigDict(options.to_dict())
        options.dwa.period_steps = int(steps_per_epoch)
    return WEIGHTINGS[name](options.get(OPTIONS_OF.get(name, name)), options.aux_as_tasks)


def _with_defaults(options) -> ml_collections.ConfigDict:
    """`options` over the defaults, so a config written before a method existed still names all its fields."""
    merged = default_options()
    for key, value in dict(options).items():
        if isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict):
            merged[key].update(dict(value))
        else:
            merged[key] = value
    return merged


def from_config(config, steps_per_epoch: int | None = None) -> LossWeighting:
    """The weighting `config.loss_weighting` names, with `config.weighting`'s options."""
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


def fig5_main_loss(weighting_params: dict, terms: Mapping[str, jax.Array], name: str) -> jax.Array:
    """The main-task part of the objective that Fig. 5's gradient statistics differentiate: Kendall's weighted sum
    for `kendall`, the plain sum of the main losses for every other method (their weights are not a loss)."""
    losses = main_terms(terms)
    if name != "kendall":
        return sum(losses.values(), jnp.zeros(()))
    return sum((0.5 * jnp.exp(-weighting_params["log_var"][task]) * loss + 0.5 * weighting_params["log_var"][task]
                for task, loss in losses.items()), jnp.zeros(()))
