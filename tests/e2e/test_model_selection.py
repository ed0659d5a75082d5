"""Model selection on a validation split and the peers' reporting conventions, end to end.

The selected step must be the best of the logged validation evaluations, the test split must be read only at the
selected step, the last K evaluation steps and the end, and a killed and resumed run must report the same."""

import json

import numpy as np
import pytest
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import input_pipeline
from auxmtl_jax import programs
from auxmtl_jax import training
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.training import evaluate as evaluate_lib
from auxmtl_jax.training import selection as selection_lib
from test_train import KilledAfter, data_dir, logged, tiny_config  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.slow


def selection_config(data_dir, **overrides):
    """Six steps; validation on the last quarter of train at steps 2, 4, 6; the test mean of the last two."""
    settings = {"num_train_steps": 6, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                "max_checkpoints_to_keep": 3, "dataset.train_split": "train[:75%]",
                "dataset.validation_split": "train[75%:]", "evaluation.average_last": 2,
                "evaluation.select_by": "depth/abs_err"}
    settings.update(overrides)
    return tiny_config(data_dir, **settings)


def spy_on_reads(monkeypatch):
    """The split of every evaluation pass, in order."""
    reads = []
    evaluate_variables = evaluate_lib.Evaluator.evaluate_variables

    def spied(self, variables):
        reads.append(self.split)
        return evaluate_variables(self, variables)

    monkeypatch.setattr(evaluate_lib.Evaluator, "evaluate_variables", spied)
    return reads


def results_of(workdir):
    return json.loads((epath.Path(workdir) / workdir_lib.RESULTS_FILE).read_text())


def test_the_selected_step_is_the_best_on_validation_and_test_is_read_only_where_reported(data_dir, tmp_path,
                                                                                         monkeypatch):
    config = selection_config(data_dir)
    reads = spy_on_reads(monkeypatch)
    programs.run(config, str(tmp_path))
    record = results_of(tmp_path)

    validation = logged(tmp_path, "validation")
    assert sorted(validation) == [2, 4, 6]
    best = min(validation, key=lambda step: (validation[step]["depth/abs_err"], step))
    selection = record["selection"]
    assert selection["step"] == best and selection["split"] == "train[75%:]"
    assert selection["validation"]["depth"]["abs_err"] == validation[best]["depth/abs_err"]
    assert record["report"] == "selected" and record["metrics"] == selection["test"]

    tests = logged(tmp_path, "eval")
    assert sorted(tests) == [4, 6]  # the last two evaluation steps; no test pass at step 2
    assert reads.count("test") == 2 + (best not in tests) and reads.count("train[75%:]") == 3
    assert record["test_read_at_steps"] == sorted({4, 6, best})
    for metric in ("abs_err", "rel_err"):
        mean = (tests[4][f"depth/{metric}"] + tests[6][f"depth/{metric}"]) / 2
        assert record["last_mean"]["metrics"]["depth"][metric] == pytest.approx(mean, rel=1e-12)
    assert record["last_mean"]["steps"] == [4, 6]
    assert record["final"]["metrics"]["depth"]["abs_err"] == tests[6]["depth/abs_err"]
    assert record["reduction"] == "per_pixel" and "pooled" in record["reduction_description"]
    assert checkpoint_lib.Checkpointer(tmp_path, folders=(workdir_lib.SELECTED_DIR,
                                                          workdir_lib.SELECTED_INTEGRITY_DIR)).all_steps() == [best]

    # Killed after the checkpoint of step 4 (validation at 2 and 4 done), resumed: the same report.
    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 5))
    with pytest.raises(KeyboardInterrupt):
        programs.run(config, str(tmp_path / "killed"))
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)
    programs.run(config, str(tmp_path / "killed"))
    resumed = results_of(tmp_path / "killed")
    assert resumed["selection"]["step"] == best
    for key in ("metrics", "last_mean", "final"):
        np.testing.assert_allclose(_values(resumed[key]), _values(record[key]), rtol=1e-5, atol=1e-7)


def _values(tree):
    if isinstance(tree, dict):
        return [value for key in sorted(tree) for value in _values(tree[key])]
    return [tree] if isinstance(tree, float) else []


def test_a_selected_step_before_the_end_is_tested_from_its_kept_weights(data_dir, tmp_path, monkeypatch):
    """Validation prefers step 2 (forced); test is then read for the weights kept from step 2 and equals a fresh
    evaluation of step 2's regular checkpoint."""
    config = selection_config(data_dir, **{"evaluation.average_last": 1})
    order = iter([3.0, 1.0, 2.0])  # the scores of steps 2, 4, 6
    monkeypatch.setattr(selection_lib.Criterion, "score", lambda self, results, reference: next(order))
    reads = spy_on_reads(monkeypatch)
    programs.run(config, str(tmp_path))
    record = results_of(tmp_path)
    assert record["selection"]["step"] == 2 and record["test_read_at_steps"] == [2, 6]
    assert reads == ["train[75%:]"] * 3 + ["test", "test"]
    fresh = training.evaluate_checkpoint(config, str(tmp_path), 2)
    assert _values(record["selection"]["test"]) == pytest.approx(_values(fresh), rel=1e-6, abs=1e-9)
    assert record["metrics"] == record["selection"]["test"] != record["final"]["metrics"]


@pytest.mark.parametrize("overrides, message", [
    ({"dataset.validation_split": "train[70%:]"},
     r"validation_split='train\[70%:\]' shares example 17 of split 'train' with config.dataset.train_split"),
    ({"dataset.validation_split": "test[:50%]"}, r"shares examples 0 to 3 of split 'test' with config.dataset.eval_split"),
    ({"evaluation.average_last": 4}, r"average_last=4 but the run evaluates only 3 times"),
    ({"evaluation.select_by": "depth/miou"}, r"select_by='depth/miou'; expected 'delta_m' or one of"),
])
def test_bad_selection_settings_are_one_line_before_any_work(data_dir, tmp_path, overrides, message):
    config = selection_config(data_dir, **overrides)
    with pytest.raises(ValueError, match=message):
        programs.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
