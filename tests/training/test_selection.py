"""Model selection's bookkeeping without training: the plan, the criterion, which candidates are kept, resuming."""

import math

import jax.numpy as jnp
import pytest

from auxmtl_configs import common
from auxmtl_jax.errors import UserError
from auxmtl_jax.training import selection as selection_lib


def plan_for(**evaluation):
    config = common.base_config()
    config.num_train_steps, config.eval_every_steps = 10, 4
    config.dataset.validation_split = "train[90%:]"
    for key, value in evaluation.items():
        config.evaluation[key] = value
    return selection_lib.evaluation_plan(config)


def depth(abs_err):
    return {"depth": {"abs_err": abs_err, "rel_err": abs_err / 2}}


def test_the_plan_evaluates_at_every_period_and_the_end_and_reads_test_only_at_the_last_k():
    plan = plan_for(average_last=2)
    assert plan.eval_steps == (4, 8, 10) and plan.last_steps == (8, 10) and plan.report == "selected"
    assert [step for step in plan.eval_steps if plan.reads_test_at(step)] == [8, 10]
    assert plan_for(average_last=2, report="last_mean").report == "last_mean"
    with pytest.raises(UserError, match=r"report='last_mean' needs config.evaluation.average_last > 1"):
        plan_for(report="last_mean")
    with pytest.raises(UserError, match=r"reduction='per_image'; expected one of per_pixel, per_batch"):
        plan_for(reduction="per_image")


def test_a_metric_criterion_follows_the_metric_direction_and_never_selects_nan():
    criterion = selection_lib.criterion_from("depth/abs_err", ("depth",))
    assert criterion.score(depth(0.5), None) == -0.5
    assert math.isnan(criterion.score(depth(float("nan")), None))
    assert "lower is better" in criterion.describe("x")
    delta_m = selection_lib.criterion_from("delta_m", ("depth",))
    # Δm% (per_task) of abs 0.5 / rel 0.25 against abs 1 / rel 0.5: both 50% lower = +50.
    assert delta_m.score(depth(0.5), depth(1.0)) == pytest.approx(50.0)


def test_candidates_are_kept_while_a_kept_checkpoint_could_resume_before_them(tmp_path):
    selection = selection_lib.Selection(plan_for(select_by="depth/abs_err"), tmp_path, None, ("depth",))
    variables = {"params": {"w": jnp.ones(3)}}
    selection.after_validation(4, depth(0.8), variables, oldest_resumable_step=None)
    selection.after_validation(8, depth(0.6), variables, oldest_resumable_step=4)
    assert selection.checkpointer.all_steps() == [4, 8]  # a resume from step 4 needs the best up to 4
    selection.after_validation(10, depth(0.7), variables, oldest_resumable_step=8)  # worse: nothing saved
    assert selection.checkpointer.all_steps() == [8] and selection.best[0] == 8
    selection.close()

    # Resumed from step 4: the candidate of step 8 came after it and goes; the best up to 4 is rebuilt.
    resumed = selection_lib.Selection(plan_for(select_by="depth/abs_err"), tmp_path, None, ("depth",))
    with pytest.raises(UserError, match=r"lacks step 4, the best on validation up to the resumed step 4"):
        resumed.resume(4, {4: depth(0.8), 8: depth(0.6)})
    resumed.close()


def test_resuming_keeps_the_best_up_to_the_resumed_step(tmp_path):
    plan = plan_for(select_by="depth/abs_err")
    selection = selection_lib.Selection(plan, tmp_path, None, ("depth",))
    variables = {"params": {"w": jnp.arange(3.0)}}
    selection.after_validation(4, depth(0.8), variables, oldest_resumable_step=None)
    selection.after_validation(8, depth(0.6), {"params": {"w": jnp.zeros(3)}}, oldest_resumable_step=4)
    selection.close()
    resumed = selection_lib.Selection(plan, tmp_path, None, ("depth",))
    resumed.resume(4, {4: depth(0.8)})
    assert resumed.checkpointer.all_steps() == [4] and resumed.best[0] == 4
    restored = resumed.restore_best({"params": {"w": jnp.zeros(3)}})
    assert restored["params"]["w"].tolist() == [0.0, 1.0, 2.0]
    resumed.close()
