"""The experiment layer: interval and paired-test maths by hand, experiment definitions, and a tiny experiment
that completes, re-runs without training, and resumes after a kill to the uninterrupted result."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest
from etils import epath

from auxmtl_jax import input_pipeline
from auxmtl_jax import training
from auxmtl_jax.checkpoint import Checkpointer
from auxmtl_jax.training import preemption
from auxmtl_jax.training import loop as training_loop
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import (EXPERIMENTS, Claim, Experiment, Run, report, rewrite_report, run_and_report,
                                    runner, stats)
from auxmtl_jax.experiments.__main__ import main as experiments_main
from auxmtl_jax.experiments.definitions import (BEYOND_THE_PAPER, PAPER_ENDPOINTS, TWO_TASKS, per_task_claims,
                                                variants_experiment)
from test_train import KilledAfter


def test_t_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), t(0.975, 3 df) = 3.182446 -> half-width 3.182446 * s / 2
    mean, half = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.182446 * math.sqrt(5.0 / 3.0) / 2.0, rel=1e-6)
    assert math.isnan(stats.t_interval([7.0])[1])


def test_paired_test_by_hand():
    # differences [1, 2, 2]: mean 5/3, s = sqrt(1/3), t = (5/3) / (s / sqrt(3)) = 5 with 2 df, whose two-sided
    # p-value has the closed form 1 - t / sqrt(2 + t^2) = 1 - 5 / sqrt(27).
    test = stats.paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert test.mean_difference == pytest.approx(5.0 / 3.0)
    assert test.p_value == pytest.approx(1.0 - 5.0 / math.sqrt(27.0), rel=1e-9)
    assert test.half_width == pytest.approx(4.302653 * math.sqrt(1.0 / 3.0) / math.sqrt(3.0), rel=1e-6)
    assert test.pairs == 3


def test_the_verdict_follows_the_adjusted_p_and_the_claimed_direction():
    assert stats.verdict(+0.5, 0.01) == "holds"
    assert stats.verdict(-0.5, 0.01) == "does not hold"
    assert stats.verdict(+0.5, 0.06) == "not significant"
    assert stats.verdict(+0.5, math.nan) == "not significant"


def test_a_p_value_never_prints_as_zero():
    assert [report._p(value) for value in (0.0001, 0.0004999, 0.0005, 0.0123, math.nan)] == [
        "< 0.001", "< 0.001", "0.001", "0.012", "n/a"]


def test_paired_test_without_spread_or_pairs_has_no_p():
    assert math.isnan(stats.paired_test([2.0, 3.0], [1.0, 2.0]).p_value)  # every difference equal
    assert math.isnan(stats.paired_test([2.0], [1.0]).p_value)
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_test([1.0, 2.0], [1.0])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06 (monotone);
    # the untested NaN stays out of the family.
    adjusted = stats.holm_adjusted([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert stats.holm_adjusted([0.5, 0.6]) == [1.0, 1.0]


def _depth_experiment(claims):
    runs = (Run("a", "", "A"), Run("b", "", "B"), Run("c", "", "C"))
    return Experiment("x", "test", ("depth",), runs, claims, singles={"depth": "b"}).check()


DEPTH_RESULTS = {  # abs err per seed; rel err fixed so Δm% follows abs err alone
    "a": {0: {"depth": {"abs_err": 0.50, "rel_err": 0.2}}, 1: {"depth": {"abs_err": 0.40, "rel_err": 0.2}},
          2: {"depth": {"abs_err": 0.45, "rel_err": 0.2}}},
    "b": {0: {"depth": {"abs_err": 0.60, "rel_err": 0.2}}, 1: {"depth": {"abs_err": 0.55, "rel_err": 0.2}},
          2: {"depth": {"abs_err": 0.58, "rel_err": 0.2}}},
    "c": {0: {"depth": {"abs_err": 0.59, "rel_err": 0.2}}, 1: {"depth": {"abs_err": 0.57, "rel_err": 0.2}},
          2: {"depth": {"abs_err": 0.54, "rel_err": 0.2}}},
}


def test_claims_are_tested_on_their_endpoint_in_the_claimed_direction():
    experiment = _depth_experiment((Claim("a", "b", "depth/abs_err", "A beats B"),
                                    Claim("a", "b", "depth/abs_err", "A is worse than B", "worse")))
    better, worse = report.test_claims(experiment, DEPTH_RESULTS)
    # abs err of A − B, raw units: (-0.10 - 0.15 - 0.13) / 3; lower is better, so A is better.
    assert better.test.mean_difference == pytest.approx(-0.38 / 3)
    assert better.difference_in_claimed_direction > 0 > worse.difference_in_claimed_direction
    assert better.test.p_value < 0.05
    assert better.verdict == "holds" and worse.verdict == "does not hold"
    assert report.delta_m_per_seed(experiment, DEPTH_RESULTS, "a")[0] == pytest.approx((0.60 - 0.50) / 0.60 * 50)


def test_the_verdict_is_holm_adjusted_within_each_family_only():
    # A − C: abs err differences -0.09, -0.17, -0.09 -> raw p = 0.048; alone it holds, but in a paper family of
    # two with a larger p (B − C: 0.01, -0.02, 0.04), Holm doubles it to 0.097: not significant. A claim beyond
    # the paper is another family and does not count.
    a_vs_c = Claim("a", "c", "depth/abs_err", "A beats C")
    alone = report.test_claims(_depth_experiment((a_vs_c,)), DEPTH_RESULTS)[0]
    assert alone.test.p_value < 0.05 and alone.verdict == "holds"
    flat = Claim("b", "c", "depth/abs_err", "B beats C")
    family = report.test_claims(_depth_experiment((a_vs_c, flat)), DEPTH_RESULTS)
    assert family[0].holm_p_value == pytest.approx(2 * alone.test.p_value) and family[0].verdict == "not significant"
    beyond = dataclasses.replace(flat, source=BEYOND_THE_PAPER)
    separate = report.test_claims(_depth_experiment((a_vs_c, beyond)), DEPTH_RESULTS)
    assert separate[0].holm_p_value == pytest.approx(alone.test.p_value) and separate[0].verdict == "holds"


def test_the_experiments_mirror_the_papers_settings_and_claims():
    by_name = {name: {(claim.first, claim.second, claim.endpoint): claim for claim in experiment.claims}
               for name, experiment in EXPERIMENTS.items()}
    for experiment in EXPERIMENTS.values():
        for claim in experiment.claims:
            assert claim.endpoint == PAPER_ENDPOINTS[claim.task]
            assert (claim.family == "paper") == claim.source.startswith("paper"), claim
    strategies = by_name["strategies"]
    assert strategies[("joint", "single_seg", "segmentation/miou")].direction == "worse"
    assert strategies[("joint", "single_depth", "depth/abs_err")].direction == "worse"
    assert strategies[("auxi_both", "single_depth", "depth/abs_err")].direction == "better"
    assert {("kendall", "joint", endpoint) for endpoint in ("segmentation/miou", "depth/abs_err")} <= set(strategies)
    fig3 = strategies[("auxi_seg_from_depth", "prior_depth", "segmentation/miou")]
    assert fig3.direction == "better" and fig3.source == "paper Fig. 3"
    table2 = by_name["aux_architectures"]
    assert table2[("auxi_both_context_conv3x3", "auxi_both_context", "depth/abs_err")].direction == "better"
    assert table2[("auxi_both_context", "auxi_seg_context", "segmentation/miou")].direction == "worse"
    assert table2[("auxi_both_context_sum", "auxi_both_context", "segmentation/miou")].family == BEYOND_THE_PAPER
    table4 = by_name["three_tasks"]
    assert table4[("auxi_nas", "auxi_all", "normal/mean")].family == BEYOND_THE_PAPER
    assert table4[("auxi_nas", "joint", "normal/mean")].source == "paper Table 4"
    for name, decoder in (("aux_architectures", "context"), ("three_tasks", "ushape")):
        assert all(f"decoder={decoder}" in run.variant for run in EXPERIMENTS[name].runs), name


def test_experiments_sharing_a_runs_dir_share_equal_runs(tmp_path):
    """Run names carry their decoder, so a name means one config in every two-task experiment."""
    configs = {}
    for name in ("strategies", "decoders", "aux_architectures"):
        experiment = EXPERIMENTS[name]
        base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes")
        for run in experiment.runs:
            config = runner.run_config(experiment, run, 0, base, tmp_path).to_json()
            assert configs.setdefault(run.name, config) == config, (name, run.name)
    assert {"joint", "auxi_both", "joint_context", "auxi_both_context"} <= set(configs)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_run_of_every_experiment_builds_a_valid_config(name, tmp_path):
    experiment = EXPERIMENTS[name]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes")
    for run in experiment.runs:
        config = runner.run_config(experiment, run, 2, base, tmp_path)
        training.validate_config(config)
        assert config.seed == 2 and config.name == run.name
        for needed in experiment.dependencies(run):
            assert config.init_from.path == str(runner.run_workdir(tmp_path, needed, 2).absolute())
    assert set(experiment.fig5) <= {run.name for run in experiment.runs}


def test_the_weightings_experiment_pairs_joint_and_auxi_all_under_each_weighting(tmp_path):
    experiment = EXPERIMENTS["weightings"]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes")
    configs = {run.name: runner.run_config(experiment, run, 0, base, tmp_path) for run in experiment.runs}
    for weighting in ("equal", "dwa", "pcgrad", "cagrad", "nash_mtl", "famo"):
        joint, auxi = configs[f"joint_{weighting}"], configs[f"auxi_all_{weighting}"]
        assert joint.loss_weighting == auxi.loss_weighting == weighting
        assert joint.aux.tasks == () and auxi.aux.tasks == tuple(auxi.tasks) == ("segmentation", "depth", "normal")


def test_set_overrides_apply_after_each_runs_strategy(tmp_path):
    # A strategy resets the fields it owns (loss weighting, aux modules, init_from); `--set` must still win, as
    # `--config.KEY=VALUE` does after a run.py variant.
    experiment = EXPERIMENTS["strategies"]
    overrides = ["loss_weighting=kendall", "aux.channels=16", "num_train_steps=7"]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes", overrides=overrides)
    for name in ("joint", "auxi_both", "prior_seg"):
        config = runner.run_config(experiment, experiment.run(name), 0, base, tmp_path, overrides)
        assert (config.loss_weighting, config.aux.channels, config.num_train_steps) == ("kendall", 16, 7)
    prior = runner.run_config(experiment, experiment.run("prior_seg"), 0, base, tmp_path, overrides)
    assert prior.init_from.path == str(runner.run_workdir(tmp_path, "single_seg", 0).absolute())


def test_runs_out_of_dependency_order_are_refused():
    runs = (Run("auxi", "strategy=auxi:depth,prior={single}", "Auxi"), Run("single", "strategy=single:depth", "S"))
    with pytest.raises(UserError, match=r"run 'auxi' starts from \{single\}, which is not an earlier run"):
        Experiment("x", "test", ("depth",), runs, (), singles={"depth": "single"}).check()


PAIR = Experiment("pair", "test", TWO_TASKS,
                  (Run("joint", "strategy=joint", "Joint"), Run("auxi", "strategy=auxi_all", "Auxi")),
                  per_task_claims("auxi", "joint", TWO_TASKS, "Auxi beats Joint", source="paper Table 0"),
                  singles={"segmentation": "joint", "depth": "joint"}, fig5=("joint", "auxi")).check()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def finished_pair(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    written = run_and_report(PAIR, str(root), seeds=2, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    return root, written


@pytest.mark.slow
def test_a_tiny_experiment_writes_its_report(finished_pair):
    root, written = finished_pair
    assert {path.name for path in written} == {"report.md", "summary.json", "fig3_intervals.png",
                                               "fig5_main_gradient.png"}
    summary = json.loads((root / "summary.json").read_text())
    per_seed = {seed: json.loads((root / "runs" / f"auxi_seed{seed}" / "results.json").read_text())["metrics"]
                for seed in (0, 1)}
    miou = summary["runs"]["auxi"]["segmentation/miou"]
    assert miou["per_seed"] == {str(seed): per_seed[seed]["segmentation"]["miou"] for seed in (0, 1)}
    assert miou["mean"] == pytest.approx((per_seed[0]["segmentation"]["miou"] + per_seed[1]["segmentation"]["miou"]) / 2)
    assert per_seed[0] != per_seed[1]  # the seed changes the initialisation and the data order
    assert summary["runs"]["joint"]["delta_m"]["per_seed"] == {"0": 0.0, "1": 0.0}  # Δm% of the reference itself
    # Every metric of every run and seed, so any convention re-renders without the runs.
    assert summary["results"]["auxi"]["1"] == per_seed[1]
    assert set(summary["results"]["auxi"]["0"]["depth"]) == {"abs_err", "rel_err", "rms", "delta1", "delta2",
                                                             "delta3"}
    assert summary["delta_m"]["convention"] == "per_task"
    assert summary["delta_m"]["metrics"] == {"segmentation": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"]}
    seg, depth = summary["claims"]
    assert (seg["endpoint"], depth["endpoint"]) == ("segmentation/miou", "depth/abs_err")
    for claim in (seg, depth):
        assert claim["pairs"] == 2 and claim["verdict"] in ("holds", "does not hold", "not significant")
    assert seg["holm_p_value"] == pytest.approx(min(1.0, 2 * min(seg["p_value"], depth["p_value"])), nan_ok=True)
    text = (root / "report.md").read_text()
    assert "| Auxi | " in text and "- Auxi beats Joint, on seg (paper Table 0) — **" in text
    assert "![fig5_main_gradient.png](fig5_main_gradient.png)" in text and "| all layers |" in text
    assert "Δm% convention `per_task`" in text and "segmentation: miou, pixel_acc; depth: abs_err, rel_err" in text
    assert "Size `tiny`: synthetic_scenes/tiny" in text
    assert set(summary["fig5"]["all layers"]) >= {"ratio", "ratio_half_width", "aux_over_main"}


def _checkpoint_files(root):
    """Every file under the runs' checkpoint dirs, with its modification time."""
    return sorted((str(path), path.stat().st_mtime_ns) for path in pathlib.Path(root).rglob("*")
                  if "checkpoint" in str(path.relative_to(root)))


