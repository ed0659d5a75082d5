"""Auxiliary modules built from Auxi-NAS cells (space and genotype format: ``auxmtl_jax.models.genotype``).

``AuxiliaryCells`` is the aux module of one task. It has two builds with the same parameter names:

* static (``cells`` given): Python-int tokens, only the chosen operations exist; used to train a searched genotype.
* searchable (``cells=None``): the task's tokens come in at call time as an int array [n, 5], so ONE compiled
  function serves every genotype of the space. Inputs are picked with ``jax.lax.switch`` over the readable
  locations, operations and aggregators with ``flax.linen.switch`` over all of them (every candidate operation has
  parameters, so the static build's parameters are a subset), and the head weights each of the task's locations
  by whether a later cell of the task reads it. Under ``jax.vmap`` over genotypes the switches become selects.

Cross-task inputs: ``MultiTaskModel`` passes every cell of tasks 0..t-1 in (``earlier_cells``, in location order,
so token values are global location numbers); each call returns its own cells for the tasks after it. Which of
them a cell may read is the space's ``cross_task_inputs`` rule (``CellSpace.allowed_inputs``: under the paper's
rule, cell i reads cells 0..i-1 of earlier tasks); the searchable build switches over the allowed locations only.

Parameters of task t: ``stem_{stage}`` (1x1 conv + BN + ReLU to the cell width), ``cell{i}/path_a/{operation}``,
``cell{i}/path_b/{operation}``, ``cell{i}/aggregate/concat`` (concat's 1x1 conv + BN + ReLU back to the width) and
``head/from_{location}`` (one 3x3 kernel per location the head can read; together a 3x3 conv on their
concatenation), ``head/bn``, ``head/output``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from auxmtl_jax.models.auxiliary import OPERATIONS as OPERATION_FACTORIES
from auxmtl_jax.models.auxiliary import downsample_to
from auxmtl_jax.models.layers import ConvBN, batch_norm, conv2d, resize_bilinear, to_task_output
from auxmtl_jax.models.genotype import AGGREGATORS, OPERATIONS, Cell, CellSpace, output_locations

Dtype = Any


def bring_to_stage(x: jax.Array, from_stage: int, to_stage: int, shapes: Sequence[tuple[int, int]]) -> jax.Array:
    """Moves a feature from one stage's resolution to another's: down stage by stage (average pools, as the
    encoder's strides do, so the result equals the basic module's step-wise pooling), up by one bilinear resize."""
    if from_stage > to_stage:
        return resize_bilinear(x, *shapes[to_stage])
    for stage in range(from_stage + 1, to_stage + 1):
        x = downsample_to(x, *shapes[stage])
    return x


def _run_operation(module: CellPath, x: jax.Array, *, name: str, train: bool) -> jax.Array:
    return module.operations[name](x, train)


class CellPath(nn.Module):
    """One input path of a cell: an operation to the cell width; a fixed one, or any of ``OPERATIONS`` by index."""

    channels: int
    operation: str | None = None  # None: searchable, the index comes at call time
    dtype: Dtype = jnp.float32

    def setup(self):
        names = OPERATIONS if self.operation is None else (self.operation,)
        self.operations = {name: OPERATION_FACTORIES[name](self.channels, self.dtype, name) for name in names}

    def __call__(self, x: jax.Array, train: bool, index: jax.Array | None = None) -> jax.Array:
        if self.operation is not None:
            return self.operations[self.operation](x, train)
        branches = [functools.partial(_run_operation, name=name, train=train) for name in OPERATIONS]
        if self.is_initializing():
            for branch in branches:
                branch(self, x)
        return nn.switch(index, branches, self, x)


class CellAggregate(nn.Module):
    """``sum`` (a + b) or ``concat`` (1x1 conv + BN + ReLU of [a, b] back to the width); fixed or by index."""

    channels: int
    aggregator: str | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.aggregator != "sum":
            self.concat = ConvBN(self.channels, 1, dtype=self.dtype)

    def __call__(self, a: jax.Array, b: jax.Array, train: bool, index: jax.Array | None = None) -> jax.Array:
        def total(module, a, b):
            del module
            return a + b

        def concatenate(module, a, b):
            return module.concat(jnp.concatenate([a, b], axis=-1), train)

        if self.aggregator is not None:
            return (total if self.aggregator == "sum" else concatenate)(self, a, b)
        branches = [{"sum": total, "concat": concatenate}[name] for name in AGGREGATORS]
        if self.is_initializing():
            concatenate(self, a, b)
        return nn.switch(index, branches, self, a, b)


class AuxiliaryCell(nn.Module):
    """aggregator(op_a(input_a), op_b(input_b)); the inputs already at the cell's resolution."""

    channels: int
    cell: Cell | None = None  # static tokens; None: ``tokens`` at call time
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_a: jax.Array, input_b: jax.Array, train: bool,
                 tokens: jax.Array | None = None) -> jax.Array:
        static = self.cell is not None
        op_a, op_b = (OPERATIONS[self.cell[2]], OPERATIONS[self.cell[3]]) if static else (None, None)
        aggregator = AGGREGATORS[self.cell[4]] if static else None
        indices = (None, None, None) if static else (tokens[2], tokens[3], tokens[4])
        a = CellPath(self.channels, op_a, dtype=self.dtype, name="path_a")(input_a, train, indices[0])
        b = CellPath(self.channels, op_b, dtype=self.dtype, name="path_b")(input_b, train, indices[1])
        return CellAggregate(self.channels, aggregator, dtype=self.dtype, name="aggregate")(a, b, train, indices[2])


