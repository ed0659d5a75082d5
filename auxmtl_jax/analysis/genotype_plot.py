"""Drawing of an Auxi-NAS genotype (paper Fig. 4): per task, its cells with their inputs, operations and aggregator.

One panel per task, in genotype order. Rows are the encoder stages (shallow at the top); the task's stems sit in the
left column and its cells on a diagonal, each at the row of the stage whose resolution it works at, so the
hierarchy is visible. Every cell has two incoming edges coloured and labelled by their operation; an input taken
from another task's cell is dashed and starts at a small node named after that cell. Grey edges lead the locations
the aux head reads into the final "head → task" node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from auxmtl_jax.analysis.figures import save_figure
from auxmtl_jax.models.genotype import AGGREGATORS, OPERATIONS, CellSpace, Genotype, output_locations

OPERATION_LABELS = {"sep_conv3x3": "sep3x3", "conv1x1": "1x1", "sep_conv3x3_dil3": "sep3x3 d3",
                    "sep_conv3x3_dil6": "sep3x3 d6", "skip": "skip", "deform_conv3x3": "deform3x3"}
TASK_ABBREVIATIONS = {"segmentation": "seg"}
OP_EDGE_GID = "op-edge"
HEAD_EDGE_GID = "head-edge"

# Layout in data units; the axes keep an equal aspect so that curve geometry computed here matches the drawing.
INCHES_PER_UNIT = 0.62
ROW_SPACING = 1.15
CELL_X0 = 1.9
CELL_DX = 1.45
HEAD_DX = 1.7
STEM_SIZE = (0.9, 0.36)
CELL_SIZE = (0.8, 0.5)
GHOST_SIZE = (0.95, 0.3)
GHOST_FONT_SIZE = 6.5
HEAD_HEIGHT = 0.4
LABEL_FONT_SIZE = 6.5
NODE_FONT_SIZE = 7.0
GHOST_OFFSETS = ((1.15, 1.0), (-0.4, 1.05), (1.25, -0.6), (0.45, 1.45), (1.7, 0.3))
EDGE_BENDS = (0.0, 0.18, -0.18, 0.32, -0.32, 0.48, -0.48)
LABEL_POSITIONS = (0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78)


class GenotypeEdge(NamedTuple):
    """One operation edge into a cell: where it reads from, which cell it feeds, with which operation."""

    task: str
    source: int  # global location number (a stage, or a cell of this or an earlier task)
    target: int  # global location number of the cell
    operation: str  # a name from OPERATIONS
    cross_task: bool  # the source is a cell of another task


class _Node(NamedTuple):
    center: tuple[float, float]
    size: tuple[float, float]
    patch: FancyBboxPatch


def short_task_name(task: str) -> str:
    """Compact task name for the small cross-task nodes ('seg' for segmentation)."""
    return TASK_ABBREVIATIONS.get(task, task)


def genotype_edges(genotype: Genotype) -> list[GenotypeEdge]:
    """The operation edges the figure draws, task by task, cell by cell, input a before input b."""
    space = genotype.space
    edges = []
    for task_index, (task, task_cells) in enumerate(zip(genotype.tasks, genotype.cells)):
        own_cells = range(space.cell_location(task_index, 0), space.cell_location(task_index, space.cells_per_task))
        for cell_index, cell in enumerate(task_cells):
            target = space.cell_location(task_index, cell_index)
            for source, operation in zip(cell[:2], cell[2:4]):
                cross_task = source >= len(space.stages) and source not in own_cells
                edges.append(GenotypeEdge(task, source, target, OPERATIONS[operation], cross_task))
    return edges


def _operation_colors() -> dict[str, tuple]:
    """One tab10 colour per operation, fixed by OPERATIONS order so figures of different genotypes agree."""
    palette = colormaps["tab10"]
    return {operation: palette(index) for index, operation in enumerate(OPERATIONS)}


def _row_y(stage_index: int) -> float:
    """Height of a stage's row: shallow stages at the top."""
    return -stage_index * ROW_SPACING


def _cell_x(space: CellSpace, cell_index: int) -> float:
    """Horizontal position of cell i: one column per cell, wider apart when cells share a row (more cells than
    stages) so that the labels of edges along a row fit between them."""
    spacing = CELL_DX if space.cells_per_task <= len(space.stages) else CELL_DX + 0.9
    return CELL_X0 + spacing * cell_index


