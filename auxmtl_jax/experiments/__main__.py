"""`python -m auxmtl_jax.experiments NAME --workdir=DIR [--seeds=N] [--size=tiny|cpu|gpu] [--dataset=D]
[--set KEY=VALUE ...]`: runs a named experiment over seeds and writes DIR/report.md (see the package docstring).
`NAME=variants --variant A=... --variant B=...` compares any config variants against the first one.
Re-running continues an interrupted experiment; finished runs are read, not trained again."""

from __future__ import annotations

import logging
from typing import Sequence

from auxmtl_jax import errors
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import EXPERIMENTS, run_and_report, runner
from auxmtl_jax.experiments.definitions import variants_experiment


def parse_variants(specs: Sequence[str]) -> dict[str, str]:
    """['joint=strategy=joint', ...] -> {'joint': 'strategy=joint', ...}."""
    variants = {}
    for spec in specs:
        name, sep, variant = spec.partition("=")
        if not sep or not name.isidentifier() or name in variants:
            raise UserError(f"--variant {spec!r}; expected a new NAME=VARIANT, e.g. auxi_all=strategy=auxi_all")
        variants[name] = variant
    return variants


def main(argv: Sequence[str] | None = None) -> None:
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.experiments",
                                   description="The paper's comparisons over seeds, with intervals and paired tests.")
    parser.add_argument("name", choices=[*EXPERIMENTS, "variants"],
                        help="a paper experiment, or 'variants': the --variant runs against the first one")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME=VARIANT",
                        help="with 'variants': a run, e.g. auxi_all=strategy=auxi_all (configs/common.py syntax)")
    parser.add_argument("--workdir", required=True, help="experiment dir: runs/, report.md, figures")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds 0..N-1 (default: " + ", ".join(
                            f"{count} at {size}" for size, count in runner.DEFAULT_SEEDS.items()) + ")")
    parser.add_argument("--size", choices=runner.SIZES, default="cpu",
                        help="tiny: seconds (smoke); cpu: about an hour per experiment on 2 cores; gpu: longer")
    parser.add_argument("--dataset", choices=runner.DATASETS, default="synthetic_scenes",
                        help="synthetic_scenes (built on first use) or a built real dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set dataset.data_dir=/data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("auxmtl_jax").setLevel(logging.INFO)
    with errors.reported_as_one_line(args.verbose):
        runner.use_compilation_cache(args.workdir)
        experiment = variants_experiment(parse_variants(args.variants)) if args.name == "variants" else args.name
        written = run_and_report(experiment, args.workdir, seeds=args.seeds, size=args.size, dataset=args.dataset,
                                 overrides=args.overrides)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
