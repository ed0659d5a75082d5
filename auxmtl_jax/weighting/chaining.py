"""`chain(loss_weighting, treatment)`: a loss weighting whose weighted tasks a gradient treatment then combines.

Like `optax.chain`, the chain's state is the tuple of its methods' states and its update runs them in order: the
loss weighting gives weights w (from the losses, its state, its learned parameters); the treatment then sees the
tasks w_t·L_t, whose shared gradients are w_t·g_t, so it gets the Gram matrix diag(w)·G·diag(w) and the losses
w·L, and returns c. The shared update is Σ_t c_t·w_t·g_t; a task-specific module gets its task's w_t·g_t (c_t·w_t·g_t
when the treatment scales every parameter). Kendall + PCGrad: PCGrad projects the uncertainty-weighted gradients.

At most one loss weighting, then at most one treatment: two loss weightings would be one product weighting with no
paper behind it, and a treatment returns one combined gradient, which leaves a second treatment nothing per task.
A single method is a chain of one, and runs exactly as it did alone.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from auxmtl_jax.weighting.base import LOSS, EmptyState, Method, Names, plain_sum


class ChainError(ValueError):
    """Methods that do not chain."""


class Coefficients(NamedTuple):
    """What a chain's update gives the backward pass."""

    loss: jax.Array  # weights of the task losses in the objective (and the logged total); differentiable in params
    shared: jax.Array  # coefficients of the task gradients in the shared update (gradient stopped); logged weights
    regulariser: jax.Array | None  # added to the objective; None without a loss weighting


class ChainState(NamedTuple):
    weighting: Any
    treatment: Any


class Chain(NamedTuple):
    """A loss weighting and / or a gradient treatment (see the module docstring); `chain(...)` builds one."""

    weighting: Method | None
    treatment: Method | None

    @property
    def methods(self) -> tuple[Method, ...]:
        return tuple(method for method in self if method is not None)

    @property
    def name(self) -> str:
        return "+".join(method.name for method in self.methods)

    def init(self, names: Names) -> ChainState:
        return ChainState(*(method.init(names) if method else EmptyState() for method in self))

    def init_params(self, names: Names) -> dict:
        return self.weighting.init_params(names) if self.weighting else {}

    def update(self, losses: jax.Array, gram: jax.Array | None, state: ChainState, rng: jax.Array, params: dict,
               names: tuple[str, ...]) -> tuple[Coefficients, ChainState]:
        """The coefficients of this step. A lone method gets `rng` itself; a chain splits it between the two."""
        weighting, treatment = self
        if weighting is None:
            c, treatment_state = treatment.update(losses, gram, state.treatment, rng, params, names)
            c = jax.lax.stop_gradient(c)
            return (Coefficients(c if treatment.scope == "all" else jnp.ones_like(c), c, None),
                    state._replace(treatment=treatment_state))
        if treatment is not None:
            rng, treatment_rng = jax.random.split(rng)
        weights, weighting_state = weighting.update(losses, None, state.weighting, rng, params, names)
        regulariser = weighting.regulariser(params, names) if weighting.regulariser else jnp.zeros(())
        state = state._replace(weighting=weighting_state)
        if treatment is None:
            return Coefficients(weights, weights, regulariser), state
        fixed = jax.lax.stop_gradient(weights)
        c, treatment_state = treatment.update(fixed * losses, None if gram is None else jnp.outer(fixed, fixed) * gram,
                                              state.treatment, treatment_rng, params, names)
        c = jax.lax.stop_gradient(c)
        return (Coefficients(weights * c if treatment.scope == "all" else weights, fixed * c, regulariser),
                state._replace(treatment=treatment_state))

    def after_update(self, state: ChainState, losses: jax.Array) -> ChainState:
        return ChainState(*(method.after_update(part, losses) if method and method.after_update else part
                            for method, part in zip(self, state)))

    @property
    def has_after_update(self) -> bool:
        return any(method.after_update for method in self.methods)

    def main_objective(self, params: dict, losses: Mapping[str, jax.Array]) -> jax.Array:
        """The main-task objective the network's gradient follows: the loss weighting's when its weights are
        learned (Kendall's weighted sum), else the plain sum of `losses` ({task: loss})."""
        if self.weighting is not None and self.weighting.main_objective is not None:
            return self.weighting.main_objective(params, losses)
        return plain_sum(losses)


def chain(*methods: Method) -> Chain:
    """At most one loss weighting followed by at most one gradient treatment (see the module docstring)."""
    given = " + ".join(method.name for method in methods) or "nothing"
    first, last = (methods[0], methods[-1]) if methods else (None, None)
    if (not methods or len(methods) > 2 or any(method.kind == LOSS for method in methods[1:])
            or (len(methods) == 2 and first.kind != LOSS)):
        raise ChainError(f"cannot chain {given}; expected one loss weighting, one gradient treatment, or a loss "
                         "weighting then a gradient treatment (kendall+pcgrad).")
    return Chain(first if first.kind == LOSS else None, last if last.kind != LOSS else None)


def state_tree(chain_: Chain, state: ChainState) -> dict:
    """The state as `TrainState.weighting_state` keeps it: a lone method's fields as a dict (the layout checkpoints
    of single-method runs have), a chain's as {method: fields} of its methods that keep a state."""
    parts = [(method.name, part) for method, part in zip(chain_, state) if method is not None]
    if len(parts) == 1:
        return parts[0][1]._asdict()
    return {name: part._asdict() for name, part in parts if part._fields}


def typed_state(chain_: Chain, names: Names, tree: Mapping[str, Any]) -> ChainState:
    """`state_tree`'s inverse: the methods' NamedTuple states (their types from `init`, no arrays made)."""
    template = jax.eval_shape(lambda: chain_.init(names))
    present = [(method, type(part)) for method, part in zip(chain_, template)]
    lone = len(chain_.methods) == 1

    def part(method: Method | None, kind: type) -> Any:
        if method is None or not kind._fields:
            return kind()
        return kind(**(tree if lone else tree[method.name]))

    return ChainState(*(part(method, kind) for method, kind in present))
