"""End-to-end tests of the training program on the tiny built-in synthetic dataset."""

import json

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import inference
from auxmtl_jax import input_pipeline
from auxmtl_jax import programs
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax import training
from auxmtl_configs import synthetic_three_task


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, variant="strategy=joint", **overrides):
    config = synthetic_three_task.get_config(f"runlocal,{variant}")
    config.dataset.data_dir = data_dir
    config.analysis.grad_log_every_steps = 0
    config.analysis.figures = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def final_params(workdir):
    variables = checkpoint_lib.load_inference_variables(epath.Path(workdir) / checkpoint_lib.INFERENCE_DIR)
    return variables


def logged(workdir, kind):
    """{step: record} of one kind ('train' or 'eval') from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if line["kind"] == kind}


def train_losses(workdir):
    """{step: logged total loss} from a run's metrics.jsonl."""
    return {step: record["loss/total"] for step, record in logged(workdir, "train").items()}


def assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


# One step on 4 vs 1 devices, per tensor (README, "Data parallelism"):
#   |x4 - x1| <= RTOL * (|x1 - x0| + FLOOR * sqrt(n)).
# The floor covers tensors that barely move (BatchNorm means of ~1e-8, whose change is rounding alone).
DEVICE_COUNT_UPDATE_RTOL = 1e-2
DEVICE_COUNT_UPDATE_FLOOR = 1e-5


class KilledAfter:
    """Wraps a train iterator so the run dies (like a kill) when batch `limit + 1` is requested."""

    def __init__(self, iterator, limit):
        self.iterator, self.limit, self.served = iterator, limit, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.served == self.limit:
            raise KeyboardInterrupt("simulated kill")
        self.served += 1
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_auxi_run_writes_results_export_and_logs(data_dir, tmp_path):
    config = tiny_config(data_dir, "strategy=auxi_all", **{"analysis.grad_log_every_steps": 2})
    record = programs.run(config, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == config.num_train_steps and results == json.loads(json.dumps(record))
    assert set(results["metrics"]) == set(config.tasks)
    assert 0.0 <= results["metrics"]["segmentation"]["miou"] <= 1.0
    assert "segmentation" in (tmp_path / "results.txt").read_text()
    exported = final_params(tmp_path)
    assert set(exported) == {"params", "batch_stats"} and "encoder" in exported["params"]
    assert "aux" not in json.dumps(jax.tree.map(lambda x: 0, exported))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(f"aux_loss/{task}" in r for r in train_records for task in config.tasks)
    assert any(key.startswith("grad_aux/") and value > 0 for r in train_records for key, value in r.items())
    assert any(r["kind"] == "eval" and "depth/abs_err" in r for r in records)
    assert list((tmp_path / "tensorboard").iterdir())
    check_inference_export(tmp_path / "inference", tmp_path, config)


def check_inference_export(model_dir, tmp_path, config):
    """The export predicts like the trained `main`, and the CLI writes one coloured PNG per task."""
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    predictor = inference.Predictor.load(model_dir)
    outputs = predictor.predict(image[None])
    assert outputs["segmentation"].shape == (1, 40, 48) and outputs["depth"].shape == (1, 40, 48, 1)
    mean, std = np.asarray(config.input.mean, np.float32), np.asarray(config.input.std, np.float32)
    normalised = (image[None].astype(np.float32) - mean) / std
    expected = jax.jit(predictor.model.predict)(predictor.variables, normalised)  # jitted, as the Predictor is
    np.testing.assert_allclose(outputs["depth"], expected["depth"], rtol=1e-5, atol=1e-6)
    inference.main(["--model", str(model_dir), "--output", str(tmp_path / "preds"), str(tmp_path / "photo.png")])
    for task in config.tasks:
        with Image.open(tmp_path / "preds" / f"photo_{task}.png") as written:
            assert written.size == (48, 40) and written.mode == "RGB"
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        inference.predict_files(str(model_dir), [str(tmp_path / "missing.png")], str(tmp_path / "preds2"))
    assert not (tmp_path / "preds2").exists()


def test_resume_after_kill_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir)
    programs.run(config, str(tmp_path / "straight"))

    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 3))
    with pytest.raises(KeyboardInterrupt):
        programs.run(config, str(tmp_path / "killed"))
    assert checkpoint_lib.Checkpointer(tmp_path / "killed", max_to_keep=3).latest_step() == 2
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)
    programs.run(config, str(tmp_path / "killed"))

    assert train_losses(tmp_path / "killed") == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-5)
    assert_trees_close(final_params(tmp_path / "killed"), final_params(tmp_path / "straight"), rtol=1e-5, atol=1e-6)


