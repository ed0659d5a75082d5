"""Loss weightings: Σ_t w_t·L_t with weights that are fixed, learned, drawn or adapted from the losses' history.

Each `*_weights` function is the pure rule (tested by hand); the constructors wrap it as a `core.LossWeighting`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from auxmtl_jax.weighting import core, gradient_treatments

_LOG_EPS = 1e-8


def equal(options, aux_as_tasks: bool) -> core.LossWeighting:
    """Σ L_t: the paper's Joint and Auxi objectives."""
    def weights_fn(params, state, losses, rng, names):
        return jnp.ones_like(losses), jnp.zeros(()), state

    return core.reweighting("equal", weights_fn, aux_as_tasks=aux_as_tasks)


def kendall(options, aux_as_tasks: bool) -> core.LossWeighting:
    """Uncertainty weighting (Kendall et al. 2018): Σ_t ½·exp(−s_t)·L_t + ½·s_t with s_t = log σ_t² learned by the
    optimiser (kept at params['loss_weighting']['log_var'], no weight decay)."""
    def init(names: Sequence[str]) -> dict:
        return {"log_var": {name: jnp.zeros((), jnp.float32) for name in names}}

    def weights_fn(params, state, losses, rng, names):
        log_var = jnp.stack([params["log_var"][name] for name in names])
        return 0.5 * jnp.exp(-log_var), 0.5 * jnp.sum(log_var), state

    return core.reweighting("kendall", weights_fn, aux_as_tasks=aux_as_tasks, init=init)


def dwa_weights(last: jax.Array, before_last: jax.Array, temperature: float) -> jax.Array:
    """DWA (Liu, Johns & Davison 2019): w_t = T·softmax_t((L_t(k−1) / L_t(k−2)) / temperature) from the mean
    losses of the last two periods."""
    return last.shape[0] * jax.nn.softmax(last / jnp.maximum(before_last, 1e-12) / temperature)


def dwa(options, aux_as_tasks: bool) -> core.LossWeighting:
    """DWA: weights from how fast each loss fell over the last two periods (epochs in the paper; `period_steps`
    here), equal weights until two periods are complete. Temperature 2 as in the paper."""
    temperature, period = float(options.temperature), int(options.period_steps)

    def init_state(names: Sequence[str]) -> dict:
        size = (len(names),)
        return {"period_sum": jnp.zeros(size, jnp.float32), "period_count": jnp.zeros((), jnp.int32),
                "last": jnp.ones(size, jnp.float32), "before_last": jnp.ones(size, jnp.float32),
                "periods": jnp.zeros((), jnp.int32)}

    def weights_fn(params, state, losses, rng, names):
        weights = jnp.where(state["periods"] >= 2, dwa_weights(state["last"], state["before_last"], temperature),
                            jnp.ones_like(losses))
        total, count = state["period_sum"] + losses, state["period_count"] + 1
        ends = count >= period
        new_state = {"period_sum": jnp.where(ends, 0.0, total), "period_count": jnp.where(ends, 0, count),
                     "last": jnp.where(ends, total / count, state["last"]),
                     "before_last": jnp.where(ends, state["last"], state["before_last"]),
                     "periods": state["periods"] + ends.astype(jnp.int32)}
        return weights, jnp.zeros(()), new_state

    return core.reweighting("dwa", weights_fn, aux_as_tasks=aux_as_tasks, init_state=init_state)


def rlw(options, aux_as_tasks: bool) -> core.LossWeighting:
    """Random Loss Weighting (Lin et al. 2021): each step w = softmax(z), z ~ N(0, I). The weights sum to 1, as
    in the paper (equal's sum to T), so at the same learning rate the main losses move T times slower."""
    def weights_fn(params, state, losses, rng, names):
        return jax.nn.softmax(jax.random.normal(rng, losses.shape)), jnp.zeros(()), state

    return core.reweighting("rlw", weights_fn, aux_as_tasks=aux_as_tasks)


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


