"""The named experiments (the paper's comparisons) and the claims declared for them before any run.

An experiment is a list of runs, each a config variant string (`configs/common.py` syntax) on the experiment's
base config, and claims: pairwise comparisons on the endpoint the source names (one task's metric; a claim over
all tasks is a family of per-task endpoints), in the direction the source reports. `{name}` in a variant is the
workdir of run `name` of the same seed (a Prior starts from that seed's single-task run), so such a run comes
after it. Run names carry their decoder (but for the Baseline) so that experiments sharing a runs dir
(`--runs_dir`) share the runs they have in common.

An experiment may declare a gate: claims evaluated before the others, Holm-adjusted among themselves, of which at
least one must hold for the rest to be read (its premise; the report says whether it passed above the claims).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from auxmtl_jax.errors import UserError

TWO_TASKS = ("segmentation", "depth")
THREE_TASKS = ("segmentation", "depth", "normal")
SEARCHED_GENOTYPE = "configs/genotypes/searched_demo.json"  # the demo-size Auxi-NAS search's best genotype
DELTA_M = "delta_m"  # the key of Δm% in summaries
BEYOND_THE_PAPER = "beyond the paper"
GATE = "gate"  # the family of an experiment's gate claims
# The paper's endpoint for each task: the metrics of its Fig. 3 axes (mIoU, depth abs err) and the normal mean
# angle error.
PAPER_ENDPOINTS = {"segmentation": "segmentation/miou", "depth": "depth/abs_err", "normal": "normal/mean"}
SHORT = {"segmentation": "seg", "depth": "depth", "normal": "normal"}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    variant: str
    label: str


@dataclasses.dataclass(frozen=True)
class Claim:
    """The source reports run `first` `direction` ('better' or 'worse') than run `second` on `endpoint`
    ('task/metric'). Declared before the runs; the verdict follows the Holm-adjusted p within the claim's family
    (the paper's claims, or those beyond the paper) of its experiment."""

    first: str
    second: str
    endpoint: str
    statement: str
    direction: str = "better"
    source: str = "paper"

    def __post_init__(self):
        if self.direction not in ("better", "worse"):
            raise ValueError(f"Claim {self.statement!r}: direction={self.direction!r}; expected 'better' or 'worse'")
        if "/" not in self.endpoint:
            raise ValueError(f"Claim {self.statement!r}: endpoint={self.endpoint!r}; expected 'task/metric'")

    @property
    def task(self) -> str:
        return self.endpoint.split("/")[0]

    @property
    def family(self) -> str:
        return BEYOND_THE_PAPER if self.source == BEYOND_THE_PAPER else "paper"


def per_task_claims(first: str, second: str, tasks, statement: str, direction: str = "better",
                    source: str = "paper") -> tuple[Claim, ...]:
    """A claim over several tasks as its family of per-task endpoints (the paper's endpoint of each task)."""
    return tuple(Claim(first, second, PAPER_ENDPOINTS[task], f"{statement}, on {SHORT[task]}", direction, source)
                 for task in tasks)


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
    fig5: tuple[str, str] | tuple[()] = ()  # (Joint run, Auxi run) whose encoder gradients Fig. 5 compares
    # Declared and evaluated first, Holm within the gate: it passes when at least one of them holds, and the claims
    # are read only if it passed (the premise of the comparison).
    gate: tuple[Claim, ...] = ()

    def run(self, name: str) -> Run:
        return next(run for run in self.runs if run.name == name)

    def family(self, claim: Claim) -> str:
        """The Holm family of one of this experiment's claims: 'gate' for a gate claim, else the claim's own."""
        return GATE if claim in self.gate else claim.family

    @property
    def tested_claims(self) -> tuple[Claim, ...]:
        """The gate, then the claims: everything the report tests, in that order."""
        return self.gate + self.claims

    def references(self, run: str) -> Mapping[str, str]:
        """{task: single-task run} that Δm% of `run` is measured against."""
        return self.reference_group.get(run, self.singles)

    def dependencies(self, run: Run) -> list[str]:
        return re.findall(r"\{(\w+)\}", run.variant)

    def check(self) -> "Experiment":
        """Every referenced run exists and comes first; claims and references name runs and tasks of this
        experiment."""
        seen: set[str] = set()
        for run in self.runs:
            for needed in self.dependencies(run):
                if needed not in seen:
                    raise UserError(f"experiment {self.name!r}: run {run.name!r} starts from {{{needed}}}, which is "
                                    "not an earlier run; expected its runs in dependency order")
            if run.name in seen:
                raise UserError(f"experiment {self.name!r}: run {run.name!r} is listed twice")
            seen.add(run.name)
        named = [run for claim in self.tested_claims for run in (claim.first, claim.second)]
        named += list(self.fig5) + list(self.singles.values()) + [run for group in self.reference_group.values()
                                                for run in group.values()]
        unknown = sorted(set(named) - seen)
        if unknown:
            raise UserError(f"experiment {self.name!r}: claims or references name unknown runs {unknown}")
        foreign = sorted({claim.endpoint for claim in self.tested_claims if claim.task not in self.tasks})
        if foreign:
            raise UserError(f"experiment {self.name!r}: claim endpoints {foreign} are not on its tasks "
                            f"{', '.join(self.tasks)}")
        both = [claim.statement for claim in self.gate if claim in self.claims]
        if both:
            raise UserError(f"experiment {self.name!r}: {both} are both gate and claims; expected each in one")
        return self


def _decoder_suffix(decoder: str) -> str:
    """Run names carry the decoder unless it is the Baseline, so experiments sharing a runs dir share runs."""
    return "" if decoder == "baseline" else f"_{decoder}"


def _single_runs(tasks, decoder: str) -> tuple[Run, ...]:
    suffix = _decoder_suffix(decoder)
    label = "" if decoder == "baseline" else f", {DECODER_LABELS[decoder]}"
    return tuple(Run(f"single_{SHORT[task]}{suffix}", f"strategy=single:{task},decoder={decoder}",
                     f"Single-{SHORT[task]}{label}") for task in tasks)


DECODER_LABELS = {"baseline": "Baseline", "context": "Context", "ushape": "U-shape"}


def strategies() -> Experiment:
    """Paper Sec. 4.2 and Fig. 3: the strategies on two tasks with the Baseline decoder."""
    decoder = "decoder=baseline"
    runs = _single_runs(TWO_TASKS, "baseline") + (
        Run("joint", f"strategy=joint,{decoder}", "Joint"),
        Run("kendall", f"strategy=kendall,{decoder}", "Kendall"),
        Run("ds_seg", f"strategy=deep_supervision:segmentation,{decoder}", "DS-seg"),
        Run("ds_depth", f"strategy=deep_supervision:depth,{decoder}", "DS-depth"),
        Run("prior_seg", f"strategy=prior:{{single_seg}},{decoder}", "Prior-seg"),
        Run("prior_depth", f"strategy=prior:{{single_depth}},{decoder}", "Prior-depth"),
        Run("auxi_seg_from_depth", f"strategy=auxi:segmentation,prior={{single_depth}},{decoder}",
            "Auxi-seg (depth prior)"),
        Run("auxi_depth_from_seg", f"strategy=auxi:depth,prior={{single_seg}},{decoder}",
            "Auxi-depth (seg prior)"),
        Run("auxi_both", f"strategy=auxi_all,{decoder}", "Auxi-both"),
    )
    source = "paper Sec. 4.2"
    claims = (
        Claim("joint", "single_seg", PAPER_ENDPOINTS["segmentation"],
              "Joint is worse than Single on seg (competing tasks in a shared encoder)", "worse", source),
        Claim("joint", "single_depth", PAPER_ENDPOINTS["depth"],
              "Joint is worse than Single on depth (competing tasks in a shared encoder)", "worse", source),
        Claim("auxi_both", "single_seg", PAPER_ENDPOINTS["segmentation"], "Auxi-both is at least as good as "
              "Single on seg (tested as: better)", "better", source),
        Claim("auxi_both", "single_depth", PAPER_ENDPOINTS["depth"], "Auxi-both is at least as good as "
              "Single on depth (tested as: better)", "better", source),
        *per_task_claims("kendall", "joint", TWO_TASKS, "Kendall beats Joint", source=source),
        *per_task_claims("auxi_both", "joint", TWO_TASKS, "Auxi-both beats Joint", source=source),
        *per_task_claims("auxi_both", "kendall", TWO_TASKS, "Auxi-both beats Kendall", source=source),
        *per_task_claims("auxi_both", "ds_seg", TWO_TASKS, "Auxi-both beats DS-seg", source=source),
        *per_task_claims("auxi_both", "ds_depth", TWO_TASKS, "Auxi-both beats DS-depth", source=source),
        Claim("auxi_seg_from_depth", "prior_depth", PAPER_ENDPOINTS["segmentation"],
              "Fig. 3: from the depth prior, a seg aux module improves seg over Prior-depth", "better",
              "paper Fig. 3"),
        Claim("auxi_depth_from_seg", "prior_seg", PAPER_ENDPOINTS["depth"],
              "Fig. 3: from the seg prior, a depth aux module improves depth over Prior-seg", "better",
              "paper Fig. 3"),
    )
    return Experiment("strategies", "paper Sec. 4.2, Fig. 3", TWO_TASKS, runs, claims,
                      singles={"segmentation": "single_seg", "depth": "single_depth"}, fig5=("joint", "auxi_both"))


def _decoders() -> Experiment:
    """Paper Table 1: Single, Joint and Auxi (an aux module per task) with each decoder."""
    runs, claims, groups = [], [], {}
    for decoder, label in DECODER_LABELS.items():
        suffix = _decoder_suffix(decoder)
        singles = _single_runs(TWO_TASKS, decoder)
        joint = Run(f"joint{suffix}", f"strategy=joint,decoder={decoder}", f"Joint, {label}")
        auxi = Run(f"auxi_both{suffix}", f"strategy=auxi_all,decoder={decoder}", f"Auxi-both, {label}")
        runs += [*singles, joint, auxi]
        claims += per_task_claims(auxi.name, joint.name, TWO_TASKS, f"Auxi-both beats Joint with the {label} "
                                  "decoder", source="paper Table 1")
        reference = {"segmentation": singles[0].name, "depth": singles[1].name}
        groups.update({run.name: reference for run in (*singles, joint, auxi)})
    return Experiment("decoders", "paper Table 1", TWO_TASKS, tuple(runs), tuple(claims),
                      singles=groups["joint"], reference_group=groups, fig5=("joint", "auxi_both"))


def _aux_architectures() -> Experiment:
    """Paper Table 2: the aux module's design, with the Context decoder as in the paper."""
    decoder, suffix = "decoder=context", _decoder_suffix("context")
    runs = _single_runs(TWO_TASKS, "context") + (
        Run(f"joint{suffix}", f"strategy=joint,{decoder}", "Joint"),
        Run(f"auxi_both{suffix}", f"strategy=auxi_all,{decoder}", "Auxi-both (1x1 adaptor, concat)"),
        Run(f"auxi_both{suffix}_conv3x3", f"strategy=auxi_all,adaptor=conv3x3,{decoder}",
            "Auxi-both (3x3 adaptor)"),
        Run(f"auxi_both{suffix}_sum", f"strategy=auxi_all,aggregate=sum,{decoder}", "Auxi-both (sum aggregation)"),
        Run(f"auxi_seg{suffix}", f"strategy=auxi:segmentation,{decoder}", "Auxi-seg"),
        Run(f"auxi_depth{suffix}", f"strategy=auxi:depth,{decoder}", "Auxi-depth"),
    )
    source, both, joint = "paper Table 2", f"auxi_both{suffix}", f"joint{suffix}"
    claims = (
        *per_task_claims(f"{both}_conv3x3", both, TWO_TASKS, "A 3x3 adaptor beats a 1x1 adaptor", source=source),
        *per_task_claims(both, joint, TWO_TASKS, "Auxi-both beats Joint", source=source),
        Claim(f"auxi_seg{suffix}", joint, PAPER_ENDPOINTS["segmentation"], "Auxi-seg beats Joint on seg",
              "better", source),
        Claim(f"auxi_depth{suffix}", joint, PAPER_ENDPOINTS["depth"], "Auxi-depth beats Joint on depth",
              "better", source),
        Claim(both, f"auxi_seg{suffix}", PAPER_ENDPOINTS["segmentation"],
              "Auxi-both is slightly worse than Auxi-seg on seg", "worse", source),
        Claim(both, f"auxi_depth{suffix}", PAPER_ENDPOINTS["depth"],
              "Auxi-both is slightly worse than Auxi-depth on depth", "worse", source),
        *per_task_claims(f"{both}_sum", both, TWO_TASKS, "Sum aggregation beats concat", source=BEYOND_THE_PAPER),
    )
    return Experiment("aux_architectures", "paper Table 2", TWO_TASKS, runs, claims,
                      singles={"segmentation": f"single_seg{suffix}", "depth": f"single_depth{suffix}"},
                      fig5=(joint, both))


def _three_tasks() -> Experiment:
    """Paper Table 4: three tasks with the U-shape decoder throughout; Auxi-NAS uses the demo search's cells."""
    decoder = "decoder=ushape"
    runs = _single_runs(THREE_TASKS, "baseline") + (
        Run("joint", f"strategy=joint,{decoder}", "Joint"),
        Run("auxi_all", f"strategy=auxi_all,{decoder}", "Auxi-all"),
        Run("auxi_nas", f"strategy=auxi_nas:{SEARCHED_GENOTYPE},{decoder}", "Auxi-NAS (searched)"),
    )
    runs = tuple(dataclasses.replace(run, variant=run.variant.replace("decoder=baseline", decoder))
                 for run in runs)
    claims = (
        *per_task_claims("auxi_all", "joint", THREE_TASKS, "Auxi-all beats Joint", source="paper Table 4"),
        *per_task_claims("auxi_nas", "joint", THREE_TASKS, "Auxi-NAS beats Joint", source="paper Table 4"),
        *per_task_claims("auxi_nas", "auxi_all", THREE_TASKS, "Auxi-NAS beats Auxi-all", source=BEYOND_THE_PAPER),
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
        claims += per_task_claims(auxi.name, joint.name, THREE_TASKS, f"Auxi-all beats Joint under {label}",
                                  source=BEYOND_THE_PAPER)
    claims += [claim for weighting, label in WEIGHTING_LABELS.items() if weighting != "equal"
               for claim in per_task_claims(f"joint_{weighting}", "joint_equal", THREE_TASKS,
                                            f"Joint under {label} beats Joint under equal weighting",
                                            source=BEYOND_THE_PAPER)]
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
    claims = tuple(claim for name in names[1:]
                   for claim in per_task_claims(name, names[0], tasks, f"{name} beats {names[0]}",
                                                source=BEYOND_THE_PAPER))
    return Experiment("variants", "an ad-hoc comparison", tasks, runs, claims,
                      singles={task: names[0] for task in tasks}).check()


PAPER_EXPERIMENTS = {experiment.name: experiment.check()
                     for experiment in (strategies(), _decoders(), _aux_architectures(), _three_tasks(),
                                        _weightings())}
