r"""Random genotypes of a search space as genotype files: the random-architecture baseline of a searched genotype.

  python -m auxmtl_jax.nas.random_genotypes --like=configs/genotypes/searched_demo.json --seed=0 --seed=1 \
      --seed=2 --out=genotypes/random
  python -m auxmtl_jax.nas.random_genotypes --tasks=segmentation,depth,normal \
      --stages=stage2,stage3,stage4,stage5 [--cells_per_task=4] [--cross_task_inputs=paper] --seed=0 --out=r0.json

The space is that of a genotype file (``--like``: its tasks, stages, cells per task and cross-task input rule;
``--cross_task_inputs`` overrides the rule) or given by its parts (cells per task default to one per stage, the
rule to the paper's). Each seed gives one genotype drawn uniformly from the space
(``genotype.random_genotype(space, seed)``; the same seed, the same genotype). One seed with ``--out=FILE.json``
writes that file; otherwise ``--out`` is a directory that gets ``random_seed{N}.json`` per seed. Train one like
any genotype: ``--config=configs/synthetic_three_task.py:strategy=auxi_nas:genotypes/random/random_seed0.json``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from auxmtl_jax import errors
from auxmtl_jax.errors import UserError
from auxmtl_jax.models.genotype import CROSS_TASK_INPUTS, CellSpace, Genotype, load_genotype, random_genotype

FILE_PATTERN = "random_seed{seed}.json"


def space_of(*, like: str | None = None, tasks: Sequence[str] = (), stages: Sequence[str] = (),
             cells_per_task: int = 0, cross_task_inputs: str | None = None) -> CellSpace:
    """The space of the genotype file ``like``, or the one its parts name (``cells_per_task`` 0 = one per stage;
    rule None = the file's rule, or the paper's)."""
    if like is not None:
        if tasks or stages or cells_per_task:
            raise UserError("give the space either as --like=GENOTYPE.json or by --tasks/--stages/--cells_per_task, "
                            "not both")
        space = load_genotype(like).space
        rule = cross_task_inputs or space.cross_task_inputs
        return CellSpace(space.tasks, space.stages, space.cells_per_task, rule)
    if not tasks or not stages:
        raise UserError("no space given: expected --like=GENOTYPE.json, or --tasks and --stages")
    if cells_per_task < 0:
        raise UserError(f"--cells_per_task={cells_per_task}; expected a positive number (0 = one per stage)")
    # A genotype validates tasks and stages with one error naming them; build one to check the space.
    space = CellSpace(tuple(tasks), tuple(stages), cells_per_task or len(stages), cross_task_inputs or "paper")
    random_genotype(space, 0)
    return space


def output_paths(out: str, seeds: Sequence[int]) -> list[Path]:
    """One path per seed: ``out`` itself for one seed and a ``.json`` out, else ``out/random_seed{N}.json``."""
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seed repeats a seed: {list(seeds)}")
    path = Path(out)
    if path.suffix == ".json":
        if len(seeds) != 1:
            raise UserError(f"--out={out} is one file, but {len(seeds)} seeds were given; give a directory")
        return [path]
    if path.exists() and not path.is_dir():
        raise UserError(f"--out={out} is a file; expected a directory (or a .json file for one seed)")
    return [path / FILE_PATTERN.format(seed=seed) for seed in seeds]


def write_random_genotypes(space: CellSpace, seeds: Sequence[int], out: str) -> list[tuple[Path, Genotype]]:
    """Draws one genotype per seed and writes each (atomically); returns (path, genotype) pairs."""
    written = []
    for seed, path in zip(seeds, output_paths(out, seeds)):
        genotype = random_genotype(space, seed)
        genotype.save(path)
        written.append((path, genotype))
    return written


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def _parser() -> errors.ArgumentParser:
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.nas.random_genotypes",
                                   description="Random genotypes of a search space, drawn uniformly, as files.")
    parser.add_argument("--like", default=None, metavar="GENOTYPE.json",
                        help="draw from this genotype's space (tasks, stages, cells per task, rule)")
    parser.add_argument("--tasks", type=_names, default=(), help="comma-separated tasks (without --like)")
    parser.add_argument("--stages", type=_names, default=(), help="comma-separated stages, shallow to deep")
    parser.add_argument("--cells_per_task", type=int, default=0, help="cells per task (0 = one per stage)")
    parser.add_argument("--cross_task_inputs", choices=CROSS_TASK_INPUTS, default=None,
                        help="the space's cross-task input rule (default: --like's, else paper)")
    parser.add_argument("--seed", type=int, action="append", required=True,
                        help="a seed (non-negative integer); repeat for several genotypes")
    parser.add_argument("--out", required=True, help="a .json file (one seed) or a directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns 0, or exits with status 1 and one `error: ...` line on stderr for a bad input."""
    args = _parser().parse_args(argv)
    with errors.reported_as_one_line(args.verbose):
        space = space_of(like=args.like, tasks=args.tasks, stages=args.stages, cells_per_task=args.cells_per_task,
                         cross_task_inputs=args.cross_task_inputs)
        written = write_random_genotypes(space, args.seed, args.out)
    for (path, _), seed in zip(written, args.seed):
        print(f"wrote {path} (seed {seed}; one of about 10^{math.log10(space.num_genotypes):.1f} genotypes of the "
              f"{space.cross_task_inputs!r} space)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
