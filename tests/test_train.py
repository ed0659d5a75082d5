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
from auxmtl_jax import train
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


def train_losses(workdir):
    """{step: logged total loss} from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss/total"] for line in lines if line["kind"] == "train"}


def assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


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
    record = train.train_and_evaluate(config, str(tmp_path))
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
    normalised = (image[None].astype(np.float32) - np.asarray(config.input.mean)) / np.asarray(config.input.std)
    expected = predictor.model.predict(predictor.variables, normalised)
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
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    create = input_pipeline.create_train_iterator
    monkeypatch.setattr(input_pipeline, "create_train_iterator", lambda *a, **k: KilledAfter(create(*a, **k), 3))
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "killed"))
    assert checkpoint_lib.Checkpointer(tmp_path / "killed", max_to_keep=3).latest_step() == 2
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(input_pipeline, "create_train_iterator", create)
    train.train_and_evaluate(config, str(tmp_path / "killed"))

    assert train_losses(tmp_path / "killed") == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-5)
    assert_trees_close(final_params(tmp_path / "killed"), final_params(tmp_path / "straight"), rtol=1e-5, atol=1e-6)


def test_four_devices_match_one_device(data_dir, tmp_path):
    """Same global batch on a 4-device mesh and on one device: same losses, BN statistics and updated params.

    One step is compared tightly. Later steps are not: this tiny randomly initialised network is so sensitive
    that merely reordering the examples of a batch on ONE device (a different float summation order, which is
    all the 4-device mesh changes) moves the second update by several percent.
    """
    assert jax.device_count() >= 4
    runs = {}
    for devices in (1, 4):
        config = tiny_config(data_dir, num_devices=devices, num_train_steps=1)
        train.train_and_evaluate(config, str(tmp_path / f"d{devices}"))
        runs[devices] = tmp_path / f"d{devices}"
    losses = {devices: json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0]) for devices, workdir in
              runs.items()}
    for key in ("loss/total", "loss/segmentation", "loss/depth", "loss/normal"):
        assert losses[4][key] == pytest.approx(losses[1][key], rel=1e-5)
    # Updates are ~1e-2 here; a gradient that skipped the cross-device mean would miss by that much, not by 1e-4.
    assert_trees_close(final_params(runs[4]), final_params(runs[1]), rtol=1e-3, atol=1e-4)
    results = {devices: json.loads((workdir / "results.json").read_text()) for devices, workdir in runs.items()}
    assert results[4]["metrics"]["depth"]["abs_err"] == pytest.approx(results[1]["metrics"]["depth"]["abs_err"],
                                                                     rel=1e-3)


def test_workdir_with_another_config_is_refused(data_dir, tmp_path):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
    with pytest.raises(ValueError, match=r"another config.*aux\.tasks"):
        train.train_and_evaluate(tiny_config(data_dir, "strategy=auxi_all"), str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, r"config\.batch_size=0; expected a positive integer"),
    ({"batch_size": 6}, r"config\.batch_size=6 must be divisible by the 4 device"),
    ({"tasks": ("segmentation", "height")}, r"config\.tasks: unknown task\(s\) 'height'"),
    ({"loss_weighting": "dwa"}, r"config\.loss_weighting='dwa' is unknown"),
    ({"model.decoder": "fpn"}, r"fpn"),
    ({"init_from.path": "/nonexistent/run"}, r"config\.init_from\.path='/nonexistent/run'"),
])
def test_bad_config_values_fail_clearly(data_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_config(data_dir, **override), str(tmp_path / "run"))
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
    with pytest.raises(train.NonFiniteLossError, match=r"loss/depth became non-finite at step 3.*checkpoint is step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3).latest_step() == 2


def test_sweep_writes_comparison_table(data_dir, tmp_path):
    config = synthetic_three_task.get_config("runlocal")
    config.dataset.data_dir = data_dir
    config.num_train_steps = 2
    config.analysis.grad_log_every_steps = 1
    records = train.train_and_evaluate(config, str(tmp_path))
    assert set(records) == {"joint", "auxi_all"}
    table = (tmp_path / "comparison.txt").read_text()
    assert "joint" in table and "auxi_all" in table
    figures = sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".png")
    assert figures and all((tmp_path / name).stat().st_size > 0 for name in figures)
