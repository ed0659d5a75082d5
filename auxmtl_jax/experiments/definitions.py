"""The named experiments (the paper's comparisons) and the sizes they run at.

An experiment is a list of runs, each a config variant string (`configs/common.py` syntax) on the experiment's
base config, and the paper's claims about them as pairwise comparisons. `{name}` in a variant is the workdir of
run `name` of the same seed (a Prior starts from that seed's single-task run), so such a run comes after it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from auxmtl_jax.errors import UserError

TWO_TASKS = ("segmentation", "depth")
THREE_TASKS = ("segmentation", "depth", "normal")
SEARCHED_GENOTYPE = "configs/genotypes/searched_demo.json"  # the demo-size Auxi-NAS search's best genotype
DELTA_M = "delta_m"  # the metric key of Δm% in claims


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    variant: str
    label: str


@dataclasses.dataclass(frozen=True)
class Claim:
    """`better` beats `worse` on `metric` ('delta_m' or 'task/metric'), as the paper reports."""

    better: str
    worse: str
    statement: str
    metric: str = DELTA_M


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    source: str  # where the comparison comes from: 'paper Table 1', 'beyond the paper'
    tasks: tuple[str, ...]
    runs: tuple[Run, ...]
    claims: tuple[Claim, ...]
    # Single-task reference runs of Δm%: {task: run}, or {group: {task: run}} chosen by `reference_group`.
    singles: Mapping[str, str]
    reference_group: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    fig5: tuple[str, ...] = ()  # runs whose encoder-gradient curves Fig. 5 compares

    def run(self, name: str) -> Run:
        return next(run for run in self.runs if run.name == name)

    def references(self, run: str) -> Mapping[str, str]:
        """{task: single-task run} that Δm% of `run` is measured against."""
        return self.reference_group.get(run, self.singles)

    def dependencies(self, run: Run) -> list[str]:
        return re.findall(r"\{(\w+)\}", run.variant)

    def check(self) -> "Experiment":
        """Every referenced run exists and comes first; claims and references name runs of this experiment."""
        seen: set[str] = set()
        for run in self.runs:
            for needed in self.dependencies(run):
                if needed not in seen:
                    raise UserError(f"experiment {self.name!r}: run {run.name!r} starts from {{{needed}}}, which is "
                                    "not an earlier run; expected its runs in dependency order")
            if run.name in seen:
                raise UserError(f"experiment {self.name!r}: run {run.name!r} is listed twice")
            seen.add(run.name)
        named = [claim.better for claim in self.claims] + [claim.worse for claim in self.claims]
        named += list(self.fig5) + list(self.singles.values()) + [run for group in self.reference_group.values()
                                                for run in group.values()]
        unknown = sorted(set(named) - seen)
        if unknown:
            raise UserError(f"experiment {self.name!r}: claims or references name unknown runs {unknown}")
        return self


def _single_runs(tasks, decoder: str, suffix: str = "") -> tuple[Run, ...]:
    short = {"segmentation": "seg", "depth": "depth", "normal": "normal"}
    return tuple(Run(f"single_{short[task]}{suffix}", f"strategy=single:{task},decoder={decoder}",
                     f"Single-{short[task]}{suffix.replace('_', ' ')}") for task in tasks)


def _strategies() -> Experiment:
    decoder = "decoder=baseline"
    runs = _single_runs(TWO_TASKS, "baseline") + (
        Run("joint", f"strategy=joint,{decoder}", "Joint"),
        Run("kendall", f"strategy=kendall,{decoder}", "Kendall"),
        Run("ds_seg", f"strategy=deep_supervision:segmentation,{decoder}", "DS-seg"),
        Run("ds_depth", f"strategy=deep_supervision:depth,{decoder}", "DS-depth"),
        Run("prior_seg", f"strategy=prior:{{single_seg}},{decoder}", "Prior-seg"),
        Run("prior_depth", f"strategy=prior:{{single_depth}},{decoder}", "Prior-depth"),
        Run("auxi_seg", f"strategy=auxi:segmentation,prior={{single_depth}},{decoder}", "Auxi-seg (depth prior)"),
        Run("auxi_depth", f"strategy=auxi:depth,prior={{single_seg}},{decoder}", "Auxi-depth (seg prior)"),
        Run("auxi_both", f"strategy=auxi_all,{decoder}", "Auxi-both"),
    )
    claims = (
        Claim("auxi_both", "joint", "Auxi-both beats Joint"),
        Claim("auxi_both", "kendall", "Auxi-both beats Kendall uncertainty weighting"),
        Claim("auxi_both", "ds_seg", "Auxi-both beats deep supervision on segmentation (DS-seg)"),
        Claim("auxi_both", "ds_depth", "Auxi-both beats deep supervision on depth (DS-depth)"),
        Claim("auxi_seg", "prior_depth", "Auxi-seg beats Prior-depth (same start, plus a segmentation aux module)"),
        Claim("auxi_depth", "prior_seg", "Auxi-depth beats Prior-seg (same start, plus a depth aux module)"),
    )
    return Experiment("strategies", "paper Sec. 4.2, Fig. 3", TWO_TASKS, runs, claims,
                      singles={"segmentation": "single_seg", "depth": "single_depth"}, fig5=("joint", "auxi_both"))


def _decoders() -> Experiment:
    runs, claims, groups = [], [], {}
    for decoder, label in (("baseline", "Baseline"), ("context", "Context"), ("ushape", "U-shape")):
        singles = _single_runs(TWO_TASKS, decoder, f"_{decoder}")
        joint = Run(f"joint_{decoder}", f"strategy=joint,decoder={decoder}", f"Joint {label}")
        auxi = Run(f"auxi_{decoder}", f"strategy=auxi_all,decoder={decoder}", f"Auxi {label}")
        runs += [*singles, joint, auxi]
        claims.append(Claim(auxi.name, joint.name, f"Auxi beats Joint with the {label} decoder"))
        reference = {"segmentation": singles[0].name, "depth": singles[1].name}
        groups.update({run.name: reference for run in (*singles, joint, auxi)})
    return Experiment("decoders", "paper Table 1", TWO_TASKS, tuple(runs), tuple(claims),
                      singles=groups["joint_baseline"], reference_group=groups,
                      fig5=("joint_baseline", "auxi_baseline"))


def _aux_architectures() -> Experiment:
    decoder = "decoder=baseline"
    runs = _single_runs(TWO_TASKS, "baseline") + (
        Run("joint", f"strategy=joint,{decoder}", "Joint"),
        Run("auxi_both", f"strategy=auxi_all,{decoder}", "Auxi-both (1x1 adaptor, concat)"),
        Run("auxi_both_conv3x3", f"strategy=auxi_all,adaptor=conv3x3,{decoder}", "Auxi-both (3x3 adaptor)"),
        Run("auxi_both_sum", f"strategy=auxi_all,aggregate=sum,{decoder}", "Auxi-both (sum aggregation)"),
        Run("auxi_seg", f"strategy=auxi:segmentation,{decoder}", "Auxi-seg"),
        Run("auxi_depth", f"strategy=auxi:depth,{decoder}", "Auxi-depth"),
    )
    claims = tuple(Claim(run.name, "joint", f"{run.label} beats Joint") for run in runs[3:]) + (
        Claim("auxi_both", "auxi_seg", "Auxi-both beats Auxi-seg (an aux module per task beats one)"),
        Claim("auxi_both", "auxi_depth", "Auxi-both beats Auxi-depth (an aux module per task beats one)"),
    )
    return Experiment("aux_architectures", "paper Table 2", TWO_TASKS, runs, claims,
                      singles={"segmentation": "single_seg", "depth": "single_depth"}, fig5=("joint", "auxi_both"))


def _three_tasks() -> Experiment:
    decoder = "decoder=baseline"
    runs = _single_runs(THREE_TASKS, "baseline") + (
        Run("joint", f"strategy=joint,{decoder}", "Joint"),
        Run("auxi_seg", f"strategy=auxi:segmentation,{decoder}", "Auxi-seg"),
        Run("auxi_depth", f"strategy=auxi:depth,{decoder}", "Auxi-depth"),
        Run("auxi_normal", f"strategy=auxi:normal,{decoder}", "Auxi-normal"),
        Run("auxi_all", f"strategy=auxi_all,{decoder}", "Auxi-all"),
        Run("auxi_nas", f"strategy=auxi_nas:{SEARCHED_GENOTYPE},{decoder}", "Auxi-NAS (searched)"),
        Run("joint_ushape", "strategy=joint,decoder=ushape", "Joint U-shape"),
    )
    claims = tuple(Claim(name, "joint", f"{label} beats Joint") for name, label in (
        ("auxi_seg", "Auxi-seg"), ("auxi_depth", "Auxi-depth"), ("auxi_normal", "Auxi-normal"),
        ("auxi_all", "Auxi-all"), ("auxi_nas", "Auxi-NAS"))) + (
        Claim("auxi_nas", "auxi_all", "Auxi-NAS beats Auxi-all (the searched cells beat the basic module)"),
        Claim("auxi_all", "joint_ushape", "Auxi-all (Baseline decoder) beats Joint with the U-shape decoder"),
    )
    return Experiment("three_tasks", "paper Table 4", THREE_TASKS, runs, claims,
                      singles={"segmentation": "single_seg", "depth": "single_depth", "normal": "single_normal"},
                      fig5=("joint", "auxi_all"))


WEIGHTING_LABELS = {"equal": "equal", "dwa": "DWA", "pcgrad": "PCGrad", "cagrad": "CAGrad", "nash_mtl": "Nash-MTL",
                    "famo": "FAMO"}


def _weightings() -> Experiment:
    """Beyond the paper: do aux modules still help under the modern weightings and gradient treatments?"""
    decoder = "decoder=baseline"
    runs = list(_single_runs(THREE_TASKS, "baseline"))
    claims = []
    for weighting, label in WEIGHTING_LABELS.items():
        joint = Run(f"joint_{weighting}", f"strategy=joint,weighting={weighting},{decoder}", f"Joint, {label}")
        auxi = Run(f"auxi_all_{weighting}", f"strategy=auxi_all,weighting={weighting},{decoder}",
                   f"Auxi-all, {label}")
        runs += [joint, auxi]
        claims.append(Claim(auxi.name, joint.name, f"Auxi-all beats Joint under {label}"))
    claims += [Claim(f"joint_{weighting}", "joint_equal", f"Joint under {label} beats Joint under equal weighting")
               for weighting, label in WEIGHTING_LABELS.items() if weighting != "equal"]
    return Experiment("weightings", "beyond the paper", THREE_TASKS, tuple(runs), tuple(claims),
                      singles={"segmentation": "single_seg", "depth": "single_depth", "normal": "single_normal"},
                      fig5=("joint_equal", "auxi_all_equal"))


def variants_experiment(variants: Mapping[str, str], tasks: tuple[str, ...] = THREE_TASKS) -> Experiment:
    """An ad-hoc experiment of config variants {name: variant}: Δm% and the claims are against the first one."""
    if len(variants) < 2:
        raise UserError(f"--variant: got {len(variants)}; expected at least two NAME=VARIANT (the first is the "
                        "reference)")
    names = list(variants)
    runs = tuple(Run(name, variant, name) for name, variant in variants.items())
    claims = tuple(Claim(name, names[0], f"{name} beats {names[0]}") for name in names[1:])
    return Experiment("variants", "an ad-hoc comparison", tasks, runs, claims,
                      singles={task: names[0] for task in tasks}, fig5=tuple(names[:4])).check()


EXPERIMENTS = {experiment.name: experiment.check()
               for experiment in (_strategies(), _decoders(), _aux_architectures(), _three_tasks(), _weightings())}
