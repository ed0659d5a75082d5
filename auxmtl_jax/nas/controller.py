"""The Auxi-NAS controller: an LSTM that writes a genotype token by token (Nekrasov et al. 2019 style).

A genotype of a ``CellSpace`` is 5·n·T tokens (``Genotype.sequence``). The controller emits them autoregressively:
at position p a stacked LSTM (2 layers, 100 units by default, as Nekrasov et al.) reads a learned embedding of token
p-1 (one table per token kind: location, operation, aggregator; a learned start vector at p = 0) and a per-kind
linear head turns its output into logits over that kind's vocabulary.

Validity by construction: every position has a static set of valid choices (a location token of cell (t, i) may
only point at ``space.allowed_inputs(t, i)``, which follows the space's ``cross_task_inputs`` rule; ops and
aggregators at their vocabularies). Every other logit is set to -inf, so it has probability exactly 0 and every
sample is a valid genotype of the space.

One ``jax.lax.scan`` over positions serves every token: per-position metadata (token kind, previous token kind,
mask of valid choices) are static numpy arrays built from the space, the heads write into one padded vocabulary
of ``max(num_locations, len(OPERATIONS), len(AGGREGATORS))`` entries, and the step selects by kind. Shapes depend
only on the space, so ``sample`` and ``score`` are pure, jit-able and vmap-able (a batch is ``jax.vmap`` over keys
or token rows). ``sample`` is a pure function of its PRNG key; ``score`` re-scores given tokens by teacher forcing
and reproduces the sampled log-probability and entropy (what PPO's ratio needs).

The heads start near zero, so the untrained controller is close to uniform over the valid choices of every token
(the search starts by exploring).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auxmtl_jax.models.genotype import AGGREGATORS, OPERATIONS, TOKENS, CellSpace, Genotype

LOCATION, OPERATION, AGGREGATOR = 0, 1, 2
START = 3  # "previous kind" of position 0: the learned start input
KIND_OF_SLOT = dict(input_a=LOCATION, input_b=LOCATION, op_a=OPERATION, op_b=OPERATION, aggregator=AGGREGATOR)
# Small head weights: initial logits are ~0.03, so the first policy is close to uniform over the valid choices.
HEAD_INIT = nn.initializers.normal(stddev=0.01)


class TokenLayout(NamedTuple):
    """Static per-position metadata of a space's token sequence (numpy, shape [sequence_length] each)."""

    kinds: np.ndarray  # LOCATION / OPERATION / AGGREGATOR of the token at each position
    previous_kinds: np.ndarray  # kind of the token before it (START at position 0): which embedding table to read
    valid: np.ndarray  # bool [sequence_length, vocabulary_size]: the values each position may take
    num_choices: np.ndarray  # how many values each position may take (valid.sum(-1))
    vocabulary_size: int  # width of the padded logits: the largest vocabulary of any kind


@functools.lru_cache(maxsize=None)
def token_layout(space: CellSpace) -> TokenLayout:
    """The static metadata of every position (task-major, cells in order, five tokens per cell)."""
    vocabulary_size = max(space.num_locations, len(OPERATIONS), len(AGGREGATORS))
    kinds, valid = [], []
    for task_index in range(len(space.tasks)):
        for cell_index in range(space.cells_per_task):
            allowed = {LOCATION: space.allowed_inputs(task_index, cell_index), OPERATION: range(len(OPERATIONS)),
                       AGGREGATOR: range(len(AGGREGATORS))}
            for kind in (KIND_OF_SLOT[name] for name in TOKENS):
                kinds.append(kind)
                row = np.zeros(vocabulary_size, bool)
                row[list(allowed[kind])] = True
                valid.append(row)
    kinds_array = np.asarray(kinds, np.int32)
    previous_kinds = np.concatenate([np.asarray([START], np.int32), kinds_array[:-1]])
    valid_array = np.asarray(valid, bool).reshape(len(kinds), vocabulary_size)
    layout = TokenLayout(kinds_array, previous_kinds, valid_array, valid_array.sum(-1).astype(np.int32),
                         vocabulary_size)
    for array in layout[:4]:
        array.setflags(write=False)  # cached and shared: keep it immutable
    return layout


class SampleResult(NamedTuple):
    """One sampled architecture: its tokens, their total log-probability and the summed per-token entropy."""

    tokens: jax.Array  # int32 [sequence_length]
    log_prob: jax.Array  # float32 scalar
    entropy: jax.Array  # float32 scalar


