"""The NaN stop's verdict on a run's own history (`training.divergence`): which kept checkpoint is from before the
divergence began, and advice that can be followed as written (the real runs: tests/e2e/test_nan_stop_advice.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from auxmtl_jax.training import divergence

TASKS = ("segmentation", "depth", "normal")

# Measured on the runlocal config (joint, batch 4), lr 100 constant, a log and a checkpoint every step: the main
# loss (sum of the three task losses) per step and the parameter norm per checkpoint, up to the NaN.
LR100_LOSSES = [5.787, 186.9, 361, 3.04e4, 5.115e4, 2.795e7, 2.721e9, 9.402e10, 7.049e11, 1.265e14, 4.659e13, 86.34,
                1.543e15, 101]
LR100_NORMS = [16469, 30631, 42752, 58352, 6.08e6, 1.17e7, 1.72e7, 1.02e10, 1.84e10, 2.49e10, 2.99e10, 3.36e10, 6.67e10]
# lr 3: one spike (x6.4) that the run recovered from; it finished.
LR3_LOSSES = [5.787, 3.713, 23.94, 4.811, 4.062, 4.993, 3.962, 5.315, 5.334, 5.161, 4.442, 5.555, 3.91, 4.332]


def per_step(values):
    return [divergence.Measure(step, step, value) for step, value in enumerate(values, 1)]


def test_sustained_rise_ignores_a_recovered_spike():
    assert divergence.sustained_rise(LR3_LOSSES, 4.0, baseline="min") is None
    assert divergence.sustained_rise(LR100_LOSSES, 4.0, baseline="min") == 1
    assert divergence.sustained_rise([5, 3, 20, 4, 30, 40], 4.0, baseline="min") == 4
    assert divergence.sustained_rise([5, 3, 20, 4, 30, 10], 4.0, baseline="min") is None
    assert divergence.sustained_rise([1.0, 50.0, 5.0, 11.0], 10.0, baseline="first") == 3
    assert divergence.sustained_rise([7.0], 4.0, baseline="min") is None


def test_a_run_diverging_from_its_first_update_has_no_healthy_checkpoint():
    norms = list(zip(range(1, 14), LR100_NORMS))
    verdict = divergence.judge(range(1, 14), per_step(LR100_LOSSES), norms)
    assert verdict.healthy == () and verdict.diverged == tuple(range(1, 14)) and verdict.resume_step is None
    assert "the loss began to diverge at step 2 (main loss 186.9 > 4 x its minimum 5.787" in verdict.reason


def test_checkpoints_from_before_the_rise_are_healthy_and_later_ones_are_not():
    losses = per_step([5.8, 5.1, 4.6, 4.2, 3.96, 2496, 2.3e5, 1.1e7])  # lr raised to 100 after step 4
    verdict = divergence.judge([2, 4, 6, 8], losses, [(2, 103.0), (4, 107.0), (6, 35607.0), (8, 5.7e5)])
    # The loss of step 6 is measured on checkpoint 5's parameters: checkpoint 4 (loss at step 5) is the last good one.
    assert verdict.healthy == (2, 4) and verdict.diverged == (6, 8) and verdict.resume_step == 4


def test_a_log_window_makes_every_checkpoint_it_measures_suspect():
    """A log over steps 51..100 measures the parameters of checkpoints 50..99: its rise condemns checkpoint 50."""
    records = [{"step": 50 * i, "kind": "train", **{f"loss/{t}": v / 3 for t in TASKS}}
               for i, v in enumerate([6.0, 4.0, 3.0, 40.0, 90.0], 1)]
    losses = divergence.loss_history(records, [], TASKS)
    assert [(m.first, m.last) for m in losses] == [(1, 50), (51, 100), (101, 150), (151, 200), (201, 250)]
    verdict = divergence.judge([100, 150, 200], losses, [])
    assert verdict.healthy == (100,) and verdict.diverged == (150, 200)


def test_a_sudden_nan_without_a_rise_leaves_the_last_checkpoint_healthy():
    """A bad batch (or a numerical corner) gives NaN with no rise before it: the checkpoint before it is fine."""
    window = [(3, {f"loss/{t}": (np.inf if t == "depth" else 1.0) for t in TASKS})]
    records = [{"step": s, "kind": "train", **{f"loss/{t}": 1.5 for t in TASKS}} for s in (1, 2)]
    losses = divergence.loss_history(records, window, TASKS)
    assert [m.last for m in losses] == [1, 2]
    verdict = divergence.judge([2], losses, [(2, 100.0)])
    assert verdict.healthy == (2,) and verdict.reason is None


def test_parameter_norm_growth_alone_marks_the_divergence():
    losses = per_step([6.0, 5.0, 4.5, 4.4, 4.3, 4.2])
    verdict = divergence.judge([2, 4, 6], losses, [(2, 100.0), (4, 900.0), (6, 5000.0)])
    assert verdict.healthy == (2, 4) and verdict.diverged == (6,)
    assert "parameter norm grew to 5e+03 at step 6, > 10 x 100 at the first checkpoint (step 2)" in verdict.reason


def test_loss_history_reads_the_run_records_and_the_unlogged_steps():
    records = [{"step": 2, "kind": "train", "loss/segmentation": 1.0, "loss/depth": 2.0, "loss/normal": 0.5,
                "loss/total": -3.0},  # a learned weighting's total may be negative: not used
               {"step": 2, "kind": "checkpoint", "param_norm": 12.5}, {"step": 2, "kind": "eval", "depth/x": 1.0}]
    window = [(3, {"loss/segmentation": 1.0, "loss/depth": 1.0, "loss/normal": 1.0}),
              (4, {"loss/segmentation": np.nan, "loss/depth": 1.0, "loss/normal": 1.0}),
              (5, {"loss/segmentation": 1.0, "loss/depth": 1.0, "loss/normal": 1.0})]
    assert divergence.loss_history(records, window, TASKS) == [divergence.Measure(1, 2, 3.5),
                                                               divergence.Measure(3, 3, 3.0)]
    assert divergence.norm_history(records) == [(2, 12.5)]


def test_read_records_skips_a_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki')
    assert divergence.read_records(tmp_path, "metrics.jsonl") == [{"step": 1, "kind": "train"}]
    assert divergence.read_records(tmp_path / "none", "metrics.jsonl") == []


def flags(message: str) -> dict[str, str]:
    return dict(re.findall(r"--config\.([\w.]+)=(\S+?)(?=[;.)]?(?:\s|$))", message))


def test_advice_names_the_checkpoint_and_flags_that_continue_from_it():
    verdict = divergence.Verdict((2, 4), (6, 8), "the loss began to diverge at step 6 (...)")
    text = divergence.advice(verdict, workdir="W", learning_rate=0.05, accepted="aux.", moved_to="W/diverged")
    assert "checkpoint(s) [6, 8] were moved to W/diverged. The last checkpoint from before it is step 4." in text
    assert flags(text) == {"optimizer.learning_rate": "0.005", "accept_changed_keys": "aux.,optimizer.learning_rate"}
    calm = divergence.Verdict((2,), (), None)
    text = divergence.advice(calm, workdir="W", learning_rate=1e-3, accepted="optimizer.", moved_to="W/d")
    assert "the last checkpoint, step 2, shows no sign of divergence" in text
    assert flags(text) == {"optimizer.learning_rate": "0.0001", "accept_changed_keys": "optimizer."}


@pytest.mark.parametrize("verdict, says", [
    (divergence.Verdict((), (), None), "no checkpoint was saved, so the run must start over"),
    (divergence.Verdict((), (2, 4), "the loss began to diverge at step 2 (...)"),
     "every kept checkpoint is from after the divergence began"),
])
def test_advice_says_plainly_when_the_run_must_start_over(verdict, says):
    text = divergence.advice(verdict, workdir="W", learning_rate=100.0, accepted="", moved_to="W/d")
    assert says in text and "it starts from step 0 in W" in text
    assert flags(text) == {"optimizer.learning_rate": "10"}  # no accept_changed_keys: nothing to resume


def test_param_norm_is_the_global_l2_norm():
    params = {"a": np.full((2, 2), 3.0, np.float32), "b": {"c": np.array([4.0], np.float32)}}
    assert divergence.param_norm(params) == pytest.approx(np.sqrt(4 * 9 + 16))
