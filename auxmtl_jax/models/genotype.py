"""The Auxi-NAS search space (paper Sec. 3.2, Fig. 2) and its genotype format: cells as data.

A genotype describes the auxiliary modules of T tasks reading P encoder stages. Every task has ``n`` cells
(the search space uses n = P); cell i of task t is five tokens

    input_a, input_b, op_a, op_b, aggregator        cell = aggregator(op_a(loc[input_a]), op_b(loc[input_b]))

so the whole genotype is a sequence of 5·n·T integers (``Genotype.sequence``), task-major, cells in order.

Locations (``loc``) are numbered globally. 0..P-1 are the encoder stages (each task reads them through its own
1x1 conv + BN + ReLU stem to the cell width). Cell i of task t is location P + t·n + i. Which locations cell i
(0-based) of task t may read is the space's ``cross_task_inputs`` rule:

* ``"paper"`` (the default; paper Sec. 3.2: cell p of task t may take "the output from task 1 to task t−1 in
  the first p−1 cells", p and t counted from 1): the stages, its own cells 0..i-1 and cells 0..i-1 of tasks
  0..t-1. So a task's first cell reads stages only, and no task reads another task's last cell.
* ``"all_cells"`` (ours, the only rule before issue 30; wider than the paper's): the stages, its own cells 0..i-1
  and *every* cell of tasks 0..t-1, i.e. every location generated before it.

A genotype records the rule of its space and is validated against it. A JSON file without the key was written
under ``all_cells`` (every file before the rule was recorded) and loads as such, with a logged note.

Resolution: cell i works at the resolution of stage ``cell_stage(i) = max(0, P - n + i)``; with n = P cell i
sits on stage i, so the cells follow the encoder's hierarchy and the last one sits on the deepest stage. An input
finer than the cell is average-pooled down stage by stage (as the encoder's strides do), a coarser one is
bilinearly upsampled to the cell. The rule depends on the cell index only, never on the genotype, so every
genotype of a space has the same shapes and one compiled function serves them all.

Output: the aux module of task t predicts from every location of its own (its P stems and its n cells) that no
later cell of task t reads (Nekrasov et al.: unused cells are concatenated), brought down to the deepest stage,
concatenated, then a 3x3 conv + BN + ReLU and a 1x1 conv. Stems count too, so nothing a task computes is dead.

The paper's basic module (Eq. 2, 1x1 adaptors = the stems) is a genotype of this space (``basic_genotype``):
with ``concat`` it is the genotype with no cells (the head reads every stem); with ``sum`` it is P-1 cells
``(previous, stage p, skip, skip, sum)`` along the hierarchy.

JSON file (``Genotype.save`` / ``load_genotype``); the token integers index the file's own vocabularies::

    {"format": "auxmtl_jax.genotype/1",
     "operations": ["sep_conv3x3", "conv1x1", "sep_conv3x3_dil3", "sep_conv3x3_dil6", "skip", "deform_conv3x3"],
     "aggregators": ["sum", "concat"], "cross_task_inputs": "paper",
     "tasks": ["segmentation", "depth"], "stages": ["stage2", "stage3", "stage4", "stage5"],
     "cells": {"segmentation": [[0, 1, 1, 4, 0], ...], "depth": [...]}}

``random_genotype(space, seed)`` draws a genotype uniformly from a space (``python -m auxmtl_jax.nas.random_genotypes``
writes them as files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from auxmtl_jax.errors import UserError
from auxmtl_jax.tasks import TASK_NAMES

FORMAT = "auxmtl_jax.genotype/1"
# The adaptor operations of the search space (paper Sec. 3.2) and the two aggregators; every one outputs the
# cell width at the cell's resolution.
OPERATIONS = ("sep_conv3x3", "conv1x1", "sep_conv3x3_dil3", "sep_conv3x3_dil6", "skip", "deform_conv3x3")
AGGREGATORS = ("sum", "concat")
TOKENS = ("input_a", "input_b", "op_a", "op_b", "aggregator")
# Which cells of earlier tasks a cell may read (module docstring): the paper's rule (Sec. 3.2) and ours (wider).
CROSS_TASK_INPUTS = ("paper", "all_cells")
# The rule of a genotype file that names none: every file written before the rule was recorded was searched or
# written under the wide rule.
UNRECORDED_CROSS_TASK_INPUTS = "all_cells"

log = logging.getLogger("auxmtl_jax")
_NOTED_SOURCES: set[str] = set()

Cell = tuple[int, int, int, int, int]


class GenotypeError(UserError):
    """A genotype that is malformed or does not fit the model; the message names the file, cell and token."""


@dataclasses.dataclass(frozen=True)
class CellSpace:
    """The shape of a search space: which tasks (in location order), which stages, how many cells per task."""

    tasks: tuple[str, ...]
    stages: tuple[str, ...]
    cells_per_task: int
    cross_task_inputs: str = "paper"  # one of CROSS_TASK_INPUTS

    def __post_init__(self):
        check_cross_task_inputs(self.cross_task_inputs, "cross_task_inputs")

    @property
    def num_locations(self) -> int:
        """Stages plus every cell of every task."""
        return len(self.stages) + len(self.tasks) * self.cells_per_task

    @property
    def sequence_length(self) -> int:
        """Tokens in a genotype of this space: 5·n·T."""
        return len(TOKENS) * self.cells_per_task * len(self.tasks)

    def cell_location(self, task_index: int, cell_index: int) -> int:
        """The global location number of a cell."""
        return len(self.stages) + task_index * self.cells_per_task + cell_index

    def allowed_inputs(self, task_index: int, cell_index: int) -> tuple[int, ...]:
        """The locations (ascending) cell ``cell_index`` of task ``task_index`` may read under the space's rule:
        the stages, its own earlier cells, and of each earlier task its cells ``0..cell_index-1`` ("paper") or all
        of them ("all_cells")."""
        earlier = self.cells_per_task if self.cross_task_inputs == "all_cells" else cell_index
        return (tuple(range(len(self.stages)))
                + tuple(self.cell_location(task, index) for task in range(task_index) for index in range(earlier))
                + tuple(self.cell_location(task_index, index) for index in range(cell_index)))

    @property
    def num_genotypes(self) -> int:
        """How many genotypes the space holds: the product of every token's number of allowed choices."""
        choices = [len(self.allowed_inputs(task, cell)) ** 2 * len(OPERATIONS) ** 2 * len(AGGREGATORS)
                   for task in range(len(self.tasks)) for cell in range(self.cells_per_task)]
        return math.prod(choices)

    def cell_stage(self, cell_index: int) -> int:
        """Index of the stage whose resolution the cell works at (the cells follow the encoder hierarchy)."""
        return max(0, len(self.stages) - self.cells_per_task + cell_index)

    def location_stage(self, location: int) -> int:
        """Index of the stage whose resolution a location has."""
        if location < len(self.stages):
            return location
        return self.cell_stage((location - len(self.stages)) % self.cells_per_task)

    def location_name(self, location: int) -> str:
        """'stage3' for a stage, 'depth.cell2' for cell 2 of depth."""
        if location < len(self.stages):
            return self.stages[location]
        task_index, cell_index = divmod(location - len(self.stages), self.cells_per_task)
        return f"{self.tasks[task_index]}.cell{cell_index}"

    def check_fits(self, *, tasks: Sequence[str], stages: Sequence[str], source: str = "genotype") -> None:
        """Refuse a genotype whose tasks are not main tasks of the model or whose stages the encoder does not sow."""
        foreign_tasks = [task for task in self.tasks if task not in tasks]
        if foreign_tasks:
            raise GenotypeError(f"{source}: task(s) {foreign_tasks} are not main tasks of this model {tuple(tasks)}")
        foreign_stages = [stage for stage in self.stages if stage not in stages]
        if foreign_stages:
            raise GenotypeError(f"{source}: stage(s) {foreign_stages} are not sown by this encoder; it sows "
                                f"{tuple(stages)}")
        order = [stages.index(stage) for stage in self.stages]
        if order != sorted(order):
            raise GenotypeError(f"{source}: stages {list(self.stages)} must be listed shallow to deep, as the "
                                f"encoder sows them {tuple(stages)}")