def _boxes_overlap(center_a, size_a, center_b, size_b, margin: float = 0.0) -> bool:
    """Whether two axis-aligned boxes (given by centre and size) come closer than `margin`."""
    return (abs(center_a[0] - center_b[0]) * 2 < size_a[0] + size_b[0] + 2 * margin
            and abs(center_a[1] - center_b[1]) * 2 < size_a[1] + size_b[1] + 2 * margin)


def _overlap_area(center_a, size_a, center_b, size_b) -> float:
    """Area shared by two axis-aligned boxes (given by centre and size)."""
    overlap_x = (size_a[0] + size_b[0]) / 2 - abs(center_a[0] - center_b[0])
    overlap_y = (size_a[1] + size_b[1]) / 2 - abs(center_a[1] - center_b[1])
    return max(overlap_x, 0.0) * max(overlap_y, 0.0)


def _curve_point(start, end, bend: float, t: float) -> tuple[float, float]:
    """Point t of matplotlib's arc3 quadratic curve (valid in data units because the aspect is equal)."""
    (x1, y1), (x2, y2) = start, end
    control = ((x1 + x2) / 2 + bend * (y2 - y1), (y1 + y2) / 2 - bend * (x2 - x1))
    return tuple((1 - t) ** 2 * a + 2 * (1 - t) * t * c + t ** 2 * b for a, c, b in zip(start, control, end))


def _text_size(text: str, fontsize: float) -> tuple[float, float]:
    """Approximate size of one line of text in data units (font metrics are not known before drawing)."""
    points_per_unit = INCHES_PER_UNIT * 72
    return (len(text) * 0.62 * fontsize + 6) / points_per_unit, (fontsize * 1.2 + 3) / points_per_unit


def _legend_label(operation: str) -> str:
    """'sep3x3 d3 = sep_conv3x3_dil3', or just the name when the short label is the name."""
    short = OPERATION_LABELS[operation]
    return operation if short == operation else f"{short} = {operation}"


def _task_fill(task_index: int) -> tuple:
    """Light fill colour of a task's nodes (also used for its cells read by other tasks)."""
    return colormaps["Pastel1"](task_index)


