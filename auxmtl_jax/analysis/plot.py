r"""Figures from training workdirs and Auxi-NAS genotypes.

  python -m auxmtl_jax.analysis.plot fig5 joint=DIR auxi=DIR --out=fig5.png [--task=depth] [--layers=a,b,c]
  python -m auxmtl_jax.analysis.plot fig3 single_seg=DIR single_depth=DIR joint=DIR auxi_all=DIR \
      --out=fig3.png [--x=segmentation/miou --y=depth/abs_err]
  python -m auxmtl_jax.analysis.plot genotype GENOTYPE.json --out=cells.png
  python -m auxmtl_jax.analysis.plot search SEARCH_WORKDIR     # search_rewards/operations, best_genotype .png

For fig5/fig3 each run is `NAME=DIR` (DIR a training workdir) or a sweep workdir (`NAME=DIR` or plain `DIR`) whose
sub-folders are workdirs, each becoming a run named after its sub-folder; a PNG and an SVG with the same stem are
written. `genotype` draws a genotype JSON file (paper Fig. 4: per task, its cells, their inputs, operations and
aggregator) into the PNG only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from auxmtl_jax import errors
from auxmtl_jax.analysis import figures, search_plot
from auxmtl_jax.analysis.figures import AnalysisInputError
from auxmtl_jax.analysis.genotype_plot import plot_genotype
from auxmtl_jax.models.genotype import load_genotype


def resolve_runs(specs: Sequence[str], required_file: str) -> dict[str, Path]:
    """Run name -> workdir from `NAME=DIR` / `DIR` arguments, expanding sweep workdirs into their sub-workdirs."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, separator, directory = spec.partition("=")
        if not separator:
            name, directory = "", spec
        elif not name or not directory:
            raise AnalysisInputError(f"run argument {spec!r}: expected NAME=DIR or DIR")
        path = Path(directory)
        if not path.is_dir():
            raise AnalysisInputError(f"{path}: no such workdir (from argument {spec!r})")
        if (path / required_file).is_file():
            found = {name or path.name: path}
        else:
            found = {sub.name: sub for sub in sorted(path.iterdir()) if (sub / required_file).is_file()}
            if not found:
                raise AnalysisInputError(
                    f"{path}: no {required_file}; expected a training workdir holding it, or a sweep workdir "
                    f"whose sub-folders hold it"
                )
        for run_name, run_path in found.items():
            if run_name in runs:
                raise AnalysisInputError(f"run name {run_name!r} given twice ({runs[run_name]} and {run_path})")
            runs[run_name] = run_path
    if not runs:
        raise AnalysisInputError("no runs given; expected NAME=DIR arguments after the figure name")
    return runs


def plot_fig5(
    run_specs: Sequence[str], *, out: str, task: str = "depth", layers: Sequence[str] | None = None,
    component: str = "grad_main", smoothing: float = 0.6, dpi: int = 100,
) -> list[Path]:
    """Gradient-magnitude curves and training loss (paper Fig. 5); returns the written paths."""
    runs = {name: figures.read_metrics(path) for name, path in resolve_runs(run_specs, figures.METRICS_FILE).items()}
    figure = figures.gradient_curves(runs, layers, loss_key=f"loss/{task}", component=component, smoothing=smoothing)
    return figures.save_figure(figure, out, dpi=dpi)


def plot_fig3(
    run_specs: Sequence[str], *, out: str, x: str | None = None, y: str | None = None, dpi: int = 100,
) -> tuple[list[Path], dict[str, str]]:
    """Strategy scatter in a two-metric plane (paper Fig. 3); returns the written paths and the runs left out."""
    results = {name: figures.read_results(path) for name, path in resolve_runs(run_specs, figures.RESULTS_FILE).items()}
    if (x is None) != (y is None):
        raise AnalysisInputError("give both --x and --y, or neither (then headline metrics are chosen)")
    if x is None:
        x, y = figures.choose_scatter_metrics(results)
    _, _, left_out = figures.partition_scatter_runs(results, x, y)
    return figures.save_figure(figures.strategy_scatter(results, x, y), out, dpi=dpi), left_out


def plot_genotype_file(genotype_path: str, *, out: str, dpi: int = 150) -> list[Path]:
    """Auxi-NAS genotype drawing (paper Fig. 4) of a genotype JSON file; returns the written path in a list."""
    genotype = load_genotype(genotype_path)
    return [plot_genotype(genotype, out, title=Path(genotype_path).name, dpi=dpi)]


def _parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(
        prog="python -m auxmtl_jax.analysis.plot",
        description="Figures from training workdirs (paper Fig. 5, 3) and Auxi-NAS genotypes (Fig. 4).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("fig5", "shared-encoder gradient magnitude and training loss"),
                            ("fig3", "strategies in a two-metric plane, single-task runs dotted")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("runs", nargs="+", metavar="NAME=DIR", help="training workdirs (or sweep workdirs)")
        command.add_argument("--out", required=True, help="output .png; an .svg is written next to it")
        command.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    fig5, fig3 = commands.choices["fig5"], commands.choices["fig3"]
    fig5.add_argument("--task", default="depth", help="task whose training loss (loss/<task>) is shown")
    fig5.add_argument("--layers", type=lambda s: [p for p in s.split(",") if p], default=None,
                      help="comma-separated logged encoder layers; default: three spread across depth")
    fig5.add_argument("--component", choices=figures.GRADIENT_COMPONENTS, default="grad_main",
                      help="main-loss part (grad_main, the default: comparable across runs), aux-loss part "
                           "(grad_aux) or their total (grad, which an added loss raises by construction)")
    fig5.add_argument("--smoothing", type=float, default=0.6, help="EMA smoothing of the curves, in [0, 1)")
    fig3.add_argument("--x", default=None, help="task/metric on the x axis (e.g. segmentation/miou)")
    fig3.add_argument("--y", default=None, help="task/metric on the y axis (e.g. depth/abs_err)")
    search = commands.add_parser("search", help="an Auxi-NAS search workdir: rewards, operations, best genotype")
    search.add_argument("workdir", metavar="WORKDIR", help="a search workdir (configs/nas_search.py)")
    genotype = commands.add_parser("genotype", help="an Auxi-NAS genotype's cells per task (paper Fig. 4)")
    genotype.add_argument("genotype", metavar="GENOTYPE.json", help="genotype file (auxmtl_jax.nas format)")
    genotype.add_argument("--out", required=True, help="output .png")
    genotype.add_argument("--dpi", type=int, default=150, help="PNG resolution")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns 0, or exits with status 1 and one `error: ...` line on stderr for a bad input."""
    args = _parser().parse_args(argv)
    with errors.reported_as_one_line(args.verbose):
        written = _write_figures(args)
    for path in written:
        print(f"wrote {path}")
    return 0


def _write_figures(args: argparse.Namespace) -> list[Path]:
    if args.command == "genotype":
        return plot_genotype_file(args.genotype, out=args.out, dpi=args.dpi)
    if args.command == "search":
        return search_plot.write_search_figures(args.workdir)
    if args.command == "fig5":
        return plot_fig5(args.runs, out=args.out, task=args.task, layers=args.layers, component=args.component,
                         smoothing=args.smoothing, dpi=args.dpi)
    written, left_out = plot_fig3(args.runs, out=args.out, x=args.x, y=args.y, dpi=args.dpi)
    for name, reason in left_out.items():
        print(f"fig3: left out run {name!r}: {reason}", file=sys.stderr)
    return written


if __name__ == "__main__":
    sys.exit(main())