class CellHead(nn.Module):
    """3x3 conv of the concatenated inputs (one kernel per input, summed) + BN + ReLU, then a 1x1 conv."""

    out_channels: int
    hidden_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Mapping[str, jax.Array], weights: Mapping[str, jax.Array] | None,
                 train: bool) -> jax.Array:
        total = None
        for name, x in inputs.items():
            y = conv2d(self.hidden_channels, 3, dtype=self.dtype, name=f"from_{name}")(x)
            if weights is not None:
                y = y * weights[name].astype(y.dtype)
            total = y if total is None else total + y
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(total))
        return conv2d(self.out_channels, 1, use_bias=True, dtype=self.dtype, name="output")(x)


class AuxiliaryCells(nn.Module):
    """The aux module of task ``space.tasks[task_index]`` built from its cells; returns (prediction, own cells)."""

    task: str
    out_channels: int
    space: CellSpace
    task_index: int
    cells: tuple[Cell, ...] | None = None  # None: searchable, ``tokens`` [n, 5] at call time
    channels: int = 64
    dtype: Dtype = jnp.float32

    @property
    def searchable(self) -> bool:
        return self.cells is None

    @nn.compact
    def __call__(self, stages: Mapping[str, jax.Array], output_size: tuple[int, int], train: bool,
                 earlier_cells: Sequence[jax.Array] = (), tokens: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        space, num_stages = self.space, len(self.space.stages)
        if self.searchable == (tokens is None):
            raise ValueError(f"aux module of {self.task}: a searchable build takes the genotype's tokens, a static "
                             f"build none (searchable={self.searchable}, tokens given={tokens is not None})")
        if len(earlier_cells) != self.task_index * space.cells_per_task:
            raise ValueError(f"aux module of {self.task}: expected the {self.task_index * space.cells_per_task} cells "
                             f"of the tasks before it, got {len(earlier_cells)}")
        shapes = [stages[name].shape[1:3] for name in space.stages]
        locations = [ConvBN(self.channels, 1, dtype=self.dtype, name=f"stem_{name}")(stages[name].astype(self.dtype),
                                                                                   train)
                     for name in space.stages]
        locations += list(earlier_cells)
        for index in range(space.cells_per_task):
            target = space.cell_stage(index)
            cell_tokens = tokens[index] if self.searchable else self.cells[index]
            allowed = space.allowed_inputs(self.task_index, index)
            inputs = [self._input(locations, cell_tokens[slot], target, shapes, allowed) for slot in (0, 1)]
            cell = AuxiliaryCell(self.channels, None if self.searchable else cell_tokens, dtype=self.dtype,
                                 name=f"cell{index}")(*inputs, train, cell_tokens if self.searchable else None)
            locations.append(cell)
        deepest = num_stages - 1
        own = list(range(num_stages)) + [space.cell_location(self.task_index, index)
                                         for index in range(space.cells_per_task)]
        reads = own if self.searchable else output_locations(space, self.task_index, self.cells)
        # `locations` is indexed by global location number: stems, earlier tasks' cells, then this task's cells.
        head_inputs = {self._name(location): bring_to_stage(locations[location], space.location_stage(location),
                                                            deepest, shapes)
                       for location in reads}
        weights = None
        if self.searchable:
            read_by_cells = tokens[:, :2].reshape(-1)
            weights = {self._name(location): 1.0 - jnp.any(read_by_cells == location).astype(jnp.float32)
                       for location in reads}
        raw = CellHead(self.out_channels, self.channels, dtype=self.dtype, name="head")(head_inputs, weights, train)
        return to_task_output(self.task, raw, *output_size), tuple(locations[num_stages + len(earlier_cells):])

    def _name(self, location: int) -> str:
        name = self.space.location_name(location)
        return name if location < len(self.space.stages) else name.split(".", 1)[1]

    def _input(self, locations: list[jax.Array], token: Any, target: int, shapes: Sequence[tuple[int, int]],
               allowed: tuple[int, ...]) -> jax.Array:
        """The location a token names, brought to the cell's stage; when the token is traced, by ``lax.switch``
        over the locations the cell may read (a token outside them, which a valid genotype never has, reads the
        first of them)."""
        if isinstance(token, int):
            return bring_to_stage(locations[token], self.space.location_stage(token), target, shapes)
        branches = [functools.partial(bring_to_stage, locations[location], self.space.location_stage(location),
                                      target, shapes) for location in allowed]
        branch_of_location = np.zeros(len(locations), np.int32)
        branch_of_location[list(allowed)] = np.arange(len(allowed), dtype=np.int32)
        return jax.lax.switch(jnp.asarray(branch_of_location)[token], branches)