class _Panel:
    """One task's drawing: nodes placed first, then edges bent and labels slid to avoid them."""

    def __init__(self, axes, genotype: Genotype, task_index: int, edges: Sequence[GenotypeEdge],
                 colors: dict[str, tuple]):
        self.axes, self.genotype, self.task_index, self.colors = axes, genotype, task_index, colors
        self.edges = [edge for edge in edges if edge.task == genotype.tasks[task_index]]
        self.space = genotype.space
        self.nodes: list[_Node] = []
        self.labels: list[tuple[tuple[float, float], tuple[float, float]]] = []
        self.curves: list[list[tuple[float, float]]] = []

    def add_node(self, center, size, text, *, facecolor, edgecolor="0.25", linestyle="-", fontsize=NODE_FONT_SIZE,
                 weight="normal") -> _Node:
        """A labelled box in data units; edges are clipped to its outline."""
        patch = FancyBboxPatch((center[0] - size[0] / 2, center[1] - size[1] / 2), size[0], size[1],
                               boxstyle="round,pad=0.0,rounding_size=0.08", facecolor=facecolor,
                               edgecolor=edgecolor, linestyle=linestyle, linewidth=1.0, zorder=3)
        self.axes.add_patch(patch)
        self.axes.text(*center, text, ha="center", va="center", fontsize=fontsize, weight=weight, zorder=4)
        node = _Node(center, size, patch)
        self.nodes.append(node)
        return node

    def _collisions(self, start: _Node, end: _Node, bend: float) -> int:
        """How many other nodes, placed labels and near-coincident curves the candidate curve runs into."""
        points = [_curve_point(start.center, end.center, bend, t / 24) for t in range(3, 22)]
        hits = sum(any(_boxes_overlap(point, (0, 0), node.center, node.size, 0.08) for point in points)
                   for node in self.nodes if node is not start and node is not end)
        hits += sum(any(_boxes_overlap(point, (0, 0), center, size) for point in points)
                    for center, size in self.labels)
        hits += sum(sum(math.dist(a, b) < 0.12 for a, b in zip(points, curve)) > 6 for curve in self.curves)
        return hits

    def _place_label(self, start: _Node, end: _Node, bend: float, text: str) -> tuple[float, float]:
        """Where along the curve the edge's label overlaps the fewest nodes, labels and other edges."""
        size = _text_size(text, LABEL_FONT_SIZE)
        other_curves = [point for curve in self.curves[:-1] for point in curve]

        def cost(t):
            center = _curve_point(start.center, end.center, bend, t)
            boxes = [(node.center, node.size) for node in self.nodes] + self.labels
            crossed = sum(_boxes_overlap(point, (0, 0), center, size) for point in other_curves)
            return sum(_overlap_area(center, size, other, other_size) for other, other_size in boxes) + 0.01 * crossed

        best = min(LABEL_POSITIONS, key=lambda t: (round(cost(t), 4), LABEL_POSITIONS.index(t)))
        center = _curve_point(start.center, end.center, bend, best)
        self.labels.append((center, size))
        return center

    def add_edge(self, start: _Node, end: _Node, *, color, gid: str, label: str | None = None, linestyle="-",
                 linewidth=1.3, bends: Sequence[float] = EDGE_BENDS) -> FancyArrowPatch:
        """An arrow bent to miss other nodes and labels (first such bend in `bends`), optionally labelled."""
        bend = min(bends, key=lambda candidate: (self._collisions(start, end, candidate), bends.index(candidate)))
        self.curves.append([_curve_point(start.center, end.center, bend, t / 24) for t in range(3, 22)])
        arrow = FancyArrowPatch(start.center, end.center, arrowstyle="-|>", mutation_scale=9,
                                connectionstyle=f"arc3,rad={bend}", patchA=start.patch, patchB=end.patch,
                                color=color, linestyle=linestyle, linewidth=linewidth, shrinkA=1, shrinkB=1,
                                zorder=2)
        arrow.set_gid(gid)
        self.axes.add_patch(arrow)
        if label is not None:
            center = self._place_label(start, end, bend, label)
            self.axes.text(*center, label, ha="center", va="center", fontsize=LABEL_FONT_SIZE, color=color,
                           zorder=5, bbox={"boxstyle": "round,pad=0.12", "facecolor": "white", "alpha": 0.9,
                                           "edgecolor": "none"})
        return arrow

    def ghost_center(self, consumer: _Node) -> tuple[float, float]:
        """A free spot next to the consuming cell for a cross-task input node."""
        for dx, dy in GHOST_OFFSETS:
            center = (consumer.center[0] + dx, consumer.center[1] + dy)
            if not any(_boxes_overlap(center, GHOST_SIZE, node.center, node.size, 0.06) for node in self.nodes):
                return center
        return consumer.center[0] + GHOST_OFFSETS[0][0], consumer.center[1] + GHOST_OFFSETS[0][1] + 0.4

    def draw(self) -> None:
        """Stems, cells, head, then the op edges (cross-task ones from their own small nodes) and the head edges."""
        space, task_index = self.space, self.task_index
        task = self.genotype.tasks[task_index]
        task_cells = self.genotype.cells[task_index]
        location_nodes: dict[int, _Node] = {}
        for stage_index, stage in enumerate(space.stages):
            location_nodes[stage_index] = self.add_node((0.0, _row_y(stage_index)), STEM_SIZE, stage,
                                                        facecolor="0.9")
        for cell_index, cell in enumerate(task_cells):
            center = (_cell_x(space, cell_index), _row_y(space.cell_stage(cell_index)))
            location_nodes[space.cell_location(task_index, cell_index)] = self.add_node(
                center, CELL_SIZE, f"cell {cell_index}\n{AGGREGATORS[cell[4]]}", facecolor=_task_fill(task_index))
        head_x = (_cell_x(space, len(task_cells) - 1) + HEAD_DX - 0.6) if task_cells else CELL_X0 - 0.2
        head_y = _row_y(len(space.stages) - 1) if task_cells else _row_y(len(space.stages) - 1) / 2
        head_text = f"head → {task}"
        head_size = (_text_size(head_text, NODE_FONT_SIZE)[0] * 1.1 + 0.1, HEAD_HEIGHT)
        head = self.add_node((head_x + head_size[0] / 2, head_y), head_size, head_text,
                             facecolor=_task_fill(task_index), edgecolor="0.1", weight="bold")
        for edge in self.edges:
            target = location_nodes[edge.target]
            if edge.cross_task:
                source_task, source_cell = divmod(edge.source - len(space.stages), space.cells_per_task)
                source = self.add_node(self.ghost_center(target), GHOST_SIZE,
                                       f"{short_task_name(space.tasks[source_task])}.cell{source_cell}",
                                       facecolor=_task_fill(source_task), linestyle="--",
                                       fontsize=GHOST_FONT_SIZE)
            else:
                source = location_nodes[edge.source]
            self.add_edge(source, target, color=self.colors[edge.operation], label=OPERATION_LABELS[edge.operation],
                          linestyle="--" if edge.cross_task else "-",
                          gid=f"{OP_EDGE_GID}:{task}:{space.location_name(edge.source)}->"
                              f"{space.location_name(edge.target)}")
        for location in output_locations(space, task_index, task_cells):
            self.add_edge(location_nodes[location], head, color="0.55", linewidth=1.0,
                          gid=f"{HEAD_EDGE_GID}:{task}:{space.location_name(location)}")
        self.axes.set_title(f"{task} ({len(task_cells)} cells)", fontsize=10)

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1) around every node and label, with a small margin."""
        boxes = [(node.center, node.size) for node in self.nodes] + self.labels
        boxes += [(point, (0.0, 0.0)) for curve in self.curves for point in curve]
        return (min(c[0] - s[0] / 2 for c, s in boxes) - 0.15, max(c[0] + s[0] / 2 for c, s in boxes) + 0.15,
                min(c[1] - s[1] / 2 for c, s in boxes) - 0.15, max(c[1] + s[1] / 2 for c, s in boxes) + 0.15)


def genotype_figure(genotype: Genotype, *, title: str | None = None) -> Figure:
    """Fig. 4-style drawing of a genotype: one panel per task; op edges carry gid 'op-edge:...' for checking."""
    colors = _operation_colors()
    edges = genotype_edges(genotype)
    cells_per_task = genotype.space.cells_per_task
    figure = Figure(layout="constrained")
    axes_row = figure.subplots(1, len(genotype.tasks), squeeze=False)[0]
    panels = []
    for task_index, axes in enumerate(axes_row):
        panel = _Panel(axes, genotype, task_index, edges, colors)
        panel.draw()
        panels.append(panel)
    extents = [panel.extent() for panel in panels]
    x0, x1 = min(e[0] for e in extents), max(e[1] for e in extents)
    y0, y1 = min(e[2] for e in extents), max(e[3] for e in extents)
    figure.set_size_inches(INCHES_PER_UNIT * (x1 - x0) * len(genotype.tasks) + 0.4,
                           INCHES_PER_UNIT * (y1 - y0) + 1.6)
    for axes in axes_row:
        axes.set_xlim(x0, x1)
        axes.set_ylim(y0, y1)
        axes.set_aspect("equal")
        axes.axis("off")
    used = [operation for operation in OPERATIONS if any(edge.operation == operation for edge in edges)]
    handles = [Line2D([], [], color=colors[operation], linewidth=2, label=_legend_label(operation))
               for operation in used]
    if any(edge.cross_task for edge in edges):
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="input from another task's cell"))
    handles.append(Line2D([], [], color="0.55", label="read by the aux head"))
    columns = max(1, min(len(handles), 4, int(figure.get_figwidth() / 3.3)))
    figure.legend(handles=handles, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    stages = ", ".join(genotype.stages)
    heading = f"Auxi-NAS genotype{': ' + title if title else ''}"
    figure.suptitle(f"{heading}\ntasks: {', '.join(genotype.tasks)}; stages (shallow → deep): {stages}; "
                    f"{cells_per_task} cells per task", fontsize=11)
    return figure


def plot_genotype(genotype: Genotype, out_path: str | os.PathLike, *, title: str | None = None,
                  dpi: int = 150) -> Path:
    """Writes the genotype drawing to `out_path` (a .png) through a temporary file; returns the path."""
    (written,) = save_figure(genotype_figure(genotype, title=title), out_path, dpi=dpi, svg=False)
    return written