@pytest.mark.slow
def test_report_re_renders_in_another_convention_without_training(finished_pair, monkeypatch, tmp_path, capsys):
    root, _ = finished_pair
    before = _checkpoint_files(root)

    def no_training(*args, **kwargs):
        raise AssertionError("rendering a report trained a run")

    monkeypatch.setattr(training_loop, "train_run", no_training)
    monkeypatch.setitem(EXPERIMENTS, "pair", PAIR)  # as if it were one of the named experiments
    try:
        _re_render_in_headline_convention(root, before, tmp_path, capsys)
    finally:
        rewrite_report(str(root))  # back to the default for the tests that follow


def _re_render_in_headline_convention(root, before, tmp_path, capsys):
    experiments_main(["report", str(root), "--delta_m=headline"])
    assert "wrote" in capsys.readouterr().out
    assert _checkpoint_files(root) == before  # no checkpoint written, none removed
    summary = json.loads((root / "summary.json").read_text())
    references = {"segmentation": "joint", "depth": "joint"}
    assert summary["delta_m"] == {"convention": "headline", "unavailable": None,
                                  "metrics": {"segmentation": ["miou"], "depth": ["rms"]},
                                  "references": {"joint": references, "auxi": references}}
    results = report.results_from_summary(summary)
    expected = {seed: (results["auxi"][seed]["segmentation"]["miou"] / results["joint"][seed]["segmentation"]["miou"]
                       - 1 - (results["auxi"][seed]["depth"]["rms"] / results["joint"][seed]["depth"]["rms"] - 1))
                * 50 for seed in (0, 1)}
    assert summary["runs"]["auxi"]["delta_m"]["per_seed"] == pytest.approx({str(k): v for k, v in expected.items()})
    assert "Δm% convention `headline`" in (root / "report.md").read_text()

    # Without the runs (a committed docs/results dir): from summary.json alone, the same claims.
    copy = tmp_path / "committed"
    copy.mkdir()
    for name in ("experiment.json", "summary.json", "fig5_main_gradient.png"):
        (copy / name).write_bytes((root / name).read_bytes())
    rewrite_report(str(copy), delta_m="headline")
    again = json.loads((copy / "summary.json").read_text())
    assert again["claims"] == summary["claims"] and again["fig5"] == summary["fig5"]
    assert "![fig5_main_gradient.png]" in (copy / "report.md").read_text()