@pytest.mark.exhaustive  # float32 bounds; CI checks the same gradient in float64: test_data_parallel_equivalence
def test_one_step_on_four_devices_matches_one_device(data_dir, tmp_path):
    """The guarantee stated in the README ("Data parallelism"): the same global batch on 1 and on 4 devices gives
    the same losses to 1e-5 and, for every parameter and BatchNorm tensor, updates that differ by less than
    DEVICE_COUNT_UPDATE_RTOL of the update's own size (L2 norms; measured: 1.3e-3 at worst).

    Only float summation order differs between the two. Element-wise it can matter more: a weight behind a
    near-constant BatchNorm channel differed by 0.9% in one of 432 elements. A gradient that skipped the
    cross-device mean would miss by far more than the bound (its update would be off by tens of percent).
    """
    assert jax.device_count() >= 4
    runs = {}
    for devices in (1, 4):
        config = tiny_config(data_dir, num_devices=devices, num_train_steps=1)
        programs.run(config, str(tmp_path / f"d{devices}"))
        runs[devices] = tmp_path / f"d{devices}"
    losses = {devices: json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0]) for devices, workdir in
              runs.items()}
    for key in ("loss/total", "loss/segmentation", "loss/depth", "loss/normal"):
        assert losses[4][key] == pytest.approx(losses[1][key], rel=1e-5)

    _, model, mesh = training.prepare_run(config)
    initial = training.main_variables(training.create_sharded_train_state(config, model, mesh)[0])
    initial = jax.tree.map(np.asarray, initial)
    one, four = final_params(runs[1]), final_params(runs[4])
    assert jax.tree.structure(one) == jax.tree.structure(four) == jax.tree.structure(initial)
    for start, x, y in zip(jax.tree.leaves(initial), jax.tree.leaves(one), jax.tree.leaves(four)):
        scale = np.linalg.norm(x - start) + DEVICE_COUNT_UPDATE_FLOOR * np.sqrt(x.size)
        assert np.linalg.norm(y - x) <= DEVICE_COUNT_UPDATE_RTOL * scale, (x.shape, np.linalg.norm(y - x), scale)
    results = {devices: json.loads((workdir / "results.json").read_text()) for devices, workdir in runs.items()}
    assert results[4]["metrics"]["depth"]["abs_err"] == pytest.approx(results[1]["metrics"]["depth"]["abs_err"],
                                                                     rel=1e-3)


def test_workdir_with_another_config_is_refused(data_dir, tmp_path):
    programs.run(tiny_config(data_dir), str(tmp_path))
    with pytest.raises(ValueError, match=r"another config.*aux\.tasks"):
        programs.run(tiny_config(data_dir, "strategy=auxi_all"), str(tmp_path))


def test_a_workdir_saved_before_a_config_key_existed_resumes_with_its_old_behaviour(data_dir, tmp_path):
    """Upgrading must not strand runs: keys added later (ADDED_KEYS) are accepted at the value that reproduces the
    old behaviour, and refused at any other value."""
    config = tiny_config(data_dir)
    programs.run(config, str(tmp_path))
    path = tmp_path / workdir_lib.CONFIG_FILE
    saved = json.loads(path.read_text())
    for key in workdir_lib.ADDED_KEYS:
        *groups, leaf = key.split(".")
        node = saved
        for group in groups:
            node = node.get(group, {})
        node.pop(leaf, None)
    # nested keys (weighting.dwa.temperature) are removed too
    assert not [key for key in workdir_lib.flatten_config(saved) if key.startswith("weighting.")]
    path.write_text(json.dumps(saved))
    workdir_lib.check_workdir_config(tmp_path, config, resume_step=4)
    path.write_text(json.dumps(saved))
    config.optimizer.schedule = "constant"
    with pytest.raises(ValueError, match=r"another config \(optimizer\.schedule: None -> 'constant'\)"):
        workdir_lib.check_workdir_config(tmp_path, config, resume_step=4)


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, r"config\.batch_size=0; expected a positive integer"),
    ({"batch_size": 6}, r"config\.batch_size=6 must be divisible by the 4 device"),
    ({"tasks": ("segmentation", "height")}, r"config\.tasks: unknown task\(s\) 'height'"),
    ({"loss_weighting": "uncertainty"}, r"config\.loss_weighting='uncertainty' is unknown"),
    ({"model.decoder": "fpn"}, r"fpn"),
    ({"init_from.path": "/nonexistent/run"}, r"config\.init_from\.path='/nonexistent/run'"),
    ({"accept_changed_keys": "optimizer.lr"}, r"accept_changed_keys names 'optimizer\.lr', which is no config key"),
])
def test_bad_config_values_fail_clearly(data_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        programs.run(tiny_config(data_dir, **override), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_non_finite_loss_stops_naming_step_and_task(data_dir, tmp_path, monkeypatch):
    create = input_pipeline.create_train_iterator

    class PoisonDepthAt:
        def __init__(self, iterator, step):
            self.iterator, self.step, self.served = iterator, step, 0

        def __next__(self):
            batch = next(self.iterator)
            self.served += 1
            if self.served == self.step:
                batch = dict(batch, depth=np.full_like(batch["depth"], np.inf))
            return batch

        def get_state(self):
            return self.iterator.get_state()

        def set_state(self, state):
            self.iterator.set_state(state)

    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: PoisonDepthAt(create(*a, **k), 3))
    config = tiny_config(data_dir, log_every_steps=1)
    with pytest.raises(training.NonFiniteError, match=r"loss/depth became non-finite at step 3 \(its batch is number 2 "
                                                  r"of the training data order for seed 0.*next_batch=2\).*"
                                                  r"the last checkpoint, step 2, shows no sign of divergence.*"
                                                  r"--config\.optimizer\.learning_rate=0\.005 "
                                                  r"--config\.accept_changed_keys=optimizer\.learning_rate\.$"):
        programs.run(config, str(tmp_path))
    assert checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3).latest_step() == 2
    assert not (tmp_path / workdir_lib.DIVERGED_DIR).exists()  # a bad batch, no divergence: nothing moved


