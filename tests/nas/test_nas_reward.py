"""The search reward: per-task scores in (0, 1] and their geometric mean."""

import math

import pytest

from auxmtl_jax.nas import reward as reward_lib


def test_scores_map_metrics_into_the_unit_interval_higher_better():
    assert reward_lib.task_score("segmentation", {"miou": 0.4, "pixel_acc": 0.8}) == pytest.approx(0.4)
    assert reward_lib.task_score("depth", {"rel_err": 0.0}) == 1.0
    assert reward_lib.task_score("depth", {"rel_err": 1.0}) == pytest.approx(0.5)
    assert reward_lib.task_score("normal", {"mean": 30.0}) == pytest.approx(0.5)
    assert reward_lib.task_score("normal", {"mean": 15.0}) > reward_lib.task_score("normal", {"mean": 20.0})
    assert reward_lib.task_score("segmentation", {"miou": 0.0}) == reward_lib.SCORE_FLOOR
    assert reward_lib.task_score("depth", {"rel_err": math.nan}) == reward_lib.SCORE_FLOOR


def test_reward_is_the_geometric_mean_of_task_scores():
    metrics = {"segmentation": {"miou": 0.5}, "depth": {"rel_err": 0.25}, "normal": {"mean": 10.0}}
    expected = (0.5 * (1 / 1.25) * (1 / (1 + 10 / 30))) ** (1 / 3)
    assert reward_lib.reward(metrics) == pytest.approx(expected)
    assert reward_lib.reward({"depth": {"rel_err": 0.25}}) == pytest.approx(0.8)


def test_missing_metrics_and_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match=r"metrics of depth lack 'rel_err'"):
        reward_lib.reward({"depth": {"abs_err": 0.3}})
    with pytest.raises(ValueError, match=r"no score is defined for task 'edges'"):
        reward_lib.reward({"edges": {"f1": 0.3}})
    with pytest.raises(ValueError, match=r"no task metrics"):
        reward_lib.reward({})
