"""Loss weightings: Σ_t w_t·L_t with weights that are fixed, learned, drawn or adapted from the losses' history.

Each `*_weights` function is the pure rule (tested by hand); each constructor takes the method's hyper-parameters
(checked there) and returns its `base.Method`, whose `update` gives the weights w (the vector of the `losses`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from auxmtl_jax.weighting.base import LOSS, Method, check_number, init_empty_state

_LOG_EPS = 1e-8


def equal() -> Method:
    """Σ L_t: the paper's Joint and Auxi objectives."""
    def update(losses, gram, state, rng, params, names):
        return jnp.ones_like(losses), state

    return Method("equal", LOSS, init_empty_state, update)


def kendall() -> Method:
    """Uncertainty weighting (Kendall et al. 2018): Σ_t ½·exp(−s_t)·L_t + ½·s_t with s_t = log σ_t² learned by the
    optimiser (kept at params['loss_weighting']['log_var'], no weight decay)."""
    def init_params(names: Sequence[str]) -> dict:
        return {"log_var": {name: jnp.zeros((), jnp.float32) for name in names}}

    def log_var(params: dict, names: Sequence[str]) -> jax.Array:
        return jnp.stack([params["log_var"][name] for name in names])

    def update(losses, gram, state, rng, params, names):
        return 0.5 * jnp.exp(-log_var(params, names)), state

    def regulariser(params: dict, names: Sequence[str]) -> jax.Array:
        return 0.5 * jnp.sum(log_var(params, names))

    def main_objective(params: dict, losses: Mapping[str, jax.Array]) -> jax.Array:
        return sum((0.5 * jnp.exp(-params["log_var"][task]) * loss + 0.5 * params["log_var"][task]
                    for task, loss in losses.items()), jnp.zeros(()))

    return Method("kendall", LOSS, init_empty_state, update, init_params=init_params, regulariser=regulariser,
                  main_objective=main_objective)


def dwa_weights(last: jax.Array, before_last: jax.Array, temperature: float) -> jax.Array:
    """DWA (Liu, Johns & Davison 2019): w_t = T·softmax_t((L_t(k−1) / L_t(k−2)) / temperature) from the mean
    losses of the last two periods."""
    return last.shape[0] * jax.nn.softmax(last / jnp.maximum(before_last, 1e-12) / temperature)


class DWAState(NamedTuple):
    period_sum: jax.Array  # the losses summed over the current period
    period_count: jax.Array  # steps into the current period
    last: jax.Array  # mean losses of the last complete period
    before_last: jax.Array  # ... and of the one before
    periods: jax.Array  # complete periods so far


def dwa(temperature: float = 2.0, period_steps: int = 0,
        steps_per_epoch: int | Callable[[], int] | None = None) -> Method:
    """DWA: weights from how fast each loss fell over the last two periods (epochs in the paper; `period_steps`
    here, 0 for one epoch of `steps_per_epoch`, which may be a function called only then), equal weights until two
    periods are complete. Temperature 2 as in the paper."""
    check_number("dwa", "temperature", temperature, minimum=0, strict=True)
    check_number("dwa", "period_steps", period_steps, minimum=0, strict=False, integer=True)
    if period_steps == 0:
        steps_per_epoch = steps_per_epoch() if callable(steps_per_epoch) else steps_per_epoch
        if not steps_per_epoch:
            raise ValueError("dwa with weighting.dwa.period_steps=0 (one epoch) needs steps_per_epoch")
        period_steps = steps_per_epoch
    temperature, period = float(temperature), int(period_steps)

    def init(names: Sequence[str]) -> DWAState:
        size = (len(names),)
        return DWAState(period_sum=jnp.zeros(size, jnp.float32), period_count=jnp.zeros((), jnp.int32),
                        last=jnp.ones(size, jnp.float32), before_last=jnp.ones(size, jnp.float32),
                        periods=jnp.zeros((), jnp.int32))

    def update(losses, gram, state: DWAState, rng, params, names):
        weights = jnp.where(state.periods >= 2, dwa_weights(state.last, state.before_last, temperature),
                            jnp.ones_like(losses))
        total, count = state.period_sum + losses, state.period_count + 1
        ends = count >= period
        return weights, DWAState(period_sum=jnp.where(ends, 0.0, total), period_count=jnp.where(ends, 0, count),
                                 last=jnp.where(ends, total / count, state.last),
                                 before_last=jnp.where(ends, state.last, state.before_last),
                                 periods=state.periods + ends.astype(jnp.int32))

    return Method("dwa", LOSS, init, update)


def rlw() -> Method:
    """Random Loss Weighting (Lin et al. 2021): each step w = softmax(z), z ~ N(0, I). The weights sum to 1, as
    in the paper (equal's sum to T), so at the same learning rate the main losses move T times slower."""
    def update(losses, gram, state, rng, params, names):
        return jax.nn.softmax(jax.random.normal(rng, losses.shape)), state

    return Method("rlw", LOSS, init_empty_state, update)


def famo_weights(logits: jax.Array, losses: jax.Array) -> jax.Array:
    """FAMO's loss weights: the gradient of Σ_t (z_t/c)·log L_t with z = softmax(logits) and c = Σ_t z_t/L_t is
    Σ_t w_t·∇L_t with w_t = z_t / (c·L_t) (they sum to 1)."""
    z = jax.nn.softmax(logits)
    shifted = losses + _LOG_EPS
    return z / (jnp.sum(z / shifted) * shifted)


def famo_logits_gradient(logits: jax.Array, losses_before: jax.Array, losses_after: jax.Array) -> jax.Array:
    """FAMO's update signal for the logits: Jᵀδ of z = softmax(logits), with δ_t = log L_t(θ) − log L_t(θ⁺) the
    drop of each log loss over the step on the same batch."""
    delta = jnp.log(losses_before + _LOG_EPS) - jnp.log(losses_after + _LOG_EPS)
    z = jax.nn.softmax(logits)
    return z * (delta - jnp.dot(z, delta))


class FAMOState(NamedTuple):
    logits: jax.Array  # the weights' logits
    opt_state: Any  # the logits' Adam state
    losses: jax.Array  # the losses this step's weights were computed from


def famo(learning_rate: float = 0.025, weight_decay: float = 0.01) -> Method:
    """FAMO (Liu et al. 2023): weights z_t/(c·L_t) from logits that Adam (lr 0.025, weight decay γ = 0.01, the
    reference defaults) moves after every step, using the losses at the updated parameters on the same batch
    (one extra forward pass, no extra backward). The reference code can also clip the shared gradient's norm;
    that is not done here, so FAMO keeps its single backward pass."""
    check_number("famo", "learning_rate", learning_rate, minimum=0, strict=True)
    check_number("famo", "weight_decay", weight_decay, minimum=0, strict=False)
    tx = optax.chain(optax.add_decayed_weights(float(weight_decay)), optax.adam(float(learning_rate)))

    def init(names: Sequence[str]) -> FAMOState:
        logits = jnp.zeros((len(names),), jnp.float32)
        return FAMOState(logits=logits, opt_state=tx.init(logits), losses=jnp.ones_like(logits))

    def update(losses, gram, state: FAMOState, rng, params, names):
        return famo_weights(state.logits, losses), state._replace(losses=losses)

    def after_update(state: FAMOState, losses_after: jax.Array) -> FAMOState:
        gradient = famo_logits_gradient(state.logits, state.losses, losses_after)
        updates, opt_state = tx.update(gradient, state.opt_state, state.logits)
        return state._replace(logits=optax.apply_updates(state.logits, updates), opt_state=opt_state)

    return Method("famo", LOSS, init, update, after_update=after_update)
