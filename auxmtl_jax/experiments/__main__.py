"""`python -m auxmtl_jax.experiments NAME --workdir=DIR [--seeds=N] [--size=tiny|cpu|gpu] [--dataset=D]
[--set KEY=VALUE ...] [--runs_dir=R] [--delta_m=CONVENTION]`: runs a named experiment over seeds and writes
DIR/report.md (see the package docstring). `NAME=variants --variant A=... --variant B=...` compares any config
variants against the first one. Re-running continues an interrupted experiment; finished runs are read, not
trained again.

`python -m auxmtl_jax.experiments report DIR [--delta_m=CONVENTION]` renders DIR's report again from its
finished runs (or its summary.json) and trains nothing. `python -m auxmtl_jax.experiments claims DIR...` prints
one table of the paper's claims across experiment dirs (their summary.json)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from etils import epath

from auxmtl_jax import comparison
from auxmtl_jax import errors
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import EXPERIMENTS, report, rewrite_report, run_and_report, runner
from auxmtl_jax.experiments.definitions import variants_experiment
from auxmtl_jax.training import preemption

DELTA_M_HELP = (f"Δm%% convention of the report: {', '.join(comparison.DELTA_M_CONVENTIONS)} (default "
                f"{comparison.DELTA_M_DEFAULT}: LibMTL's mean within each task, then over tasks)")


def parse_variants(specs: Sequence[str]) -> dict[str, str]:
    """['joint=strategy=joint', ...] -> {'joint': 'strategy=joint', ...}."""
    variants = {}
    for spec in specs:
        name, sep, variant = spec.partition("=")
        if not sep or not name.isidentifier() or name in variants:
            raise UserError(f"--variant {spec!r}; expected a new NAME=VARIANT, e.g. auxi_all=strategy=auxi_all")
        variants[name] = variant
    return variants


def _report_parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.experiments report",
                                   description="Renders an experiment dir's report again; trains nothing.")
    parser.add_argument("dir", help="an experiment dir (its experiment.json, runs and/or summary.json)")
    parser.add_argument("--delta_m", choices=comparison.DELTA_M_CONVENTIONS, default=comparison.DELTA_M_DEFAULT,
                        help=DELTA_M_HELP)
    return parser


def _claims_parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.experiments claims",
                                   description="One Markdown table of the claims across experiment dirs.")
    parser.add_argument("dirs", nargs="+", help="experiment dirs with a summary.json")
    parser.add_argument("--family", choices=("paper", "beyond the paper"), default="paper")
    return parser


def print_claims(dirs: Sequence[str], family: str) -> None:
    summaries = {}
    for directory in dirs:
        path = epath.Path(directory) / report.SUMMARY_FILE
        if not path.exists():
            raise UserError(f"{directory}: no {report.SUMMARY_FILE}; expected an experiment dir that has reported")
        record = json.loads(path.read_text())
        if "family" not in (record.get("claims") or [{}])[0]:
            raise UserError(f"{path}: written before claims had endpoints; expected it rendered again with "
                            "`python -m auxmtl_jax.experiments report DIR`")
        summaries[epath.Path(directory).name] = record
    print(report.claims_table(summaries, family), end="")


def _run_parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog="python -m auxmtl_jax.experiments",
                                   description="The paper's comparisons over seeds, with intervals and paired tests "
                                               "('report DIR' renders a finished one again).")
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
    parser.add_argument("--runs_dir", default=None,
                        help="where the run workdirs live (default DIR/runs); experiments given the same one share "
                             "the runs they have in common")
    parser.add_argument("--delta_m", choices=comparison.DELTA_M_CONVENTIONS, default=comparison.DELTA_M_DEFAULT,
                        help=DELTA_M_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("report", "claims") else "run"
    parsers = {"report": _report_parser, "claims": _claims_parser, "run": _run_parser}
    args = parsers[command]().parse_args(argv[1:] if command != "run" else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("auxmtl_jax").setLevel(logging.INFO)
    with preemption.exits_when_preempted(), errors.reported_as_one_line(args.verbose):
        if command == "claims":
            print_claims(args.dirs, args.family)
            return
        if command == "report":
            written = rewrite_report(args.dir, delta_m=args.delta_m)
        else:
            runner.use_compilation_cache(args.workdir)
            experiment = (variants_experiment(parse_variants(args.variants)) if args.name == "variants"
                          else args.name)
            written = run_and_report(experiment, args.workdir, seeds=args.seeds, size=args.size,
                                     dataset=args.dataset, overrides=args.overrides, runs_dir=args.runs_dir,
                                     delta_m=args.delta_m)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
