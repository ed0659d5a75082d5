"""Pre-flight checks of issue 28 at unit level: every float of a config is finite, every path field is the kind of
thing it must be, and a failed check writes nothing (the real commands: tests/e2e/test_bad_inputs.py)."""

from __future__ import annotations

import importlib
import math
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from auxmtl_configs import synthetic_three_task
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.errors import UserError
from auxmtl_jax.training import checks

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def tiny_config():
    return synthetic_three_task.get_config("runlocal,strategy=joint")


def listing(root: pathlib.Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.parametrize("key, value, shown", [
    ("weighting.dwa.temperature", math.nan, "nan"),
    ("optimizer.learning_rate", math.nan, "nan"),
    ("optimizer.momentum", math.inf, "inf"),
    ("deep_supervision.weight", -math.inf, "-inf"),
    ("weighting.nash_mtl.max_norm", math.inf, "inf"),  # "no limit" is max_norm=0, never inf
])
def test_a_non_finite_float_anywhere_is_one_error_naming_the_full_key(key, value, shown):
    config = tiny_config()
    *groups, leaf = key.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[leaf] = value
    with pytest.raises(UserError) as raised:
        checks.validate_config(config)
    assert str(raised.value) == f"config.{key}={shown}; expected a finite number."


def test_floats_inside_tuples_dicts_and_numpy_values_are_checked_too():
    config = ml_collections.ConfigDict({"input": {"mean": (1.0, float("inf"), 3.0)}, "n": 1, "name": "nan"})
    assert list(checks.non_finite_numbers(config)) == [("config.input.mean[1]", math.inf)]
    config = ml_collections.ConfigDict({"reference_results": {"depth": {"abs_err": np.float32("nan")}}})
    assert [key for key, _ in checks.non_finite_numbers(config)] == ["config.reference_results.depth.abs_err"]
    assert list(checks.non_finite_numbers({"a": np.array([1.0, -np.inf])})) == [("config.a", -math.inf)]
    assert list(checks.non_finite_numbers({"a": [1, 2.5, True, None, "inf"]})) == []


@pytest.mark.parametrize("module", sorted(path.stem for path in CONFIGS.glob("*.py")
                                          if path.stem not in ("__init__", "common", "experiments")))
def test_no_shipped_config_holds_a_non_finite_float(module):
    """The rule "no field takes inf" holds for every shipped config (a "no limit" is spelled 0 or None)."""
    get_config = importlib.import_module(f"auxmtl_configs.{module}").get_config
    arg = "from=workdirs/pre" if module == "nyuv2_finetune" else None
    assert list(checks.non_finite_numbers(get_config(arg))) == []


def test_output_dir_kinds(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = listing(tmp_path)
    workdir_lib.check_output_dir(tmp_path / "dir", "--workdir")
    workdir_lib.check_output_dir(tmp_path / "new" / "deeper", "--workdir")
    cases = {
        "file": r"^--workdir=.*/file is a file; expected a directory \(created if missing\)\.$",
        "file/run": r"^--workdir=.*/file/run cannot be created: .*/file is a file; expected a directory",
        "dangling": r"^--workdir=.*/dangling is a broken symbolic link; expected a directory",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            workdir_lib.check_output_dir(tmp_path / name, "--workdir")
    assert listing(tmp_path) == before  # nothing created


def test_output_dir_without_write_permission(tmp_path, monkeypatch):
    """Permission is asked with os.access (a read-only mount counts; the real thing: tests/e2e)."""
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"^--output=.*/dir is not writable \(permission denied or a read-only file "
                                        r"system\); expected a directory this user may write in\.$"):
        workdir_lib.check_output_dir(tmp_path / "dir", "--output")
    with pytest.raises(UserError, match=r"^--workdir=.*/dir/a/b cannot be created: .*/dir is not writable"):
        workdir_lib.check_output_dir(tmp_path / "dir" / "a" / "b", "--workdir")
    assert listing(tmp_path) == ["dir"]


def test_dataset_dirs_are_checked_for_their_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    config = tiny_config()
    config.dataset.data_dir = str(tmp_path / "not_yet" / "tfds")  # created by the build
    config.dataset.manual_dir = str(tmp_path / "raw")  # read only by a build, which says when it is missing
    checks.check_dataset_dirs(config)
    config.dataset.data_dir = str(tmp_path / "file")
    with pytest.raises(UserError, match=r"^config\.dataset\.data_dir=.*/file is a file; expected a directory\.$"):
        checks.check_dataset_dirs(config)
    config.dataset.data_dir = str(tmp_path / "file" / "tfds")
    with pytest.raises(UserError, match=r"config\.dataset\.data_dir=.*/file/tfds cannot be created: .*/file is a file"):
        checks.check_dataset_dirs(config)
    config.dataset.data_dir = str(tmp_path)
    config.dataset.manual_dir = str(tmp_path / "file")
    with pytest.raises(UserError, match=r"^config\.dataset\.manual_dir=.*/file is a file; expected a directory\.$"):
        checks.check_dataset_dirs(config)
    assert listing(tmp_path) == ["file"]


def test_reference_results_that_is_a_directory(tmp_path):
    config = tiny_config()
    config.reference_results = str(tmp_path)
    with pytest.raises(UserError, match=r"config\.reference_results='.*' is a directory; expected a run's results"):
        checks.reference_results(config)


def test_a_dataset_build_checks_it_may_write_before_it_starts(tmp_path, monkeypatch):
    from auxmtl_jax import input_pipeline

    config = tiny_config()
    config.dataset.data_dir = str(tmp_path / "tfds")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"^config\.dataset\.data_dir: the folder the build writes=.*/tfds/"
                                        r"synthetic_scenes/tiny cannot be created: .* is not writable"):
        input_pipeline.prepare_dataset(config.dataset)
    assert listing(tmp_path) == []