def test_sweep_writes_comparison_table(data_dir, tmp_path):
    config = synthetic_three_task.get_config("runlocal")
    config.dataset.data_dir = data_dir
    config.num_train_steps = 2
    config.analysis.grad_log_every_steps = 1
    records = programs.run(config, str(tmp_path))
    assert set(records) == {"joint", "auxi_all"}
    table = (tmp_path / "comparison.txt").read_text()
    assert "joint" in table and "auxi_all" in table
    figures = sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".png")
    assert figures and all((tmp_path / name).stat().st_size > 0 for name in figures)


def test_every_evaluation_in_one_process_equals_a_fresh_evaluation_of_its_checkpoint(data_dir, tmp_path):
    """Three evaluations in one run (the paper configs evaluate every 5k-10k steps), each as if run alone."""
    config = tiny_config(data_dir, num_train_steps=6, eval_every_steps=2, checkpoint_every_steps=2,
                         max_checkpoints_to_keep=3)
    programs.run(config, str(tmp_path))
    evaluations = logged(tmp_path, "eval")
    assert sorted(evaluations) == [2, 4, 6]
    for step, logged_metrics in evaluations.items():
        fresh = training.evaluate_checkpoint(config, str(tmp_path), step)
        for task, values in fresh.items():
            for metric, value in values.items():
                assert logged_metrics[f"{task}/{metric}"] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, metric)
    assert evaluations[2]["depth/abs_err"] != evaluations[6]["depth/abs_err"]  # three different states evaluated
    with pytest.raises(ValueError, match=r"no checkpoint of step 3; it holds steps \[2, 4, 6\]"):
        training.evaluate_checkpoint(config, str(tmp_path), 3)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr 1e39 -> float32 inf
def test_non_finite_parameters_are_never_saved(data_dir, tmp_path):
    """A step whose loss is finite but whose update overflows must not be checkpointed as 'good'."""
    config = tiny_config(data_dir, checkpoint_every_steps=1, **{"optimizer.learning_rate": 1e39})
    with pytest.raises(training.NonFiniteError, match=r"train state became non-finite by step 1 \(first non-finite "
                                                   r"leaf: params/main/.*no checkpoint was saved"):
        programs.run(config, str(tmp_path))
    assert checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3).latest_step() is None


def test_first_non_finite_leaf_names_the_path():
    tree = {"params": {"a": np.ones(3, np.float32), "b": {"kernel": np.array([1.0, np.inf], np.float32)}},
            "step": np.int32(3)}
    assert training.first_non_finite_leaf(tree) == "params/b/kernel"
    tree["params"]["b"]["kernel"][1] = 0.0
    assert training.first_non_finite_leaf(tree) is None


def test_resume_with_an_accepted_config_change_continues_and_records_it(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir)
    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 3))
    with pytest.raises(KeyboardInterrupt):
        programs.run(config, str(tmp_path))
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)

    changed = tiny_config(data_dir, **{"optimizer.learning_rate": 0.003})
    with pytest.raises(ValueError, match=r"(?s)optimizer\.learning_rate: 0\.05 -> 0\.003.*"
                                         r"--config\.accept_changed_keys=optimizer\.learning_rate.*"
                                         r"--config\.init_from\.path="):
        programs.run(changed, str(tmp_path))
    with pytest.raises(ValueError, match=r"accept_changed_keys names 'optimizer\.learning_rat', which is no "
                                         r"config key"):
        programs.run(tiny_config(data_dir, accept_changed_keys="optimizer.learning_rat"), str(tmp_path))

    changed.accept_changed_keys = "optimizer.learning_rate"
    programs.run(changed, str(tmp_path))
    schedule = training.create_learning_rate_fn(changed.optimizer, changed.num_train_steps)
    assert logged(tmp_path, "train")[4]["lr"] == pytest.approx(float(np.mean([schedule(2), schedule(3)])), rel=1e-6)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["optimizer"]["learning_rate"] == 0.003
    assert saved["config_changes"] == [{"step": 2, "changes": {"optimizer.learning_rate": [0.05, 0.003]}}]

    # Reporting keys may change on resume without being accepted: Δm% against corrected references.
    results = json.loads((tmp_path / "results.json").read_text())
    changed.reference_results = results["metrics"]
    programs.run(changed, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["delta_m"] == pytest.approx(0.0, abs=1e-6)
