"""Verified checkpoints: every saved step gets an integrity record; a damaged step (truncated or garbled file,
deleted metadata, changed iterator state) is logged in one line, moved aside and the newest intact step restored;
when none is intact the run stops with one clear error."""

import json
import logging
import shutil

import pytest
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import programs
from test_train import tiny_config

STEPS = 6  # checkpoints at 2, 4 and 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def config_of(data_dir):
    return tiny_config(data_dir, **{"num_train_steps": STEPS, "checkpoint_every_steps": 2, "eval_every_steps": STEPS,
                                    "max_checkpoints_to_keep": 3})


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    record = programs.run(config_of(data_dir), str(workdir))
    return workdir, record


def flat(metrics):
    return {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}


def largest_state_file(step_dir):
    return max((path for path in (step_dir / "state").rglob("*") if path.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = largest_state_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(step_dir):
    path = largest_state_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes((byte + 1) % 256 for byte in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def change_iterator_state(step_dir):
    path = next((step_dir / checkpoint_lib.DATA_ITEM).glob("process_*.json"))
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "damaged": True}, sort_keys=True))


def test_every_kept_checkpoint_has_a_matching_integrity_record(finished_run):
    workdir, _ = finished_run
    records = sorted(int(path.stem) for path in (workdir / checkpoint_lib.INTEGRITY_DIR).glob("*.json"))
    assert records == [2, 4, 6]
    for step in records:
        assert checkpoint_lib.integrity_problem(workdir / checkpoint_lib.CHECKPOINT_DIR / str(step),
                                                workdir / checkpoint_lib.INTEGRITY_DIR / f"{step}.json") is None


DAMAGES = (truncate, garble, delete_metadata, change_iterator_state)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_every_kind_of_damage_is_detected_by_the_integrity_record(damage, finished_run, tmp_path):
    original, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    step_dir = workdir / checkpoint_lib.CHECKPOINT_DIR / str(STEPS)
    record = workdir / checkpoint_lib.INTEGRITY_DIR / f"{STEPS}.json"
    assert checkpoint_lib.integrity_problem(step_dir, record) is None
    damage(step_dir)
    assert checkpoint_lib.integrity_problem(step_dir, record)


# CI retrains after one kind of damage; what differs between kinds is detection, checked for each above.
@pytest.mark.parametrize("damage", [pytest.param(damage, marks=() if damage is truncate else pytest.mark.exhaustive)
                                    for damage in DAMAGES], ids=lambda damage: damage.__name__)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, finished_run, data_dir, tmp_path,
                                                                     caplog):
    original, record = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    damage(workdir / checkpoint_lib.CHECKPOINT_DIR / str(STEPS))
    caplog.set_level(logging.WARNING, logger="auxmtl_jax")
    again = programs.run(config_of(data_dir), str(workdir))
    warnings = [entry.getMessage() for entry in caplog.records if "is damaged" in entry.getMessage()]
    assert len(warnings) == 1 and f"checkpoint step {STEPS} of" in warnings[0]
    assert "\n" not in warnings[0]
    aside = list((workdir / checkpoint_lib.DAMAGED_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"{STEPS}-") and (aside[0] / "checkpoint").is_dir()
    # retrained from step 4 on the same data: the same final state and results as the undamaged run
    assert flat(again["metrics"]) == pytest.approx(flat(record["metrics"]), rel=1e-5)
    kept = sorted(int(path.name) for path in (workdir / checkpoint_lib.CHECKPOINT_DIR).iterdir()
                  if path.name.isdigit())
    assert kept == [2, 4, 6]
    assert checkpoint_lib.integrity_problem(workdir / checkpoint_lib.CHECKPOINT_DIR / str(STEPS),
                                            workdir / checkpoint_lib.INTEGRITY_DIR / f"{STEPS}.json") is None


def test_every_checkpoint_damaged_stops_with_one_clear_error(finished_run, data_dir, tmp_path):
    original, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    for step in (2, 4, 6):
        garble(workdir / checkpoint_lib.CHECKPOINT_DIR / str(step))
    results = (workdir / "results.json").read_bytes()
    with pytest.raises(ValueError, match=r"every checkpoint of .* is damaged \(steps \[2, 4, 6\].*fresh --workdir"):
        programs.run(config_of(data_dir), str(workdir))
    assert (workdir / "results.json").read_bytes() == results  # a finished run keeps its results
    assert len(list((workdir / checkpoint_lib.DAMAGED_DIR).iterdir())) == 3


def test_a_checkpoint_without_its_record_restores_unverified(finished_run, data_dir, tmp_path, caplog):
    """A run killed between a commit and its record: the step is restored (one warning line), not discarded."""
    original, record = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    (workdir / checkpoint_lib.INTEGRITY_DIR / f"{STEPS}.json").unlink()
    caplog.set_level(logging.WARNING, logger="auxmtl_jax")
    again = programs.run(config_of(data_dir), str(workdir))
    assert any("has no integrity record" in entry.getMessage() and "restored it unverified" in entry.getMessage()
               for entry in caplog.records)
    assert not (workdir / checkpoint_lib.DAMAGED_DIR).exists()
    assert flat(again["metrics"]) == pytest.approx(flat(record["metrics"]), rel=1e-5)
    assert epath.Path(workdir / checkpoint_lib.CHECKPOINT_DIR / str(STEPS)).exists()
