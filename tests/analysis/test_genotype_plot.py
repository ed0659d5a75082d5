"""Genotype drawing (paper Fig. 4): the edges it draws, and the `plot genotype` CLI."""

import json
from pathlib import Path

import matplotlib.image
import pytest

from auxmtl_jax.analysis import plot, search_plot
from auxmtl_jax.analysis.figures import AnalysisInputError
from auxmtl_jax.analysis.genotype_plot import HEAD_EDGE_GID, OP_EDGE_GID, genotype_edges, genotype_figure
from auxmtl_jax.nas import basic_genotype, load_genotype, output_locations
from auxmtl_jax.workdir import SEARCH_LOG

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "genotypes" / "example_three_task.json"


def _expected_edges(raw):
    """(task, source, target, operation, cross_task) from the raw JSON, by the module docstring's numbering."""
    stages, tasks = raw["stages"], raw["tasks"]
    cells_per_task = len(raw["cells"][tasks[0]])
    expected = []
    for task_index, task in enumerate(tasks):
        for cell_index, (input_a, input_b, op_a, op_b, _) in enumerate(raw["cells"][task]):
            target = len(stages) + task_index * cells_per_task + cell_index
            for source, op in ((input_a, op_a), (input_b, op_b)):
                source_task = (source - len(stages)) // cells_per_task if source >= len(stages) else None
                expected.append((task, source, target, raw["operations"][op],
                                 source_task is not None and source_task != task_index))
    return expected


def _drawn_gids(figure, prefix):
    return [patch.get_gid() for axes in figure.axes for patch in axes.patches
            if (patch.get_gid() or "").startswith(prefix + ":")]


def _assert_png(path, min_width=600, min_height=300):
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= min_height and width / height < 8


def test_edges_of_the_example_match_the_raw_json():
    raw = json.loads(EXAMPLE.read_text())
    genotype = load_genotype(EXAMPLE)
    edges = genotype_edges(genotype)
    assert [tuple(edge) for edge in edges] == _expected_edges(raw)
    assert len(edges) == 24
    cross = [(edge.task, genotype.space.location_name(edge.source)) for edge in edges if edge.cross_task]
    assert cross == [("depth", "segmentation.cell1"), ("depth", "segmentation.cell3"),
                     ("normal", "depth.cell1"), ("normal", "segmentation.cell2"), ("normal", "depth.cell3")]


def test_figure_draws_two_op_edges_per_cell_and_one_head_edge_per_output():
    genotype = load_genotype(EXAMPLE)
    figure = genotype_figure(genotype)
    op_gids = _drawn_gids(figure, OP_EDGE_GID)
    assert len(op_gids) == 2 * sum(len(cells) for cells in genotype.cells) == 24
    assert "op-edge:depth:segmentation.cell1->depth.cell0" in op_gids
    outputs = sum(len(output_locations(genotype.space, index, cells)) for index, cells in enumerate(genotype.cells))
    assert len(_drawn_gids(figure, HEAD_EDGE_GID)) == outputs
    assert [axes.get_title() for axes in figure.axes] == [f"{task} (4 cells)" for task in genotype.tasks]
    texts = {text.get_text() for axes in figure.axes for text in axes.texts}
    assert {"head → depth", "seg.cell1", "cell 3\nconcat", "stage5", "sep3x3 d6"} <= texts


def test_cli_writes_a_png_of_the_example(tmp_path, capsys):
    out = tmp_path / "figures" / "cells.png"
    assert plot.main(["genotype", str(EXAMPLE), f"--out={out}"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_png(out, min_width=1500)
    assert sorted(path.name for path in out.parent.iterdir()) == ["cells.png"]  # no temporaries, no SVG


@pytest.mark.parametrize("aggregate, cells_per_task", [("concat", 0), ("sum", 3)])
def test_basic_genotypes_plot(tmp_path, aggregate, cells_per_task):
    genotype = basic_genotype(("segmentation", "depth", "normal"), ("stage2", "stage3", "stage4", "stage5"),
                              aggregate)
    assert genotype.space.cells_per_task == cells_per_task
    path = tmp_path / f"basic_{aggregate}.json"
    genotype.save(path)
    out = tmp_path / f"basic_{aggregate}.png"
    assert plot.main(["genotype", str(path), "--out", str(out)]) == 0
    _assert_png(out)
    figure = genotype_figure(load_genotype(path))
    assert len(_drawn_gids(figure, OP_EDGE_GID)) == 2 * 3 * cells_per_task
    assert len(_drawn_gids(figure, HEAD_EDGE_GID)) == 3 * (4 if aggregate == "concat" else 1)


def test_bad_genotype_file_reports_one_error_line_and_writes_nothing(tmp_path, capsys):
    raw = json.loads(EXAMPLE.read_text())
    raw["cells"]["depth"][1][0] = 11  # depth.cell3 is not generated before depth.cell1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "out" / "cells.png"
    with pytest.raises(SystemExit) as raised:
        plot.main(["genotype", str(path), "--out", str(out)])
    assert raised.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: genotype file ")
    assert str(path) in error[0] and "cells['depth'][1] input_a=11" in error[0]
    assert not out.exists() and not out.parent.exists()


def test_non_png_output_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "cells.pdf"
    with pytest.raises(SystemExit, match="^1$"):
        plot.main(["genotype", str(EXAMPLE), "--out", str(out)])
    assert "expected a path ending in .png" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_search_plot_reads_a_log_whose_last_line_a_kill_cut_short(tmp_path):
    with pytest.raises(AnalysisInputError, match="does not exist; expected a search workdir"):
        search_plot.read_search_log(tmp_path)
    record = {"generation": 0, "candidate": 0, "reward": 0.5}
    (tmp_path / SEARCH_LOG).write_text(json.dumps(record) + '\n{"generation": 0, "cand')
    assert search_plot.read_search_log(tmp_path) == [record]
