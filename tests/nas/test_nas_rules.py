"""The cross-task input rule of an Auxi-NAS space (the paper's Sec. 3.2 rule by default, ours as an option), how a
genotype records and is validated against it, random genotypes of a space and their CLI, and the search's field."""

import collections
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest

from auxmtl_configs import nas_search
from auxmtl_jax import nas
from auxmtl_jax.errors import UserError
from auxmtl_jax.nas import random_genotypes
from auxmtl_jax.nas import search as search_lib

ROOT = Path(__file__).resolve().parents[2]
GENOTYPES = ROOT / "configs" / "genotypes"
SHIPPED = [GENOTYPES / "example_three_task.json", GENOTYPES / "searched_demo.json"]  # made under our wider rule
# searched (and drawn) under the paper's rule for issue 30's nas_evidence
PAPER_RULE = [GENOTYPES / "searched_evaluation.json", *sorted((GENOTYPES / "random_two_task").glob("*.json"))]
EXAMPLE = ROOT / "configs" / "genotypes" / "example_three_task.json"
TASKS = ("segmentation", "depth", "normal")
STAGES = ("stage3", "stage4", "stage5")
# 3 tasks x 3 cells on 3 stages. Locations: 0-2 stages, 3-5 segmentation cells 0-2, 6-8 depth's, 9-11 normal's.
PAPER = nas.CellSpace(TASKS, STAGES, 3)
WIDE = nas.CellSpace(TASKS, STAGES, 3, "all_cells")
# Written out by hand from the rules. The paper (Sec. 3.2, counting from 1): cell p of task t may take "the output
# from task 1 to task t-1 in the first p-1 cells", besides the stages' adaptors and its own previous cells; counting
# from 0, cell i reads cells 0..i-1 of every earlier task. Ours: every cell of every earlier task.
PAPER_INPUTS = {
    (0, 0): [0, 1, 2], (0, 1): [0, 1, 2, 3], (0, 2): [0, 1, 2, 3, 4],
    (1, 0): [0, 1, 2], (1, 1): [0, 1, 2, 3, 6], (1, 2): [0, 1, 2, 3, 4, 6, 7],
    (2, 0): [0, 1, 2], (2, 1): [0, 1, 2, 3, 6, 9], (2, 2): [0, 1, 2, 3, 4, 6, 7, 9, 10],
}
WIDE_INPUTS = {
    (0, 0): [0, 1, 2], (0, 1): [0, 1, 2, 3], (0, 2): [0, 1, 2, 3, 4],
    (1, 0): [0, 1, 2, 3, 4, 5], (1, 1): [0, 1, 2, 3, 4, 5, 6], (1, 2): [0, 1, 2, 3, 4, 5, 6, 7],
    (2, 0): list(range(9)), (2, 1): list(range(10)), (2, 2): list(range(11)),
}
CASES = [(PAPER, PAPER_INPUTS), (WIDE, WIDE_INPUTS)]


def with_input(space, task, cell, location):
    """A genotype of ``space`` whose cell (task, cell) reads ``location`` on path a; every other input is stage 0."""
    cells = [[(0, 0, 4, 4, 0) for _ in range(space.cells_per_task)] for _ in space.tasks]
    cells[task][cell] = (location, 0, 4, 4, 0)
    return nas.Genotype(space.tasks, space.stages, tuple(tuple(rows) for rows in cells), space.cross_task_inputs)


@pytest.mark.parametrize("space, inputs", CASES, ids=["paper", "all_cells"])
def test_a_cell_reads_exactly_what_its_rule_allows(space, inputs):
    assert {key: list(space.allowed_inputs(*key)) for key in inputs} == inputs
    for (task, cell), allowed in inputs.items():
        for location in range(space.num_locations):
            if location in allowed:
                assert with_input(space, task, cell, location).cells[task][cell][0] == location
            else:
                with pytest.raises(nas.GenotypeError, match=rf"cells\['{TASKS[task]}'\]\[{cell}\] input_a={location}"):
                    with_input(space, task, cell, location)


def test_the_paper_rule_is_the_default_and_the_narrower():
    assert nas.CellSpace(TASKS, STAGES, 3).cross_task_inputs == "paper" == nas.CROSS_TASK_INPUTS[0]
    assert nas.basic_genotype(TASKS, STAGES, "sum").cross_task_inputs == "paper"
    assert all(set(PAPER_INPUTS[key]) <= set(WIDE_INPUTS[key]) for key in PAPER_INPUTS)
    # the number of genotypes: the product of every token's choices (two inputs, 36 op pairs, 2 aggregators per cell)
    assert PAPER.num_genotypes == math.prod(len(inputs) ** 2 * 36 * 2 for inputs in PAPER_INPUTS.values())
    assert PAPER.num_genotypes < WIDE.num_genotypes
    with pytest.raises(nas.GenotypeError, match=r"cross_task_inputs='ours'; expected one of \('paper', 'all_cells'\)"):
        nas.CellSpace(TASKS, STAGES, 3, "ours")