@pytest.mark.slow
def test_claims_prints_one_table_across_experiment_dirs(finished_pair, capsys):
    root, _ = finished_pair
    experiments_main(["claims", str(root)])
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads((root / "summary.json").read_text())
    seg = summary["claims"][0]
    assert len(lines) == 2 + 2  # header, rule, one line per endpoint
    assert lines[2].startswith(f"| {root.name} | Auxi beats Joint, on seg (paper Table 0) | miou "
                               f"{seg['mean_difference'] * 100:+.2f} ± {seg['half_width'] * 100:.2f} points |")
    assert lines[2].endswith(f"| {seg['holm_p_value']:.3f} ({seg['p_value']:.3f}) | {seg['verdict']} |")


@pytest.mark.slow
def test_report_bad_inputs_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments_main(["report", str(tmp_path), "--delta_m=mean"])
    assert exit_info.value.code == 2 and "invalid choice: 'mean'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiments_main(["report", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no experiment.json" in err[0]
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(SystemExit):
        experiments_main(["claims", str(tmp_path)])
    assert "no summary.json; expected an experiment dir that has reported" in capsys.readouterr().err


@pytest.mark.slow
def test_re_running_a_finished_experiment_trains_nothing(finished_pair, data_dir, monkeypatch):
    root, _ = finished_pair
    before = (root / "summary.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(training_loop, "train_run", no_training)
    run_and_report(PAIR, str(root), seeds=2, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    assert json.loads((root / "summary.json").read_text())["runs"] == json.loads(before)["runs"]


@pytest.mark.slow
def test_another_size_in_the_same_dir_is_refused(finished_pair, data_dir):
    root, _ = finished_pair
    with pytest.raises(UserError, match=r"holds another experiment setting .*'size': \('tiny', 'cpu'\)"):
        run_and_report(PAIR, str(root), seeds=2, size="cpu", overrides=[f"dataset.data_dir={data_dir}"])


class SignalsSelfAt(KilledAfter):
    """A train iterator that sends its own process `signum` when batch `at` (1-based) is requested."""

    def __init__(self, iterator, at, signum):
        super().__init__(iterator, limit=None)
        self.at, self.signum = at, signum

    def __next__(self):
        self.served += 1
        if self.served == self.at:
            os.kill(os.getpid(), self.signum)
        return next(self.iterator)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [pytest.param("kill", marks=pytest.mark.exhaustive), "SIGINT"])
def test_an_interrupted_experiment_resumes_to_the_uninterrupted_result(stop, finished_pair, data_dir, tmp_path,
                                                                       monkeypatch):
    """Killed (after a checkpoint), or sent SIGINT/SIGTERM (the run in progress checkpoints the next step and stops
    with `Preempted`): re-running the experiment trains only what is left and reaches the same numbers."""
    if stop != "kill" and threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    uninterrupted, _ = finished_pair
    root = tmp_path / "interrupted"
    create = input_pipeline.create_train_iterator
    started = []

    def interrupting_iterator(*args, **kwargs):
        started.append(True)  # the second run (auxi, seed 0) is stopped at its third batch
        if len(started) != 2:
            return create(*args, **kwargs)
        if stop == "kill":
            return KilledAfter(create(*args, **kwargs), 3)
        return SignalsSelfAt(create(*args, **kwargs), 3, signal.Signals[stop])

    monkeypatch.setattr(input_pipeline, "create_train_iterator", interrupting_iterator)
    with pytest.raises(KeyboardInterrupt if stop == "kill" else preemption.Preempted):
        run_and_report(PAIR, str(root), seeds=1, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    stopped_run = root / "runs" / "auxi_seed0"
    assert (root / "runs" / "joint_seed0" / "results.json").exists()
    assert not (stopped_run / "results.json").exists()
    assert not (root / "report.md").exists()
    if stop != "kill":  # checkpointed at the step after the signal: batch 3 was asked for in step 3
        assert Checkpointer(stopped_run, read_only=True).latest_step() == 3

    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)
    run_and_report(PAIR, str(root), seeds=1, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    resumed = json.loads((root / "summary.json").read_text())["runs"]
    expected = json.loads((epath.Path(uninterrupted) / "summary.json").read_text())["runs"]
    for run, entries in expected.items():
        for key, entry in entries.items():
            assert resumed[run][key]["per_seed"] == pytest.approx({"0": entry["per_seed"]["0"]}, rel=1e-5, abs=1e-7)


def test_variants_experiment_compares_every_variant_with_the_first():
    experiment = variants_experiment({"joint": "strategy=joint", "auxi": "strategy=auxi_all", "ds": "strategy=kendall"})
    assert experiment.singles == {"segmentation": "joint", "depth": "joint", "normal": "joint"}
    pairs = [(claim.first, claim.second) for claim in experiment.claims]
    assert pairs == [("auxi", "joint")] * 3 + [("ds", "joint")] * 3
    assert {claim.family for claim in experiment.claims} == {BEYOND_THE_PAPER}
    with pytest.raises(UserError, match="expected at least two"):
        variants_experiment({"joint": "strategy=joint"})


_CACHE_PROBE = """
import sys, jax
from auxmtl_jax.experiments import runner
runner.use_compilation_cache(sys.argv[1])
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.slow
@pytest.mark.parametrize("user_cache", [None, "user_cache"])
def test_the_command_line_caches_compilations_in_the_experiment_dir_unless_the_user_set_a_cache(user_cache, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    if user_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / user_cache)
    probe = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tmp_path / "exp")], env=env, check=True,
                           capture_output=True, text=True)
    expected = tmp_path / user_cache if user_cache else tmp_path / "exp" / runner.COMPILATION_CACHE_DIR
    assert probe.stdout.strip() == str(expected)


def test_report_re_renders_a_summary_written_before_every_metric_was_kept(tmp_path, monkeypatch):
    """Older summary.json files kept only the table's metrics: claims on endpoints re-render, Δm% says why not."""
    monkeypatch.setitem(EXPERIMENTS, "pair", PAIR)
    per_seed = {"joint": ({"0": 0.30, "1": 0.32}, {"0": 0.60, "1": 0.62}),
                "auxi": ({"0": 0.31, "1": 0.34}, {"0": 0.59, "1": 0.60})}
    old = {"experiment": "pair", "seeds": [0, 1], "setting": "an older run", "wall_seconds": 60.0,
           "runs": {run: {"segmentation/miou": {"per_seed": miou}, "depth/abs_err": {"per_seed": abs_err},
                          "delta_m": {"per_seed": {"0": 1.0, "1": 2.0}}} for run, (miou, abs_err) in per_seed.items()}}
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment": "pair", "size": "tiny",
                                                          "dataset": "synthetic_scenes", "overrides": []}))
    (tmp_path / "summary.json").write_text(json.dumps(old))
    rewrite_report(str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    seg = summary["claims"][0]
    assert seg["mean_difference"] == pytest.approx(0.015) and seg["pairs"] == 2
    assert "needs segmentation/pixel_acc" in summary["delta_m"]["unavailable"]
    assert "delta_m" not in summary["runs"]["auxi"] and summary["results"]["auxi"]["1"]["depth"] == {"abs_err": 0.60}
    text = (tmp_path / "report.md").read_text()
    assert "Not computable here" in text and "| Auxi | 32.50 ± 19.06 | 0.5950 ± 0.0635 | – |" in text


def _gradient_lines(main, aux, layers=("stem/conv/kernel", "block9/conv/kernel")):
    """metrics.jsonl train lines whose grad_main / grad_aux are `main[i]` / `aux[i]` at step 10 (i + 1)."""
    return [{"step": 10 * (i + 1), "kind": "train", **{f"grad_main/{layer}": m for layer in layers},
             **{f"grad_aux/{layer}": a for layer in layers}} for i, (m, a) in enumerate(zip(main, aux))]


def test_fig5_numbers_compare_main_loss_gradients_seed_by_seed():
    from auxmtl_jax.experiments import gradients

    joint = [_gradient_lines([2.0, 4.0], [0.0, 0.0]), _gradient_lines([1.0, 1.0], [0.0, 0.0])]
    auxi = [_gradient_lines([1.0, 2.0], [3.0, 3.0]), _gradient_lines([1.0, 2.0], [0.5, 1.0])]
    numbers = gradients.gradient_numbers(joint, auxi)
    # per seed, time means: Joint 3 and 1, Auxi 1.5 and 1.5 -> ratios 0.5 and 1.5; aux / main: 2 and 0.5
    entry = numbers["all layers"]
    assert entry["joint_main"] == pytest.approx(2.0) and entry["auxi_main"] == pytest.approx(1.5)
    assert entry["ratio"] == pytest.approx(1.0) and entry["aux_over_main"] == pytest.approx(1.25)
    assert entry["ratio_half_width"] == pytest.approx(stats.t_interval([0.5, 1.5])[1])
    assert numbers["stem/conv/kernel"] == entry and entry["seeds"] == 2
    with pytest.raises(Exception, match="share no logged grad_main layer"):
        gradients.gradient_numbers(joint, [_gradient_lines([1.0], [1.0], layers=("other/kernel",))] * 2)


def test_the_positive_control_trains_the_plain_encoder_from_scratch_whatever_the_base_starts_from(tmp_path):
    experiment = EXPERIMENTS["positive_control"]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes")
    base.model.encoder_init = "workdirs/encoder_start"  # as if the base config started from a pre-trained encoder
    configs = {run.name: runner.run_config(experiment, run, 0, base, tmp_path) for run in experiment.runs}
    for config in configs.values():
        assert (config.model.encoder, config.model.encoder_init, config.model.width_multiplier,
                config.model.decoder) == ("plain_deep", "scratch", 1.0, "baseline")
        assert training.state.encoder_start(config) is None
    assert configs["plain_ds"].deep_supervision.tasks == TWO_TASKS and configs["plain_ds"].aux.tasks == ()
    auxi = configs["plain_auxi_both"]
    assert auxi.aux.tasks == TWO_TASKS and auxi.aux.features == () and auxi.deep_supervision.tasks == ()
    assert configs["plain_single_seg"].tasks == ("segmentation",)
    claims = {(claim.first, claim.second, claim.task): claim for claim in experiment.claims}
    gate = {(claim.first, claim.second, claim.task): claim for claim in experiment.gate}
    assert set(gate) == {("plain_ds", "plain_joint", task) for task in TWO_TASKS}  # the gate, its own family
    for task in TWO_TASKS:
        assert experiment.family(gate[("plain_ds", "plain_joint", task)]) == "gate"
        assert claims[("plain_auxi_both", "plain_joint", task)].source == "paper Sec. 4.2"
        assert claims[("plain_auxi_both", "plain_ds", task)].source == "paper Sec. 4.2"


def _flat(config, prefix=""):
    """{dotted key: value} of a config, for comparing two runs' configs field by field."""
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(first, second):
    one, two = _flat(first), _flat(second)
    return {key for key in one.keys() | two.keys() if one.get(key) != two.get(key)}


@pytest.fixture(scope="module")
def off_task_configs(tmp_path_factory):
    experiment = EXPERIMENTS["off_task_start"]
    runs = tmp_path_factory.mktemp("off_task_runs")
    overrides = ["model.encoder_init=workdirs/encoder_start_normals"]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes", overrides=overrides)
    return {run.name: runner.run_config(experiment, run, 0, base, runs, overrides) for run in experiment.runs}


def test_the_off_task_start_holds_the_strategies_runs_its_controls_and_a_gate_declared_first():
    experiment, strategies = EXPERIMENTS["off_task_start"], EXPERIMENTS["strategies"]
    assert experiment.runs[:len(strategies.runs)] == strategies.runs  # shared names mean shared configs
    assert len(experiment.runs) == len(strategies.runs) + 5
    names = [run.name for run in experiment.runs]
    for run in experiment.runs:  # dependencies first (check() refuses otherwise)
        assert all(names.index(needed) < names.index(run.name) for needed in experiment.dependencies(run))
    assert [(claim.first, claim.second, claim.endpoint, claim.direction) for claim in experiment.gate] == [
        ("joint", "single_seg", "segmentation/miou", "worse"), ("joint", "single_depth", "depth/abs_err", "worse")]
    assert {experiment.family(claim) for claim in experiment.gate} == {"gate"}
    assert experiment.tested_claims[:2] == experiment.gate and not set(experiment.gate) & set(experiment.claims)
    claims = {(claim.first, claim.second, claim.task): claim for claim in experiment.claims}
    for first, second, task in (("auxi_seg_from_depth", "prior_depth", "segmentation"),
                                ("auxi_depth_from_seg", "prior_seg", "depth"), ("kendall", "joint", "depth"),
                                ("auxi_both", "joint", "segmentation"), ("auxi_both", "ds_depth", "depth")):
        assert claims[(first, second, task)].family == "paper"
    for first, second, task in (("auxi_seg_from_depth", "ds_seg_equal_from_depth", "segmentation"),
                                ("auxi_depth_from_seg", "ds_depth_equal_from_seg", "depth"),
                                ("auxi_seg_from_depth", "prior_depth_full_lr", "segmentation"),
                                ("auxi_depth_from_seg", "prior_seg_full_lr", "depth"),
                                ("auxi_both", "joint_lr2x", "segmentation"), ("auxi_both", "joint_lr2x", "depth")):
        assert claims[(first, second, task)].family == BEYOND_THE_PAPER
    with pytest.raises(UserError, match="both gate and claims"):
        dataclasses.replace(experiment, gate=experiment.gate, claims=experiment.gate).check()


def test_the_equal_weight_ds_control_adds_as_much_loss_weight_as_one_aux_module(off_task_configs):
    for auxi, ds, task in (("auxi_seg_from_depth", "ds_seg_equal_from_depth", "segmentation"),
                           ("auxi_depth_from_seg", "ds_depth_equal_from_seg", "depth")):
        auxi, ds = off_task_configs[auxi], off_task_configs[ds]
        model = training.create_model(ds, num_classes=7)
        assert model.deep_supervision_tasks == (task,) and ds.aux.tasks == ()
        # one aux module: aux.weight x one prediction's loss; DS: its weight x the loss of each stage's head
        assert len(model.stage_names) * ds.deep_supervision.weight == pytest.approx(auxi.aux.weight) == 1.0
        # from the same Prior (network, lr / 10) as the Auxi run it controls
        assert (ds.init_from.path, ds.init_from.scope, ds.init_from.base_lr_scale) == (
            auxi.init_from.path, "network", 0.1)
        assert _differences(ds, auxi) == {"name", "aux.tasks", "deep_supervision.tasks", "deep_supervision.weight"}
    assert off_task_configs["ds_seg"].deep_supervision.weight == 0.1  # the paper's DS runs keep their weight


def test_the_full_lr_prior_and_the_faster_joint_differ_from_theirs_only_in_the_lr(off_task_configs):
    from auxmtl_jax.training import state

    def first_lr(name):
        config = off_task_configs[name]
        return float(state.run_learning_rate_fn(config, config.num_train_steps)(0))

    for task in ("seg", "depth"):
        prior, full = off_task_configs[f"prior_{task}"], off_task_configs[f"prior_{task}_full_lr"]
        assert _differences(prior, full) == {"name", "init_from.base_lr_scale"}
        assert first_lr(f"prior_{task}_full_lr") == pytest.approx(10 * first_lr(f"prior_{task}"))
        assert first_lr(f"prior_{task}_full_lr") == pytest.approx(first_lr("joint"))
    joint, faster = off_task_configs["joint"], off_task_configs["joint_lr2x"]
    assert _differences(joint, faster) == {"name", "optimizer.learning_rate"}
    assert faster.optimizer.learning_rate == pytest.approx(2 * joint.optimizer.learning_rate)
    assert all(config.model.encoder_init == "workdirs/encoder_start_normals" for config in off_task_configs.values())


def test_the_off_task_encoder_start_is_the_shared_start_trained_on_normals_only():
    from auxmtl_configs import synthetic_pretrain, synthetic_pretrain_off_task

    on_task, off_task = synthetic_pretrain.get_config(), synthetic_pretrain_off_task.get_config()
    training.validate_config(off_task)
    assert off_task.tasks == ("normal",) and off_task.aux.tasks == () and off_task.init_from.path is None
    assert _differences(on_task, off_task) == {"name", "tasks"}
    assert synthetic_pretrain_off_task.get_config("runlocal").dataset.config == "tiny"


def test_the_small_data_variant_is_the_off_task_gate_and_auxi_both_under_the_same_claims():
    small, full = EXPERIMENTS["off_task_small_data"], EXPERIMENTS["off_task_start"]
    assert [run.name for run in small.runs] == ["single_seg", "single_depth", "joint", "auxi_both"]
    assert all(run == full.run(run.name) for run in small.runs) and small.gate == full.gate
    assert set(small.claims) <= {dataclasses.replace(claim, statement=claim.statement.replace(
        "Auxi-both beats Joint", "Auxi-both beats Joint on 15% of the scenes")) for claim in full.claims}


def test_nas_evidence_searches_and_evaluates_in_one_setting_and_compares_genotypes_of_one_space(tmp_path):
    from auxmtl_configs import nas_search
    from auxmtl_jax.experiments import premise
    from auxmtl_jax.models.genotype import load_genotype
    from auxmtl_jax.nas import search as search_lib

    experiment, off_task = EXPERIMENTS["nas_evidence"], EXPERIMENTS["off_task_start"]
    for name in ("single_seg", "single_depth", "joint", "auxi_both"):  # shared runs: same names, same variants
        assert experiment.run(name) == off_task.run(name)
    assert experiment.gate == off_task.gate and experiment.singles == off_task.singles
    overrides = ["model.encoder_init=workdirs/encoder_start_normals", "dataset.config=demo_large_test"]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes", overrides=overrides)
    evaluated = runner.run_config(experiment, experiment.run("auxi_nas_searched"), 0, base, tmp_path, overrides)
    searched = runner.apply_overrides(nas_search.get_config("evaluation"), overrides)
    # the search proxy is the evaluation's network, crops, data, start and lr: it differs in its `search` group
    # (whose `steps` replace num_train_steps) and logging, and takes its cells' stages from aux.features, which
    # an Auxi-NAS run reads from its genotype instead
    different = {key for key in _differences(searched, evaluated) if not key.startswith("search.")}
    assert different == {"name", "progress_bar", "analysis.grad_log_every_steps", "aux.features", "aux.genotype"}
    auxi_all = runner.run_config(experiment, experiment.run("auxi_both"), 0, base, tmp_path, overrides)
    assert searched.aux.features == auxi_all.aux.features == searched.search.stages
    space = search_lib.search_space(searched, tuple(searched.aux.features))
    assert space.cross_task_inputs == "paper" and space.tasks == experiment.tasks
    for path in premise.RANDOM_GENOTYPES:  # drawn from the space the search samples
        assert load_genotype(path).space == space
    assert len({load_genotype(path) for path in premise.RANDOM_GENOTYPES}) == 3
    claims = {(claim.first, claim.second, claim.task): claim.family for claim in experiment.claims}
    assert claims[("auxi_nas_searched", "joint", "segmentation")] == "paper"
    assert all(claims[("auxi_nas_searched", f"auxi_nas_random{seed}", task)] == BEYOND_THE_PAPER
               for seed in range(3) for task in experiment.tasks)


def test_the_variant_keys_of_the_controls():
    from auxmtl_configs import synthetic_three_task

    config = synthetic_three_task.get_config("strategy=deep_supervision,ds_weight=0.25,lr_factor=3")
    assert config.deep_supervision.weight == 0.25 and config.optimizer.learning_rate == pytest.approx(0.15)
    for variant in ("strategy=joint,prior=/runs/a,prior_lr_scale=1.0", "strategy=joint,prior_lr_scale=1.0,prior=/runs/a"):
        config = synthetic_three_task.get_config(variant)  # the Prior first, whatever the order
        assert (config.init_from.path, config.init_from.base_lr_scale) == ("/runs/a", 1.0)
    for factor in ("0", "-2", "two", "inf"):
        with pytest.raises(UserError, match="expected a positive number"):
            synthetic_three_task.get_config(f"lr_factor={factor}")


def _gated_experiment(gate):
    runs = (Run("a", "", "A"), Run("b", "", "B"), Run("c", "", "C"))
    return Experiment("x", "test", ("depth",), runs, (Claim("a", "c", "depth/abs_err", "A beats C"),),
                      singles={"depth": "b"}, gate=gate).check()


def test_the_report_evaluates_the_gate_first_in_its_own_family_and_says_whether_it_passed(tmp_path):
    passing = _gated_experiment((Claim("a", "b", "depth/abs_err", "Gate: A beats B"),))
    written = report.write_report(passing, tmp_path, DEPTH_RESULTS, seeds=[0, 1, 2], setting="a test",
                                  wall_seconds=0.0)
    assert {path.name for path in written} == {"summary.json", "report.md"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    gate, claim = summary["claims"]
    assert (gate["family"], gate["verdict"], claim["family"]) == ("gate", "holds", "paper")
    assert gate["holm_p_value"] == pytest.approx(gate["p_value"])  # a family of one: not adjusted with A − C
    assert summary["gate"] == {"passed": True, "holm_p_value": pytest.approx(gate["p_value"])}
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Gate") < text.index("- Gate: A beats B") < text.index("## Claims from the paper")
    assert f"**Gate: passed** (smallest Holm p = {gate['holm_p_value']:.3f}" in text
    assert "The claims below are read only if it passed." in text
    assert "(gate failed" not in report.claims_table({"x": summary})

    failing = _gated_experiment((Claim("a", "b", "depth/abs_err", "Gate: A is worse than B", "worse"),
                                 Claim("b", "c", "depth/abs_err", "Gate: B beats C")))
    report.write_report(failing, tmp_path, DEPTH_RESULTS, seeds=[0, 1, 2], setting="a test", wall_seconds=0.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gate"]["passed"] is False and [c["verdict"] for c in summary["claims"][:2]] == [
        "does not hold", "not significant"]
    text = (tmp_path / "report.md").read_text()
    assert "**Gate: failed**" in text and "printed for the record, not read" in text
    assert "| A beats C (paper) | abs_err" in report.claims_table({"x": summary})
    assert report.claims_table({"x": summary}).rstrip().endswith("(gate failed: not read) |")
    without = _gated_experiment(())
    report.write_report(without, tmp_path, DEPTH_RESULTS, seeds=[0, 1, 2], setting="a test", wall_seconds=0.0)
    assert "gate" not in json.loads((tmp_path / "summary.json").read_text())
    assert "Gate" not in (tmp_path / "report.md").read_text()
