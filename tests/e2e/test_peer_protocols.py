"""The peer-protocol configs train end to end at their `runlocal` size on fake data written in the peers' own file
layouts (mtan's NYUv2 .npy folders, mtan's Cityscapes .npy folders), built by our TFDS builders on the way.

These replace the synthetic-data runs of the same configs in test_configs (CI trains each config once)."""

import pytest

from auxmtl_jax import programs
from test_cityscapes import _write_release as write_cityscapes_release
from test_configs import get_config
from test_nyu_v2 import _write_mtan as write_mtan_nyuv2
from test_train import logged

pytestmark = pytest.mark.slow
PEER_LAYOUT_CONFIGS = ("libmtl_nyuv2", "libmtl_cityscapes", "cityscapes_two_task")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """{dataset name: manual_dir} of fake releases; one TFDS data dir for both builds."""
    nyuv2 = tmp_path_factory.mktemp("nyuv2_mtan")
    write_mtan_nyuv2(nyuv2, counts={"train": 6, "val": 3})
    cityscapes = tmp_path_factory.mktemp("cityscapes_mtan")
    write_cityscapes_release(cityscapes)
    return {"nyu_v2": str(nyuv2), "cityscapes": str(cityscapes),
            "data_dir": str(tmp_path_factory.mktemp("tfds"))}


def on_fake_release(config, releases):
    config.dataset.manual_dir = releases[config.dataset.name]
    config.dataset.data_dir = releases["data_dir"]
    config.dataset.prepare = True
    config.analysis.figures = False
    return config


# CI trains cityscapes_two_task here and libmtl_nyuv2 in the test below (the same protocol as libmtl_cityscapes).
@pytest.mark.parametrize("module", [pytest.param(module, marks=() if module == "cityscapes_two_task" else
                                                 pytest.mark.exhaustive) for module in PEER_LAYOUT_CONFIGS])
def test_runlocal_trains_on_the_peer_layout(module, releases, tmp_path):
    config = on_fake_release(get_config(module, "runlocal"), releases)
    record = programs.run(config, str(tmp_path))
    assert set(record["metrics"]) == set(config.tasks) == set(config.aux.tasks)
    assert record["report"] == "final" and record["reduction"] == "per_pixel"
    if module.startswith("libmtl"):
        learning_rates = {step: line["lr"] for step, line in logged(tmp_path, "train").items()}
        assert learning_rates == {1: pytest.approx(1e-4), 2: pytest.approx(5e-5)}  # StepLR x0.5, boundary at 1


def test_libmtl_joint_with_mtan_reporting_on_the_nyuv2_layout(releases, tmp_path):
    """`libmtl_nyuv2:runlocal` with the docs' mtan-style options: HPS + EW, per-batch depth/normal metrics, the mean
    of the last two evaluations, the model selected on a validation slice of train."""
    config = on_fake_release(get_config("libmtl_nyuv2", "runlocal,strategy=joint"), releases)
    config.eval_every_steps = 1
    config.evaluation.average_last = 2
    config.evaluation.reduction = "per_batch"
    config.evaluation.report = "last_mean"
    config.dataset.train_split, config.dataset.validation_split = "train[:4]", "train[4:]"
    record = programs.run(config, str(tmp_path))
    learning_rates = {step: line["lr"] for step, line in logged(tmp_path, "train").items()}
    assert learning_rates == {1: pytest.approx(1e-4), 2: pytest.approx(5e-5)}  # Adam, StepLR x0.5 at step 1
    tests = logged(tmp_path, "eval")
    assert sorted(tests) == [1, 2] and sorted(logged(tmp_path, "validation")) == [1, 2]
    assert record["metrics"]["normal"]["median"] == pytest.approx(
        (tests[1]["normal/median"] + tests[2]["normal/median"]) / 2, rel=1e-12)
    assert record["reduction"] == "per_batch" and record["selection"]["step"] in (1, 2)
    assert record["report"] == "last_mean" and record["reduction_description"].startswith("per_batch")
    assert set(record["metrics"]) == {"segmentation", "depth", "normal"} and config.aux.tasks == ()
