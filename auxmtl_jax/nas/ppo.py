"""PPO for the Auxi-NAS controller, with a moving-average reward baseline and a rollout buffer (Nekrasov et al.).

The search is a one-step bandit: an action is a whole architecture (the controller's token sequence), its reward
comes from training and validating that architecture. No value network: the advantage of a buffered architecture
is its reward minus an exponential moving average of every reward seen (decay 0.95, initialised by the first).

``update`` takes the rewards of newly evaluated architectures with the log-probabilities they had when sampled:

1. folds the rewards into the baseline, one by one in order;
2. writes them into a fixed-capacity ring buffer (the most recent ``buffer_size`` architectures);
3. runs ``epochs`` passes over the filled part of the buffer in key-shuffled minibatches, one Adam step (after
   global-norm clipping) each on the clipped surrogate, advantages = buffered reward - current baseline.

Unlike Nekrasov et al.'s buffer (zeros until it fills), the unfilled part is masked out: minibatch entries beyond
the fill are ignored, and a minibatch with none left is no step at all. Everything has static shapes, so the
whole update is one jitted function of (state, new samples, key): deterministic, and ``PPOState`` is a plain pytree
that orbax checkpoints like any train state.

Defaults (``PPOConfig``) follow Nekrasov et al. where they have one: Adam 1e-4, clip 0.1, baseline decay 0.95,
buffer 100, one epoch of single-architecture minibatches (their 100 minibatches of a 100-entry buffer), gradient
norm 2.0. Their entropy coefficient is 0; ours is 1e-4, a small bonus against an early collapse of the policy:
the per-architecture entropy is a sum over tokens (about 100 nats at the start for the three-task, four-stage
space), so the bonus is worth about 0.01 in the loss, below the advantages it competes with (rewards are
validation metrics in [0, 1] whose differences between architectures are a few hundredths).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from auxmtl_jax.nas.controller import Controller


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Controller-training hyper-parameters; hashable (a static argument of the jitted ``update``)."""

    learning_rate: float = 1e-4  # Adam, as Nekrasov et al.
    clip_epsilon: float = 0.1  # ratio clip of the surrogate, as Nekrasov et al.
    entropy_weight: float = 1e-4  # bonus on the mean per-architecture entropy (Nekrasov et al.: 0); see module doc
    baseline_decay: float = 0.95  # moving-average reward baseline; the first reward initialises it
    epochs: int = 1  # passes over the buffer per update, as Nekrasov et al.
    buffer_size: int = 100  # the most recent architectures kept for PPO, as Nekrasov et al.
    minibatch_size: int = 1  # architectures per Adam step; 1 = Nekrasov et al. (buffer_size minibatches per epoch)
    max_grad_norm: float = 2.0  # global-norm gradient clipping, as Nekrasov et al.

    def __post_init__(self):
        if self.buffer_size < 1 or self.minibatch_size < 1 or self.epochs < 1:
            raise ValueError(f"PPOConfig: buffer_size, minibatch_size and epochs must be >= 1, got {self}")

    @property
    def minibatches_per_epoch(self) -> int:
        return math.ceil(self.buffer_size / self.minibatch_size)

    def optimizer(self) -> optax.GradientTransformation:
        """Global-norm clipping, then Adam."""
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), optax.adam(self.learning_rate))


class PPOState(flax.struct.PyTreeNode):
    """Everything the search's controller side needs to resume: params, optimiser, baseline and the buffer."""

    params: Any
    opt_state: Any
    baseline: jax.Array  # float32 scalar; NaN until the first reward
    buffer_tokens: jax.Array  # int32 [buffer_size, sequence_length]
    buffer_log_probs: jax.Array  # float32 [buffer_size]: log-probability when sampled (PPO's "old" policy)
    buffer_rewards: jax.Array  # float32 [buffer_size]
    buffer_count: jax.Array  # int32: filled entries (0..buffer_size); the filled part is the prefix
    buffer_position: jax.Array  # int32: the next entry to overwrite
    updates: jax.Array  # int32: calls of ``update`` so far


def init_ppo_state(params: Any, config: PPOConfig, controller: Controller) -> PPOState:
    """A fresh state around controller params: empty buffer, no baseline yet."""
    length = controller.space.sequence_length
    return PPOState(params=params, opt_state=config.optimizer().init(params),
                    baseline=jnp.asarray(jnp.nan, jnp.float32),
                    buffer_tokens=jnp.zeros((config.buffer_size, length), jnp.int32),
                    buffer_log_probs=jnp.zeros((config.buffer_size,), jnp.float32),
                    buffer_rewards=jnp.zeros((config.buffer_size,), jnp.float32),
                    buffer_count=jnp.zeros((), jnp.int32), buffer_position=jnp.zeros((), jnp.int32),
                    updates=jnp.zeros((), jnp.int32))


def clipped_surrogate(new_log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
                      clip_epsilon: float) -> jax.Array:
    """Per-sample PPO objective (to maximise): min(r·A, clip(r, 1-ε, 1+ε)·A), r = exp(new - old)."""
    ratio = jnp.exp(new_log_probs - old_log_probs)
    return jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages)