@dataclasses.dataclass(frozen=True)
class Genotype:
    """Validated auxiliary cells for every task; tokens use this module's ``OPERATIONS`` / ``AGGREGATORS``."""

    tasks: tuple[str, ...]
    stages: tuple[str, ...]
    cells: tuple[tuple[Cell, ...], ...]  # [task][cell] -> (input_a, input_b, op_a, op_b, aggregator)
    cross_task_inputs: str = "paper"  # the rule of its space (CROSS_TASK_INPUTS); validated against it

    def __post_init__(self):
        validate_cells(self.tasks, self.stages, self.cells, source="Genotype",
                       cross_task_inputs=self.cross_task_inputs)

    @property
    def space(self) -> CellSpace:
        return CellSpace(self.tasks, self.stages, len(self.cells[0]) if self.cells else 0, self.cross_task_inputs)

    def under_rule(self, cross_task_inputs: str) -> Genotype:
        """The same cells as a genotype of the space with rule ``cross_task_inputs``; a GenotypeError naming the
        first cell that rule forbids (so ``g.under_rule("paper")`` checks a genotype against the paper's rule)."""
        return dataclasses.replace(self, cross_task_inputs=cross_task_inputs)

    def task_cells(self, task: str) -> tuple[Cell, ...]:
        return self.cells[self.tasks.index(task)]

    def as_array(self) -> np.ndarray:
        """int32 [T, n, 5]: the form a traced (searchable) aux module takes as data."""
        return np.asarray(self.cells, np.int32).reshape(len(self.tasks), self.space.cells_per_task, len(TOKENS))

    def sequence(self) -> tuple[int, ...]:
        """The flat 5·n·T token sequence (task-major, cells in order), as the controller emits it."""
        return tuple(int(token) for token in self.as_array().reshape(-1))

    @classmethod
    def from_sequence(cls, space: CellSpace, tokens: Sequence[int]) -> Genotype:
        """Inverse of ``sequence`` for a given space (validated)."""
        if len(tokens) != space.sequence_length:
            raise GenotypeError(f"token sequence: expected {space.sequence_length} tokens (5 x {space.cells_per_task} "
                                f"cells x {len(space.tasks)} tasks), got {len(tokens)}")
        array = np.asarray(tokens, np.int64).reshape(len(space.tasks), space.cells_per_task, len(TOKENS))
        return cls(space.tasks, space.stages, _cells_from_array(array), space.cross_task_inputs)

    @classmethod
    def from_array(cls, space: CellSpace, array: Any) -> Genotype:
        """Inverse of ``as_array`` for a given space (validated)."""
        array = np.asarray(array)
        expected = (len(space.tasks), space.cells_per_task, len(TOKENS))
        if array.shape != expected:
            raise GenotypeError(f"genotype array: expected shape {expected}, got {array.shape}")
        return cls(space.tasks, space.stages, _cells_from_array(array), space.cross_task_inputs)

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "operations": list(OPERATIONS), "aggregators": list(AGGREGATORS),
                "cross_task_inputs": self.cross_task_inputs, "tasks": list(self.tasks), "stages": list(self.stages),
                "cells": {task: [list(cell) for cell in cells] for task, cells in zip(self.tasks, self.cells)}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(self.to_json_dict(), stream, indent=1)
                stream.write("\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

def _cells_from_array(array: np.ndarray) -> tuple[tuple[Cell, ...], ...]:
    return tuple(tuple(tuple(int(token) for token in cell) for cell in cells) for cells in array)


def check_cross_task_inputs(rule: Any, what: str) -> None:
    """One GenotypeError unless ``rule`` is one of ``CROSS_TASK_INPUTS``; ``what`` names where it came from."""
    if not isinstance(rule, str) or rule not in CROSS_TASK_INPUTS:
        raise GenotypeError(f"{what}={rule!r}; expected one of {CROSS_TASK_INPUTS} ('paper': Sec. 3.2, cell i of a "
                            f"task reads cells 0..i-1 of earlier tasks; 'all_cells': ours, every cell of them)")


def _ranges(locations: Sequence[int]) -> str:
    """'0..4, 8, 12..13' for (0, 1, 2, 3, 4, 8, 12, 13)."""
    runs: list[list[int]] = []
    for location in locations:
        if runs and location == runs[-1][1] + 1:
            runs[-1][1] = location
        else:
            runs.append([location, location])
    return ", ".join(str(first) if first == last else f"{first}..{last}" for first, last in runs)


def validate_cells(tasks: Sequence[str], stages: Sequence[str], cells: Sequence[Sequence[Sequence[int]]], *,
                   source: str, cross_task_inputs: str = "paper") -> None:
    """One GenotypeError for the first problem: names the source, the task's cell and the token."""
    check_cross_task_inputs(cross_task_inputs, f"{source}: cross_task_inputs")
    if not isinstance(tasks, tuple) or not tasks or any(task not in TASK_NAMES for task in tasks):
        raise GenotypeError(f"{source}: tasks must be a non-empty list of {TASK_NAMES}, got {list(tasks)}")
    if len(set(tasks)) != len(tasks):
        raise GenotypeError(f"{source}: tasks {list(tasks)} repeat a task")
    if (not isinstance(stages, tuple) or not stages or any(not isinstance(stage, str) for stage in stages)
            or len(set(stages)) != len(stages)):
        raise GenotypeError(f"{source}: stages must be a non-empty list of distinct stage names, got {stages!r}")
    if len(cells) != len(tasks):
        raise GenotypeError(f"{source}: cells for {len(cells)} task(s), but {len(tasks)} task(s) {list(tasks)}")
    counts = {task: len(task_cells) for task, task_cells in zip(tasks, cells)}
    if len(set(counts.values())) > 1:
        raise GenotypeError(f"{source}: every task needs the same number of cells, got {counts}")
    space = CellSpace(tuple(tasks), tuple(stages), len(cells[0]), cross_task_inputs)
    for task_index, (task, task_cells) in enumerate(zip(tasks, cells)):
        for cell_index, cell in enumerate(task_cells):
            where = f"{source}: cells[{task!r}][{cell_index}]"
            _check_cell_shape(cell, where)
            allowed = space.allowed_inputs(task_index, cell_index)
            for token_name, location in zip(TOKENS[:2], cell[:2]):
                if location not in allowed:
                    generated = 0 <= location < space.cell_location(task_index, cell_index)
                    problem = (f"{space.location_name(location)} is a cell of an earlier task that "
                               f"cross_task_inputs={cross_task_inputs!r} forbids here (Sec. 3.2: cell i of a task "
                               f"reads only cells 0..i-1 of earlier tasks)" if generated
                               else "points at a location not generated yet")
                    names = ", ".join(f"{index}={space.location_name(index)}" for index in allowed)
                    raise GenotypeError(f"{where} {token_name}={location}: {problem}; this cell may read locations "
                                        f"{_ranges(allowed)} ({names})")
            for token_name, token in zip(TOKENS[2:4], cell[2:4]):
                if not 0 <= token < len(OPERATIONS):
                    raise GenotypeError(f"{where} {token_name}={token}: unknown operation; expected "
                                        f"0..{len(OPERATIONS) - 1} {list(OPERATIONS)}")
            if not 0 <= cell[4] < len(AGGREGATORS):
                raise GenotypeError(f"{where} aggregator={cell[4]}: unknown aggregator; expected "
                                    f"0..{len(AGGREGATORS) - 1} {list(AGGREGATORS)}")


def _check_cell_shape(cell: Any, where: str) -> None:
    """A cell is exactly five integers (booleans are not integers here)."""
    if isinstance(cell, (str, bytes)) or not isinstance(cell, Sequence) or len(cell) != len(TOKENS):
        raise GenotypeError(f"{where}: expected {len(TOKENS)} integers {list(TOKENS)}, got {cell!r}")
    for token_name, token in zip(TOKENS, cell):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise GenotypeError(f"{where} {token_name}: expected an integer, got {token!r}")


def genotype_from_json_dict(data: Any, *, source: str = "genotype") -> Genotype:
    """Validate a parsed JSON genotype, translating the file's vocabularies to ``OPERATIONS`` / ``AGGREGATORS``."""
    if not isinstance(data, Mapping):
        raise GenotypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
    required = ("format", "operations", "aggregators", "tasks", "stages", "cells")
    missing = [key for key in required if key not in data]
    unknown = [key for key in data if key not in required and key != "cross_task_inputs"]
    if missing or unknown:
        raise GenotypeError(f"{source}: missing key(s) {missing} / unknown key(s) {unknown}; expected exactly "
                            f"{list(required)} and optionally 'cross_task_inputs'")
    rule = data.get("cross_task_inputs", UNRECORDED_CROSS_TASK_INPUTS)
    check_cross_task_inputs(rule, f"{source}: cross_task_inputs")
    if "cross_task_inputs" not in data and source not in _NOTED_SOURCES:
        _NOTED_SOURCES.add(source)
        log.warning("%s names no cross_task_inputs rule: read as %r (every cell of earlier tasks), the rule every "
                    "genotype written before the rule was recorded was made under; the paper's rule (Sec. 3.2) is "
                    "'paper'", source, UNRECORDED_CROSS_TASK_INPUTS)
    if data["format"] != FORMAT:
        raise GenotypeError(f"{source}: format {data['format']!r}; expected {FORMAT!r}")
    op_map = _vocabulary_map(data["operations"], OPERATIONS, "operations", source)
    aggregator_map = _vocabulary_map(data["aggregators"], AGGREGATORS, "aggregators", source)
    tasks, stages, cells = data["tasks"], data["stages"], data["cells"]
    if not isinstance(tasks, list) or not isinstance(stages, list):
        raise GenotypeError(f"{source}: tasks and stages must be lists, got {tasks!r} and {stages!r}")
    if not isinstance(cells, Mapping) or list(cells) != list(tasks):
        listed = list(cells) if isinstance(cells, Mapping) else type(cells).__name__
        raise GenotypeError(f"{source}: cells must be an object with one entry per task, in the order of tasks "
                            f"{tasks}; got {listed}")
    raw = [cells[task] if isinstance(cells[task], list) else None for task in tasks]
    for task, task_cells in zip(tasks, raw):
        if task_cells is None:
            raise GenotypeError(f"{source}: cells[{task!r}] must be a list of cells, got {cells[task]!r}")
    # Structure first, operation/aggregator tokens against the file's own lists; locations are checked last.
    translated = []
    for task, task_cells in zip(tasks, raw):
        rows = []
        for cell_index, cell in enumerate(task_cells):
            where = f"{source}: cells[{task!r}][{cell_index}]"
            _check_cell_shape(cell, where)
            rows.append((cell[0], cell[1], _translate(cell[2], op_map, data["operations"], where, "op_a"),
                         _translate(cell[3], op_map, data["operations"], where, "op_b"),
                         _translate(cell[4], aggregator_map, data["aggregators"], where, "aggregator")))
        translated.append(tuple(rows))
    validate_cells(tuple(tasks), tuple(stages), translated, source=source, cross_task_inputs=rule)
    return Genotype(tuple(tasks), tuple(stages), tuple(translated), rule)


def _vocabulary_map(names: Any, known: tuple[str, ...], key: str, source: str) -> list[int]:
    if not isinstance(names, list) or not names or any(not isinstance(name, str) for name in names):
        raise GenotypeError(f"{source}: {key} must be a non-empty list of names from {list(known)}, got {names!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise GenotypeError(f"{source}: {key} {unknown} unknown; this space has {list(known)}")
    return [known.index(name) for name in names]


def _translate(token: int, mapping: list[int], names: list[str], where: str, token_name: str) -> int:
    if not 0 <= token < len(mapping):
        raise GenotypeError(f"{where} {token_name}={token}: no such entry in the file's list {names} "
                            f"(0..{len(mapping) - 1})")
    return mapping[token]


def load_genotype(path: str | os.PathLike) -> Genotype:
    """Read and validate a genotype JSON file; every problem is one GenotypeError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise GenotypeError(f"genotype file {str(path)!r}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GenotypeError(f"genotype file {str(path)!r}: not valid JSON ({error})") from None
    return genotype_from_json_dict(data, source=f"genotype file {str(path)!r}")


def basic_genotype(tasks: Sequence[str], stages: Sequence[str], aggregate: str,
                   cross_task_inputs: str = "paper") -> Genotype:
    """Paper Eq. 2 (1x1 adaptors along the hierarchy) as a genotype: see the module docstring. It reads no other
    task, so it is a genotype of the space of either rule."""
    if aggregate not in AGGREGATORS:
        raise GenotypeError(f"aggregate: {aggregate!r}; expected one of {AGGREGATORS}")
    tasks, stages = tuple(tasks), tuple(stages)
    if aggregate == "concat":
        return Genotype(tasks, stages, tuple(() for _ in tasks), cross_task_inputs)
    space = CellSpace(tasks, stages, len(stages) - 1, cross_task_inputs)
    skip, total = OPERATIONS.index("skip"), AGGREGATORS.index("sum")
    cells = []
    for task_index in range(len(tasks)):
        rows = []
        for cell_index in range(space.cells_per_task):
            previous = 0 if cell_index == 0 else space.cell_location(task_index, cell_index - 1)
            rows.append((previous, cell_index + 1, skip, skip, total))
        cells.append(tuple(rows))
    return Genotype(tasks, stages, tuple(cells), cross_task_inputs)


def consumed_locations(space: CellSpace, task_index: int, task_cells: Sequence[Cell]) -> set[int]:
    """Locations of task ``task_index`` (its stages and cells) read by one of its own cells."""
    return {location for cell in task_cells for location in cell[:2]}


def output_locations(space: CellSpace, task_index: int, task_cells: Sequence[Cell]) -> list[int]:
    """The locations the aux head of the task reads: its stages and cells that none of its own cells reads."""
    own = list(range(len(space.stages))) + [space.cell_location(task_index, index)
                                             for index in range(space.cells_per_task)]
    consumed = consumed_locations(space, task_index, task_cells)
    return [location for location in own if location not in consumed]

def random_genotype(space: CellSpace, seed: int | np.random.Generator) -> Genotype:
    """A genotype drawn uniformly from ``space`` (under its ``cross_task_inputs`` rule), reproducible from ``seed``
    (an int, or a numpy Generator whose state it advances).

    Every token is drawn uniformly among its allowed choices, independently. A token's allowed choices do not
    depend on the other tokens, so the valid genotypes are exactly the product of the tokens' choice sets and the
    draw is uniform over all ``space.num_genotypes`` of them (the random-architecture baseline of NAS papers).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(_seed(seed))
    cells = []
    for task_index in range(len(space.tasks)):
        rows = []
        for cell_index in range(space.cells_per_task):
            allowed = space.allowed_inputs(task_index, cell_index)
            rows.append((allowed[int(rng.integers(len(allowed)))], allowed[int(rng.integers(len(allowed)))],
                         int(rng.integers(len(OPERATIONS))), int(rng.integers(len(OPERATIONS))),
                         int(rng.integers(len(AGGREGATORS)))))
        cells.append(tuple(rows))
    return Genotype(space.tasks, space.stages, tuple(cells), space.cross_task_inputs)


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise GenotypeError(f"random genotype seed={seed!r}; expected a non-negative integer")
    return int(seed)