def famo(options, aux_as_tasks: bool) -> core.LossWeighting:
    """FAMO (Liu et al. 2023): weights z_t/(c·L_t) from logits that Adam (lr 0.025, weight decay γ = 0.01, the
    reference defaults) moves after every step, using the losses at the updated parameters on the same batch
    (one extra forward pass, no extra backward). The reference code can also clip the shared gradient's norm;
    that is not done here, so FAMO keeps its single backward pass."""
    tx = optax.chain(optax.add_decayed_weights(float(options.weight_decay)), optax.adam(float(options.learning_rate)))

    def init_state(names: Sequence[str]) -> dict:
        logits = jnp.zeros((len(names),), jnp.float32)
        return {"logits": logits, "opt_state": tx.init(logits), "losses": jnp.ones_like(logits)}

    def weights_fn(params, state, losses, rng, names):
        return famo_weights(state["logits"], losses), jnp.zeros(()), {**state, "losses": losses}

    def after_update(state: dict, losses_after: jax.Array) -> dict:
        gradient = famo_logits_gradient(state["logits"], state["losses"], losses_after)
        updates, opt_state = tx.update(gradient, state["opt_state"], state["logits"])
        return {**state, "logits": optax.apply_updates(state["logits"], updates), "opt_state": opt_state}

    return core.reweighting("famo", weights_fn, aux_as_tasks=aux_as_tasks, init_state=init_state,
                            after_update=after_update)


def gradnorm_gradient(weights: jax.Array, norms: jax.Array, losses: jax.Array, initial_losses: jax.Array,
                      alpha: float) -> jax.Array:
    """The gradient of GradNorm's loss (Chen et al. 2018) in the loss weights w.

    With G_t = w_t‖g_t‖, r_t = (L_t/L_t(0)) / mean_s(L_s/L_s(0)) and the target mean_s(G_s)·r_t^α held constant,
    the loss Σ_t |G_t − target_t| has gradient sign(G_t − target_t)·‖g_t‖.
    """
    ratios = losses / jnp.maximum(initial_losses, 1e-12)
    relative = ratios / jnp.maximum(jnp.mean(ratios), 1e-12)
    targets = jax.lax.stop_gradient(jnp.mean(weights * norms) * relative ** alpha)
    return jnp.sign(weights * norms - targets) * norms


def renormalised(weights: jax.Array) -> jax.Array:
    """GradNorm's weights after a step: clipped at 0 and rescaled to sum to T."""
    weights = jnp.maximum(weights, 0.0)
    return weights.shape[0] * weights / jnp.maximum(jnp.sum(weights), 1e-12)


def gradnorm(options, aux_as_tasks: bool) -> core.LossWeighting:
    """GradNorm: loss weights that balance the tasks' gradient norms on the shared encoder (all its parameters,
    not only the last layer) at rates set by each loss's progress since step 0; α = 1.5 (the paper's NYUv2 value).
    The weights move by Adam at `learning_rate`, so their step does not depend on the gradients' scale (the paper
    trains them with the network's optimiser), and are renormalised to sum to T after each step."""
    alpha = float(options.alpha)
    tx = optax.adam(float(options.learning_rate))

    def init_state(names: Sequence[str]) -> dict:
        weights = jnp.ones((len(names),), jnp.float32)
        return {"weights": weights, "opt_state": tx.init(weights), "initial_losses": jnp.ones_like(weights),
                "started": jnp.zeros((), jnp.bool_)}

    def coefficients_fn(gram, losses, state, rng):
        initial = jnp.where(state["started"], state["initial_losses"], losses)
        gradient = gradnorm_gradient(state["weights"], gradient_treatments.gradient_norms(gram), losses, initial,
                                     alpha)
        updates, opt_state = tx.update(gradient, state["opt_state"], state["weights"])
        new_weights = renormalised(optax.apply_updates(state["weights"], updates))
        return state["weights"], {"weights": new_weights, "opt_state": opt_state, "initial_losses": initial,
                                  "started": jnp.ones((), jnp.bool_)}

    return core.gradient_treatment("gradnorm", coefficients_fn, aux_as_tasks=aux_as_tasks, init_state=init_state,
                                   scope="all")