def test_a_genotype_breaking_its_rule_fails_in_one_line():
    wide = with_input(WIDE, 2, 1, 7)  # normal.cell1 reads depth.cell1: ours allows it, the paper does not
    with pytest.raises(nas.GenotypeError) as error:
        wide.under_rule("paper")
    message = str(error.value)
    assert "\n" not in message
    assert message == ("Genotype: cells['normal'][1] input_a=7: depth.cell1 is a cell of an earlier task that "
                       "cross_task_inputs='paper' forbids here (Sec. 3.2: cell i of a task reads only cells 0..i-1 "
                       "of earlier tasks); this cell may read locations 0..3, 6, 9 (0=stage3, 1=stage4, 2=stage5, "
                       "3=segmentation.cell0, 6=depth.cell0, 9=normal.cell0)")
    # a location not generated yet is another problem, named as such under either rule
    with pytest.raises(nas.GenotypeError, match=r"input_a=10: points at a location not generated yet"):
        with_input(PAPER, 2, 1, 10)


def test_the_rule_is_recorded_in_the_file_and_read_back(tmp_path):
    genotype = with_input(PAPER, 1, 1, 3)
    genotype.save(tmp_path / "paper.json")
    assert json.loads((tmp_path / "paper.json").read_text())["cross_task_inputs"] == "paper"
    assert nas.load_genotype(tmp_path / "paper.json") == genotype
    assert genotype.under_rule("all_cells").space == nas.CellSpace(TASKS, STAGES, 3, "all_cells")
    assert genotype.under_rule("all_cells") != genotype  # the same cells, a genotype of another space


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_genotypes_were_made_under_our_rule_and_break_the_papers(path):
    """Both shipped files were written / searched under the wide rule and say so; the paper's rule refuses them
    (their depth cell 0 reads a segmentation cell, which no first cell may under Sec. 3.2)."""
    genotype = nas.load_genotype(path)
    assert genotype.cross_task_inputs == "all_cells"
    with pytest.raises(nas.GenotypeError, match=r"cells\['depth'\]\[0\] input_.=\d+: segmentation.cell\d is a cell "
                                                r"of an earlier task that cross_task_inputs='paper' forbids here"):
        genotype.under_rule("paper")


@pytest.mark.parametrize("path", PAPER_RULE, ids=lambda path: path.name)
def test_the_nas_evidence_genotypes_follow_the_papers_rule(path):
    genotype = nas.load_genotype(path)
    assert genotype.cross_task_inputs == "paper" and genotype.under_rule("paper") == genotype


def test_files_without_a_rule_load_as_ours_with_a_note(tmp_path, caplog):
    data = json.loads(EXAMPLE.read_text())
    del data["cross_task_inputs"]
    path = tmp_path / "written_before_the_rule.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="auxmtl_jax"):
        genotype = nas.load_genotype(path)
        nas.load_genotype(path)
    assert genotype == nas.load_genotype(EXAMPLE) and genotype.cross_task_inputs == "all_cells"
    notes = [record.getMessage() for record in caplog.records
             if "names no cross_task_inputs rule" in record.getMessage()]
    assert len(notes) == 1 and "written_before_the_rule.json" in notes[0] and "'all_cells'" in notes[0]


@pytest.mark.parametrize("space", [PAPER, WIDE], ids=["paper", "all_cells"])
def test_random_genotypes_are_valid_reproducible_and_cover_every_allowed_choice(space):
    first = nas.random_genotype(space, 0)
    assert first == nas.random_genotype(space, 0)  # the same seed, the same genotype
    assert first.cross_task_inputs == space.cross_task_inputs and first.space == space
    genotypes = [nas.random_genotype(space, seed) for seed in range(1000)]
    assert len({genotype.sequence() for genotype in genotypes}) == 1000  # different seeds differ
    tokens = np.stack([genotype.as_array() for genotype in genotypes])  # [seeds, T, n, 5]
    inputs = PAPER_INPUTS if space is PAPER else WIDE_INPUTS
    for (task, cell), allowed in inputs.items():
        for slot in (0, 1):
            counts = collections.Counter(tokens[:, task, cell, slot].tolist())
            assert sorted(counts) == allowed  # every allowed input occurs, nothing else
            # uniform: each choice near 1000 / len(allowed) (a 6-sigma band of the binomial)
            expected = 1000 / len(allowed)
            assert all(abs(count - expected) < 6 * np.sqrt(expected) for count in counts.values()), counts
        assert sorted(set(tokens[:, task, cell, 2:4].reshape(-1).tolist())) == list(range(len(nas.OPERATIONS)))
        assert sorted(set(tokens[:, task, cell, 4].tolist())) == list(range(len(nas.AGGREGATORS)))
    # valid under their own rule (constructing them validated it); a paper genotype is valid under ours too
    for genotype in genotypes[:50]:
        assert genotype.under_rule("all_cells").cells == genotype.cells


