"""The experiment layer: interval and paired-test maths by hand, experiment definitions, and a tiny experiment
that completes, re-runs without training, and resumes after a kill to the uninterrupted result."""

import json
import math
import os
import subprocess
import sys

import pytest
from etils import epath

from auxmtl_jax import input_pipeline
from auxmtl_jax import train
from auxmtl_jax.errors import UserError
from auxmtl_jax.experiments import EXPERIMENTS, Claim, Experiment, Run, report, run_and_report, runner, stats
from auxmtl_jax.experiments.definitions import TWO_TASKS, variants_experiment
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
    assert test.verdict == "holds" and test.pairs == 3
    assert stats.paired_test([0.0, 0.0, 1.0], [1.0, 2.0, 3.0]).verdict == "does not hold"
    assert stats.paired_test([1.0, 2.0, 3.0], [0.9, 2.3, 2.8]).verdict == "not significant"


def test_paired_test_without_spread_or_pairs_is_not_significant():
    assert math.isnan(stats.paired_test([2.0, 3.0], [1.0, 2.0]).p_value)  # every difference equal
    assert stats.paired_test([2.0], [1.0]).verdict == "not significant"
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_test([1.0, 2.0], [1.0])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06 (monotone);
    # the untested NaN stays out of the family.
    adjusted = stats.holm_adjusted([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert stats.holm_adjusted([0.5, 0.6]) == [1.0, 1.0]


def test_claims_compare_lower_is_better_metrics_with_the_right_sign():
    experiment = Experiment("x", "test", ("depth",), (Run("a", "", "A"), Run("b", "", "B")),
                            (Claim("a", "b", "A beats B", metric="depth/abs_err"),), singles={"depth": "b"})
    results = {"a": {0: {"depth": {"abs_err": 0.50}}, 1: {"depth": {"abs_err": 0.40}}, 2: {"depth": {"abs_err": 0.45}}},
               "b": {0: {"depth": {"abs_err": 0.60}}, 1: {"depth": {"abs_err": 0.55}}, 2: {"depth": {"abs_err": 0.58}}}}
    result = report.test_claim(experiment, results, experiment.claims[0])
    assert result.test.mean_difference == pytest.approx((0.10 + 0.15 + 0.13) / 3)  # positive: A has lower error
    delta = report.delta_m_per_seed(experiment, results, "a")
    assert delta[0] == pytest.approx(-(0.50 - 0.60) / 0.60 * 100)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_run_of_every_experiment_builds_a_valid_config(name, tmp_path):
    experiment = EXPERIMENTS[name]
    base = runner.base_config(experiment, size="cpu", dataset="synthetic_scenes")
    for run in experiment.runs:
        config = runner.run_config(experiment, run, 2, base, tmp_path)
        train.validate_config(config)
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
                  (Claim("auxi", "joint", "Auxi beats Joint"),),
                  singles={"segmentation": "joint", "depth": "joint"}, fig5=("joint", "auxi")).check()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def finished_pair(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    written = run_and_report(PAIR, str(root), seeds=2, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    return root, written


def test_a_tiny_experiment_writes_its_report(finished_pair):
    root, written = finished_pair
    assert {path.name for path in written} == {"report.md", "summary.json", "fig3_intervals.png", "fig5_bands.png"}
    summary = json.loads((root / "summary.json").read_text())
    per_seed = {seed: json.loads((root / "runs" / f"auxi_seed{seed}" / "results.json").read_text())["metrics"]
                for seed in (0, 1)}
    miou = summary["runs"]["auxi"]["segmentation/miou"]
    assert miou["per_seed"] == {str(seed): per_seed[seed]["segmentation"]["miou"] for seed in (0, 1)}
    assert miou["mean"] == pytest.approx((per_seed[0]["segmentation"]["miou"] + per_seed[1]["segmentation"]["miou"]) / 2)
    assert per_seed[0] != per_seed[1]  # the seed changes the initialisation and the data order
    assert summary["runs"]["joint"]["delta_m"]["per_seed"] == {"0": 0.0, "1": 0.0}  # Δm% of the reference itself
    claim = summary["claims"][0]
    assert claim["pairs"] == 2 and claim["verdict"] in ("holds", "does not hold", "not significant")
    assert claim["holm_p_value"] == pytest.approx(claim["p_value"], nan_ok=True)  # a family of one claim
    text = (root / "report.md").read_text()
    assert "| Auxi | " in text and "- Auxi beats Joint — **" in text and "![fig5_bands.png](fig5_bands.png)" in text
    assert "Size `tiny`: synthetic_scenes/tiny" in text


def test_re_running_a_finished_experiment_trains_nothing(finished_pair, data_dir, monkeypatch):
    root, _ = finished_pair
    before = (root / "summary.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    run_and_report(PAIR, str(root), seeds=2, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    assert json.loads((root / "summary.json").read_text())["runs"] == json.loads(before)["runs"]


def test_another_size_in_the_same_dir_is_refused(finished_pair, data_dir):
    root, _ = finished_pair
    with pytest.raises(UserError, match=r"holds another experiment setting .*'size': \('tiny', 'cpu'\)"):
        run_and_report(PAIR, str(root), seeds=2, size="cpu", overrides=[f"dataset.data_dir={data_dir}"])


def test_a_killed_experiment_resumes_to_the_uninterrupted_result(finished_pair, data_dir, tmp_path, monkeypatch):
    uninterrupted, _ = finished_pair
    root = tmp_path / "killed"
    create = input_pipeline.create_train_iterator
    started = []

    def killing_iterator(*args, **kwargs):
        started.append(True)  # the second run (auxi, seed 0) dies after its first checkpoint (step 2)
        return KilledAfter(create(*args, **kwargs), 3) if len(started) == 2 else create(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "create_train_iterator", killing_iterator)
    with pytest.raises(KeyboardInterrupt):
        run_and_report(PAIR, str(root), seeds=1, size="tiny", overrides=[f"dataset.data_dir={data_dir}"])
    assert (root / "runs" / "joint_seed0" / "results.json").exists()
    assert not (root / "runs" / "auxi_seed0" / "results.json").exists()
    assert not (root / "report.md").exists()

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
    assert [(claim.better, claim.worse) for claim in experiment.claims] == [("auxi", "joint"), ("ds", "joint")]
    with pytest.raises(UserError, match="expected at least two"):
        variants_experiment({"joint": "strategy=joint"})


_CACHE_PROBE = """
import sys, jax
from auxmtl_jax.experiments import runner
runner.use_compilation_cache(sys.argv[1])
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize("user_cache", [None, "user_cache"])
def test_the_command_line_caches_compilations_in_the_experiment_dir_unless_the_user_set_a_cache(user_cache, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    if user_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / user_cache)
    probe = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tmp_path / "exp")], env=env, check=True,
                           capture_output=True, text=True)
    expected = tmp_path / user_cache if user_cache else tmp_path / "exp" / runner.COMPILATION_CACHE_DIR
    assert probe.stdout.strip() == str(expected)