def ppo_loss(params: Any, tokens: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, *,
             controller: Controller, clip_epsilon: float, entropy_weight: float,
             mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-mean(clipped surrogate) - entropy_weight·mean(entropy) over the architectures ``tokens`` [N, L].

    ``mask`` [N] (bool) drops padding entries from every mean; aux holds the surrogate, entropy, the fraction of
    clipped ratios and an estimate of KL(old || new).
    """
    new_log_probs, entropies = jax.vmap(controller.score, in_axes=(None, 0))(params, tokens)
    mask = jnp.ones(new_log_probs.shape, bool) if mask is None else mask
    count = jnp.maximum(mask.sum(), 1)

    def masked_mean(values):
        return jnp.sum(jnp.where(mask, values, 0.0)) / count

    surrogate = masked_mean(clipped_surrogate(new_log_probs, old_log_probs, advantages, clip_epsilon))
    entropy = masked_mean(entropies)
    ratio = jnp.exp(new_log_probs - old_log_probs)
    aux = {"surrogate": surrogate, "entropy": entropy,
           "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip_epsilon).astype(jnp.float32)),
           "approx_kl": masked_mean(old_log_probs - new_log_probs)}
    return -surrogate - entropy_weight * entropy, aux


def update_baseline(baseline: jax.Array, rewards: jax.Array, decay: float) -> jax.Array:
    """Fold rewards into the moving average in order; a NaN baseline (none yet) becomes the first reward."""
    def fold(current, reward):
        return jnp.where(jnp.isnan(current), reward, decay * current + (1.0 - decay) * reward), None

    return jax.lax.scan(fold, jnp.asarray(baseline, jnp.float32), jnp.asarray(rewards, jnp.float32))[0]


@functools.partial(jax.jit, static_argnames=("config", "controller"))
def update(state: PPOState, tokens: jax.Array, log_probs: jax.Array, rewards: jax.Array, key: jax.Array,
           config: PPOConfig, controller: Controller) -> tuple[PPOState, dict[str, jax.Array]]:
    """Baseline, buffer, then ``config.epochs`` shuffled passes of PPO steps; see the module docstring.

    tokens int32 [N, L], log_probs [N] (when sampled), rewards [N], N <= buffer_size. Deterministic in ``key``.
    """
    count_new = tokens.shape[0]
    capacity = config.buffer_size
    if count_new > capacity:
        raise ValueError(f"update: {count_new} new architectures do not fit a buffer of {capacity}")
    rewards = jnp.asarray(rewards, jnp.float32)
    baseline = update_baseline(state.baseline, rewards, config.baseline_decay)
    slots = (state.buffer_position + jnp.arange(count_new)) % capacity
    buffer_tokens = state.buffer_tokens.at[slots].set(jnp.asarray(tokens, jnp.int32))
    buffer_log_probs = state.buffer_log_probs.at[slots].set(jnp.asarray(log_probs, jnp.float32))
    buffer_rewards = state.buffer_rewards.at[slots].set(rewards)
    buffer_count = jnp.minimum(state.buffer_count + count_new, capacity)
    filled = jnp.arange(capacity) < buffer_count
    advantages = buffer_rewards - baseline

    per_epoch, size = config.minibatches_per_epoch, config.minibatch_size
    padding = per_epoch * size - capacity

    def epoch_order(epoch_key):
        """A random order of the filled entries first, unfilled (and padding) after; [per_epoch, size] each."""
        priority = jnp.where(filled, jax.random.uniform(epoch_key, (capacity,)), 2.0)
        order = jnp.concatenate([jnp.argsort(priority), jnp.zeros((padding,), jnp.int32)])
        used = jnp.arange(per_epoch * size) < buffer_count
        return order.reshape(per_epoch, size), used.reshape(per_epoch, size)

    orders, useds = jax.vmap(epoch_order)(jax.random.split(key, config.epochs))
    orders, useds = orders.reshape(-1, size), useds.reshape(-1, size)
    optimizer = config.optimizer()
    loss_fn = functools.partial(ppo_loss, controller=controller, clip_epsilon=config.clip_epsilon,
                                entropy_weight=config.entropy_weight)

    def train_step(carry, minibatch):
        params, opt_state = carry
        indices, used = minibatch
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, buffer_tokens[indices], buffer_log_probs[indices], advantages[indices], mask=used)
        changes, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, changes)
        active = used.any()
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(active, new, old))
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
        return (keep(new_params, params), keep(new_opt_state, opt_state)), (active, metrics)

    (params, opt_state), (active, step_metrics) = jax.lax.scan(train_step, (state.params, state.opt_state),
                                                                 (orders, useds))
    steps = active.sum()
    metrics = {name: jnp.sum(jnp.where(active, values, 0.0)) / jnp.maximum(steps, 1)
               for name, values in step_metrics.items()}
    metrics.update(baseline=baseline, reward_mean=rewards.mean(), reward_max=rewards.max(),
                   advantage_mean=jnp.sum(jnp.where(filled, advantages, 0.0)) / jnp.maximum(buffer_count, 1),
                   buffer_count=buffer_count, optimizer_steps=steps)
    new_state = PPOState(params=params, opt_state=opt_state, baseline=baseline, buffer_tokens=buffer_tokens,
                         buffer_log_probs=buffer_log_probs, buffer_rewards=buffer_rewards, buffer_count=buffer_count,
                         buffer_position=(state.buffer_position + count_new) % capacity, updates=state.updates + 1)
    return new_state, metrics