def test_random_genotype_seeds():
    rng = np.random.default_rng(3)
    drawn = [nas.random_genotype(PAPER, rng) for _ in range(2)]
    assert drawn[0] != drawn[1]  # a Generator is advanced
    assert nas.random_genotype(PAPER, np.random.default_rng(3)) == drawn[0]
    for seed in (-1, 1.5, True, "0"):
        with pytest.raises(nas.GenotypeError, match=r"random genotype seed=.*; expected a non-negative integer"):
            nas.random_genotype(PAPER, seed)


def test_random_genotypes_cli_writes_genotypes_of_the_same_space(tmp_path, capsys):
    out = tmp_path / "random"
    assert random_genotypes.main(["--like", str(EXAMPLE), "--cross_task_inputs", "paper", "--seed", "0",
                                  "--seed", "7", "--out", str(out)]) == 0
    space = nas.CellSpace(TASKS, ("stage2", "stage3", "stage4", "stage5"), 4)
    for seed in (0, 7):
        assert nas.load_genotype(out / f"random_seed{seed}.json") == nas.random_genotype(space, seed)
    assert "random_seed7.json (seed 7; one of about 10^41.8 genotypes of the 'paper' space)" in capsys.readouterr().out
    # --like keeps the file's own rule unless told otherwise
    random_genotypes.main(["--like", str(EXAMPLE), "--seed", "1", "--out", str(tmp_path / "wide.json")])
    assert nas.load_genotype(tmp_path / "wide.json").cross_task_inputs == "all_cells"
    # a space by its parts: one cell per stage and the paper's rule by default
    random_genotypes.main(["--tasks", "segmentation,depth", "--stages", "stage4,stage5", "--seed", "2",
                           "--out", str(tmp_path / "parts.json")])
    assert nas.load_genotype(tmp_path / "parts.json") == nas.random_genotype(
        nas.CellSpace(("segmentation", "depth"), ("stage4", "stage5"), 2), 2)


@pytest.mark.parametrize("arguments, message", [
    (["--like", str(EXAMPLE), "--tasks", "depth", "--seed", "0", "--out", "x"], r"either as --like.*not both"),
    (["--seed", "0", "--out", "x"], r"no space given"),
    (["--like", str(EXAMPLE), "--seed", "0", "--seed", "1", "--out", "one.json"], r"is one file, but 2 seeds"),
    (["--like", str(EXAMPLE), "--seed", "0", "--seed", "0", "--out", "dir"], r"repeats a seed"),
    (["--like", str(EXAMPLE), "--seed", "-1", "--out", "dir"], r"seed=-1; expected a non-negative integer"),
    (["--tasks", "segmentation,edges", "--stages", "stage5", "--seed", "0", "--out", "dir"], r"tasks must be"),
])
def test_random_genotypes_cli_errors_are_one_line(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        random_genotypes.main(arguments)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert re.search(message, error), error
    assert not list(tmp_path.iterdir())


def test_the_search_uses_the_papers_rule_unless_told_otherwise():
    config = nas_search.get_config()
    assert config.search.cross_task_inputs == "paper"
    stages = ("stage2", "stage3", "stage4", "stage5")
    assert search_lib.search_space(config, stages).cross_task_inputs == "paper"
    config.search.cross_task_inputs = "all_cells"
    assert search_lib.search_space(config, stages) == nas.CellSpace(TASKS, stages, 4, "all_cells")
    config.search.cross_task_inputs = "everything"
    with pytest.raises(UserError, match=r"^search.cross_task_inputs='everything'; expected one of"):
        search_lib.validate_search_config(config)
    del config.search["cross_task_inputs"]  # a config from before the field: the paper's rule
    assert search_lib.search_space(config, stages).cross_task_inputs == "paper"
