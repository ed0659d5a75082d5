"""Every weighting trains the tiny config, with and without aux modules, through the program's step function, and
resumes exactly from a checkpoint: its state (DWA's history, GradNorm's weights, FAMO's logits and Adam moments)
is part of the train state. The step is jitted with the state donated, as the program's is.

The full matrix (every method x with/without aux modules: 26 step compilations, about 7 minutes on 2 cores) is
marked `weighting_matrix` and left out of the default run to keep CI under 20 minutes; run it with
`pytest -m weighting_matrix tests/e2e/test_weighting_training.py`. The default run covers the stateful methods with
aux modules, one gradient treatment without, and one killed and resumed run of the real program."""

import functools

import jax
import numpy as np
import pytest
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import input_pipeline
from auxmtl_jax import programs
from auxmtl_jax import training
from auxmtl_jax import weighting as weighting_lib
from test_protocol import assert_trees_differ, assert_trees_equal
from test_train import KilledAfter, assert_trees_close, final_params, logged, tiny_config, train_losses

STEPS, RESUME_AT = 4, 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def weighting_config(data_dir, method, with_aux):
    """The tiny config cut to two tasks, the Baseline decoder and 32x32 crops: 24 step compilations stay cheap."""
    config = tiny_config(data_dir, "strategy=joint", loss_weighting=method)
    config.tasks = ("segmentation", "depth")
    config.aux.tasks = config.tasks if with_aux else ()
    config.model.decoder = "baseline"
    config.input.crop_size = config.input.eval_size = (32, 32)
    config.weighting.dwa.period_steps = 1  # DWA's weights leave 1 after two periods, within the 4 steps
    return config


def run_steps(step_fn, state, batches):
    metrics = []
    for batch in batches:
        state, step_metrics = step_fn(state, batch)
        metrics.append(jax.device_get(step_metrics))
    return state, metrics


@pytest.mark.weighting_matrix
@pytest.mark.parametrize("with_aux", [True, False], ids=["auxi_all", "joint"])
@pytest.mark.parametrize("method", list(weighting_lib.WEIGHTINGS))
def test_each_weighting_trains_and_resumes_exactly(data_dir, tmp_path, method, with_aux):
    check_training_and_resume(data_dir, tmp_path, method, with_aux)


@pytest.mark.parametrize("method, with_aux", [("dwa", True), ("gradnorm", True), ("pcgrad", False)])
def test_stateful_weightings_and_a_treatment_train_and_resume_exactly(data_dir, tmp_path, method, with_aux):
    check_training_and_resume(data_dir, tmp_path, method, with_aux)


def check_training_and_resume(data_dir, tmp_path, method, with_aux):
    config = weighting_config(data_dir, method, with_aux)
    input_pipeline.prepare_dataset(config.dataset)
    dataset = input_pipeline.dataset_info(config.dataset)
    model = training.create_model(config, dataset.num_classes)
    schedule = training.run_learning_rate_fn(config, STEPS)

    def fresh_state():
        return training.create_train_state(config, model, jax.random.key(config.seed), schedule)

    state = jax.device_get(fresh_state()[0])  # a host copy: the step donates the states it is given
    tx = fresh_state()[1]
    # donated like the program's step (training.step_functions), which refuses a state holding one buffer twice
    step_fn = jax.jit(functools.partial(training.train_step, model=model, config=config, tx=tx, learning_rate_fn=schedule,
                                        weighting=training.run_weighting(config)), donate_argnums=0)
    iterator = input_pipeline.create_train_iterator(config.dataset, config.input, tasks=tuple(config.tasks),
                                                    global_batch_size=config.batch_size, seed=config.seed)
    batches = [next(iterator) for _ in range(STEPS)]

    straight, straight_metrics = run_steps(step_fn, fresh_state()[0], batches)
    for metrics in straight_metrics:
        assert all(np.isfinite(value) for value in metrics.values()), (method, metrics)
    names = {key[len("weight/"):] for key in straight_metrics[0] if key.startswith("weight/")}
    assert names == set(config.tasks)
    assert_trees_differ(straight.params["main"], state.params["main"])
    if with_aux:
        assert {f"aux_loss/{task}" for task in config.tasks} <= set(straight_metrics[0])
        assert_trees_differ(straight.params["aux"], state.params["aux"])

    halfway, first_metrics = run_steps(step_fn, fresh_state()[0], batches[:RESUME_AT])
    checkpointer = checkpoint_lib.Checkpointer(epath.Path(tmp_path), max_to_keep=2)
    checkpointer.save(RESUME_AT, halfway, {"next_batch": RESUME_AT})
    checkpointer.wait()
    fresh, _ = training.create_train_state(config, model, jax.random.key(config.seed + 1), schedule)
    restored, _ = checkpointer.restore(RESUME_AT, fresh)
    checkpointer.close()
    resumed, second_metrics = run_steps(step_fn, restored, batches[RESUME_AT:])

    assert_trees_equal(resumed, straight)
    for got, want in zip(first_metrics + second_metrics, straight_metrics):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{method}: {key}")
    if jax.tree.leaves(state.weighting_state):  # a stateful weighting: its state moved and was restored
        assert_trees_differ(straight.weighting_state, state.weighting_state)


def test_a_killed_famo_run_resumes_to_the_uninterrupted_result(data_dir, tmp_path, monkeypatch):
    config = weighting_config(data_dir, "famo", with_aux=True)
    programs.run(config, str(tmp_path / "straight"))

    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 3))
    with pytest.raises(KeyboardInterrupt):
        programs.run(config, str(tmp_path / "killed"))
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)
    programs.run(config, str(tmp_path / "killed"))

    assert train_losses(tmp_path / "killed") == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-5)
    weights = {step: {key: value for key, value in record.items() if key.startswith("weight/")}
               for step, record in logged(tmp_path / "straight", "train").items()}
    assert weights[4] != weights[2]  # FAMO's logits moved between the two logged windows
    resumed = {step: {key: value for key, value in record.items() if key.startswith("weight/")}
               for step, record in logged(tmp_path / "killed", "train").items()}
    assert resumed.keys() == weights.keys()
    for step in weights:
        assert resumed[step] == pytest.approx(weights[step], rel=1e-5)
    assert_trees_close(final_params(tmp_path / "killed"), final_params(tmp_path / "straight"), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_written_before_the_weighting_state_existed_resumes(data_dir, tmp_path):
    config = weighting_config(data_dir, "equal", with_aux=False)
    input_pipeline.prepare_dataset(config.dataset)
    model = training.create_model(config, input_pipeline.dataset_info(config.dataset).num_classes)
    schedule = training.run_learning_rate_fn(config, STEPS)
    state, _ = training.create_train_state(config, model, jax.random.key(0), schedule)
    old_layout = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
                  "opt_state": state.opt_state}
    checkpointer = checkpoint_lib.Checkpointer(epath.Path(tmp_path), max_to_keep=2)
    checkpointer.save(1, old_layout, {"next_batch": 1})
    checkpointer.wait()
    fresh, _ = training.create_train_state(config, model, jax.random.key(1), schedule)
    restored, data_state = checkpointer.restore(1, fresh)
    checkpointer.close()
    assert restored.weighting_state == {} and data_state == {"next_batch": 1}
    assert_trees_equal(restored.params, state.params)