class ControllerNetwork(nn.Module):
    """The LSTM policy's parameters and one step: previous token in, padded logits of the current kind out."""

    num_locations: int
    hidden_size: int = 100
    num_layers: int = 2
    embedding_size: int = 100

    def setup(self):
        self.location_embedding = nn.Embed(self.num_locations, self.embedding_size)
        self.operation_embedding = nn.Embed(len(OPERATIONS), self.embedding_size)
        self.aggregator_embedding = nn.Embed(len(AGGREGATORS), self.embedding_size)
        self.start = self.param("start", nn.initializers.normal(stddev=1.0), (self.embedding_size,))
        self.layers = [nn.OptimizedLSTMCell(self.hidden_size) for _ in range(self.num_layers)]
        self.location_head = nn.Dense(self.num_locations, kernel_init=HEAD_INIT)
        self.operation_head = nn.Dense(len(OPERATIONS), kernel_init=HEAD_INIT)
        self.aggregator_head = nn.Dense(len(AGGREGATORS), kernel_init=HEAD_INIT)

    def initial_carry(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Zero (cell, hidden) state of every layer, for one sequence."""
        zeros = jnp.zeros((self.hidden_size,), jnp.float32)
        return tuple((zeros, zeros) for _ in range(self.num_layers))

    def step(self, carry, previous_token, previous_kind, kind):
        """Advance the LSTM by the previous token; return (carry, logits [vocabulary_size]) for a token of ``kind``.

        Every table and head is evaluated and the right one selected, so the step is branch-free under scan/vmap.
        """
        inputs = jnp.stack([
            self.location_embedding(jnp.clip(previous_token, 0, self.num_locations - 1)),
            self.operation_embedding(jnp.clip(previous_token, 0, len(OPERATIONS) - 1)),
            self.aggregator_embedding(jnp.clip(previous_token, 0, len(AGGREGATORS) - 1)),
            self.start,
        ])[previous_kind]
        new_carry = []
        for layer, layer_carry in zip(self.layers, carry):
            layer_carry, inputs = layer(layer_carry, inputs)
            new_carry.append(layer_carry)
        width = max(self.num_locations, len(OPERATIONS), len(AGGREGATORS))
        heads = (self.location_head, self.operation_head, self.aggregator_head)
        logits = jnp.stack([jnp.pad(head(inputs), (0, width - head.features)) for head in heads])[kind]
        return tuple(new_carry), logits


@dataclasses.dataclass(frozen=True)
class Controller:
    """The controller of one search space: hashable (pass it as a static argument to ``jax.jit``)."""

    space: CellSpace
    hidden_size: int = 100
    num_layers: int = 2
    embedding_size: int = 100

    @property
    def network(self) -> ControllerNetwork:
        return ControllerNetwork(self.space.num_locations, self.hidden_size, self.num_layers, self.embedding_size)

    @property
    def layout(self) -> TokenLayout:
        return token_layout(self.space)

    def init(self, rng: jax.Array) -> Any:
        """Fresh controller parameters (a Flax variables dict)."""
        network = self.network
        carry = network.initial_carry()
        zero = jnp.zeros((), jnp.int32)
        return network.init(rng, carry, zero, zero, zero, method=ControllerNetwork.step)

    def sample(self, params: Any, key: jax.Array) -> SampleResult:
        """Draw one genotype's tokens; a pure function of ``key`` (same key, same tokens)."""
        keys = jax.random.split(key, self.space.sequence_length)
        tokens, token_log_probs, entropies, _ = self._rollout(params, keys, None)
        return SampleResult(tokens, token_log_probs.sum(), entropies.sum())

    def sample_batch(self, params: Any, key: jax.Array, count: int) -> SampleResult:
        """``count`` independent samples (vmapped over ``count`` keys split from ``key``)."""
        return jax.vmap(self.sample, in_axes=(None, 0))(params, jax.random.split(key, count))

    def score(self, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(log-probability, entropy) of given tokens under the controller (teacher forcing); as ``sample`` gives."""
        _, token_log_probs, entropies, _ = self._rollout(params, None, jnp.asarray(tokens, jnp.int32))
        return token_log_probs.sum(), entropies.sum()

    def log_prob_tables(self, params: Any, tokens: jax.Array) -> jax.Array:
        """float32 [sequence_length, vocabulary_size]: each position's masked log-probabilities given the tokens
        before it (-inf on invalid choices)."""
        return self._rollout(params, None, jnp.asarray(tokens, jnp.int32))[3]

    def genotype(self, tokens: Any) -> Genotype:
        """The validated Genotype of one token row (host side)."""
        return genotype_from_tokens(self.space, tokens)

    def _rollout(self, params, keys, forced_tokens):
        """Scan the positions, sampling (keys given) or teacher-forcing (forced_tokens given).

        Returns (tokens [L], chosen log-probs [L], entropies [L], log-prob tables [L, V]).
        """
        network, layout = self.network, self.layout
        sampling = forced_tokens is None
        per_position = (jnp.asarray(layout.kinds), jnp.asarray(layout.previous_kinds),
                        jnp.asarray(layout.valid), keys if sampling else forced_tokens)

        def body(state, inputs):
            carry, previous_token = state
            kind, previous_kind, valid, key_or_token = inputs
            carry, logits = network.apply(params, carry, previous_token, previous_kind, kind,
                                          method=ControllerNetwork.step)
            log_probs = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf))
            token = jax.random.categorical(key_or_token, log_probs) if sampling else key_or_token
            token = token.astype(jnp.int32)
            # 0 * -inf is NaN: zero the invalid entries' log-probabilities before weighting (also keeps grads finite).
            entropy = -jnp.sum(jnp.exp(log_probs) * jnp.where(valid, log_probs, 0.0))
            return (carry, token), (token, log_probs[token], entropy, log_probs)

        initial = (network.initial_carry(), jnp.zeros((), jnp.int32))
        _, outputs = jax.lax.scan(body, initial, per_position)
        return outputs


def init_controller_params(rng: jax.Array, controller: Controller) -> Any:
    """Fresh parameters of ``controller`` (same as ``controller.init``)."""
    return controller.init(rng)


def sample(params: Any, key: jax.Array, controller: Controller) -> SampleResult:
    """One sampled architecture (same as ``controller.sample``); jit with ``static_argnames='controller'``."""
    return controller.sample(params, key)


def score(params: Any, tokens: jax.Array, controller: Controller) -> tuple[jax.Array, jax.Array]:
    """(log_prob, entropy) of given tokens (same as ``controller.score``)."""
    return controller.score(params, tokens)


def genotype_from_tokens(space: CellSpace, tokens: Any) -> Genotype:
    """A controller's token row (any int array) as a validated Genotype."""
    row: Sequence[int] = [int(token) for token in np.asarray(tokens).reshape(-1)]
    return Genotype.from_sequence(space, row)

