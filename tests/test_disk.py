"""A full disk, writer by writer (docs/reliability.md, "A full disk"): each write a run makes that fails for lack of
space is one `DiskFullError` naming the path and the bytes, and leaves what was there before intact.

Each writer test runs twice: with the writes fault-injected (an `OSError` ENOSPC after half the bytes: everywhere)
and on a real full tmpfs (as root where a private mount namespace may mount one; skipped elsewhere). The whole run
(`run.py` on a disk that fills up mid-checkpoint, then resumed) is tests/e2e/test_full_disk.py.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import comparison
from auxmtl_jax import disk
from auxmtl_jax import errors
from auxmtl_jax import reporting
from auxmtl_jax import workdir as workdir_lib
from auxmtl_jax.training import evaluate
from test_full_disk import tmpfs_or_skip

PAGE = 4096  # a tmpfs allocates whole pages
# What tensorstore raised (through orbax) when a checkpoint of a run filled a tmpfs, verbatim.
TENSORSTORE_ERROR = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/tmp/t/checkpoints/'
                     '2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/tmp/t/'
                     'checkpoints/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/b25e19cf": '
                     "Failed to write 5382144 bytes to file 7: No space left on device [os_error_code='28']")


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def test_a_full_disk_is_recognised_in_every_form_it_arrives_in():
    assert disk.full_errno(enospc("x")) == errno.ENOSPC
    assert disk.full_errno(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))) == errno.EDQUOT
    assert disk.full_errno(ValueError(TENSORSTORE_ERROR)) == errno.ENOSPC
    assert disk.full_errno(ValueError("... Disk quota exceeded [os_error_code='122']")) == errno.EDQUOT
    try:
        try:
            raise enospc("x")
        except OSError as error:
            raise RuntimeError("a background save failed") from error
    except RuntimeError as wrapped:
        assert disk.full_errno(wrapped) == errno.ENOSPC
    for other in (OSError(errno.EACCES, "Permission denied"), ValueError("bad value"), FileNotFoundError("x"),
                  errors.UserError("a config value that mentions No space left on device")):
        assert disk.full_errno(other) is None


def test_the_message_names_the_path_the_bytes_needed_and_free_and_how_to_go_on(monkeypatch, tmp_path):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10**6, 587_700, 412_300))
    with pytest.raises(disk.DiskFullError) as raised:
        with disk.space_for(tmp_path / "results.json", "writing results.json", 1234):
            raise enospc(tmp_path / ".results.json.tmp")
    assert str(raised.value) == (f"the disk holding {tmp_path}/results.json is full: writing results.json needs about "
                                 "1.2 kB, 412.3 kB are free; free space and re-run the same command to resume from "
                                 "the last checkpoint.")
    assert isinstance(raised.value, errors.UserError) and isinstance(raised.value.__cause__, OSError)
    with pytest.raises(disk.DiskFullError, match=r"is over its disk quota: .* needs about 3\.1 MB \(the train state\)"):
        with disk.space_for(tmp_path, "saving", 3_100_000, what="the train state"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(PermissionError):  # anything else passes unchanged
        with disk.space_for(tmp_path, "saving", 1):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert [disk.format_bytes(n) for n in (0, 999, 1000, 3_149_000, 12 * 10**9)] == [
        "0 bytes", "999 bytes", "1.0 kB", "3.1 MB", "12.0 GB"]


class InjectedFullDisk:
    """Writes under `root` fail with ENOSPC after half their bytes are written (os.write: appends; epath's
    write_text/write_bytes: atomic writes and the export)."""

    def __init__(self, root: pathlib.Path, monkeypatch):
        self.root, self._monkeypatch = root, monkeypatch

    def _mine(self, path) -> bool:
        return os.fspath(path).startswith(os.fspath(self.root))

    @contextlib.contextmanager
    def full(self):
        real_write, cut = os.write, set()

        def write(handle, data):
            if not self._mine(os.readlink(f"/proc/self/fd/{handle}")):
                return real_write(handle, data)
            if handle in cut:
                raise enospc(os.readlink(f"/proc/self/fd/{handle}"))
            cut.add(handle)
            return real_write(handle, bytes(data[: max(len(data) // 2, 1)]))

        def half_then_full(real, mode):
            def fake(path, data, *args, **kwargs):
                if not self._mine(path):
                    return real(path, data, *args, **kwargs)
                with open(os.fspath(path), mode) as stream:
                    stream.write(data[: len(data) // 2])
                raise enospc(path)
            return fake

        local = type(epath.Path(self.root))
        with self._monkeypatch.context() as patch:
            patch.setattr(os, "write", write)
            patch.setattr(local, "write_text", half_then_full(local.write_text, "w"))
            patch.setattr(local, "write_bytes", half_then_full(local.write_bytes, "wb"))
            yield


class TmpfsFullDisk:
    """`root` on a real tmpfs; `full` fills it with a ballast file."""

    def __init__(self, tmpfs):
        self._tmpfs = tmpfs
        self.root = tmpfs.view / "work"
        self.root.mkdir()

    @contextlib.contextmanager
    def full(self):
        ballast = self._tmpfs.fill()
        try:
            yield
        finally:
            ballast.unlink()


@pytest.fixture(params=["injected", "tmpfs"])
def medium(request, tmp_path, monkeypatch):
    if request.param == "injected":
        (tmp_path / "work").mkdir()
        yield InjectedFullDisk(tmp_path / "work", monkeypatch)
        return
    tmpfs = tmpfs_or_skip(tmp_path / "disk", size=4 << 20)
    try:
        yield TmpfsFullDisk(tmpfs)
    finally:
        tmpfs.close()


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file()}


def needs(path, what: str, count: int, resume: str = "the last checkpoint") -> str:
    return (rf"^the disk holding {re.escape(os.fspath(path))} is full: {what} needs about "
            rf"{re.escape(disk.format_bytes(count))}, .* are free; free space and re-run the same command to resume "
            rf"from {resume}\.$")


def test_metrics_and_tensorboard_appends_are_whole_lines_or_nothing(medium):
    writer = reporting.MetricWriter(medium.root)
    writer.write(2, "train", {"loss/total": 1.5})
    writer.write(2, "checkpoint", {"param_norm": 3.0})
    size = (medium.root / "metrics.jsonl").stat().st_size  # a line that ends the file at a page boundary, so that
    padding = -(size + len(json.dumps({"step": 2, "kind": "pad", "": 0.0}) + "\n")) % PAGE  # the next one needs
    writer.write(2, "pad", {"x" * padding: 0.0})  # a new page on a tmpfs
    before = snapshot(medium.root)
    assert len(before["metrics.jsonl"]) % PAGE == 0
    line = json.dumps({"step": 4, "kind": "train", "loss/total": 1.25}) + "\n"
    with medium.full():
        with pytest.raises(disk.DiskFullError,
                           match=needs(medium.root / "metrics.jsonl", "appending a train line to metrics.jsonl",
                                       len(line))):
            writer.write(4, "train", {"loss/total": 1.25})
        assert snapshot(medium.root) == before  # the half line was cut back off
        with pytest.raises(disk.DiskFullError, match=needs(medium.root / "metrics.jsonl", "writing metrics.jsonl",
                                                            len(before["metrics.jsonl"]))):
            writer.truncate_after(2)  # rewritten on resume: atomically
        assert snapshot(medium.root) == before
        with pytest.raises(disk.DiskFullError, match="tensorboard/events.out.tfevents.* is full: writing "
                                                     "TensorBoard events needs about"):
            reporting.MetricWriter(medium.root / "another_run")  # a new event file: its first record does not fit
    writer.write(4, "train", {"loss/total": 1.25})
    writer.truncate_after(2)
    assert [json.loads(text)["kind"] for text in (medium.root / "metrics.jsonl").read_text().splitlines()] == [
        "train", "checkpoint", "pad"]
    event_files = sorted(medium.root.rglob("events.out.tfevents.*"))
    assert len(event_files) == 2
    for events in event_files:  # every event file holds whole records
        data, position = events.read_bytes(), 0
        while position < len(data):
            position += 8 + 4 + int(np.frombuffer(data[position:position + 8], np.uint64)[0]) + 4
        assert position == len(data)


def test_json_lines_are_read_back_without_a_line_a_kill_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert disk.read_json_lines(path) == []  # no file yet
    disk.append(path, b'{"step": 1}\n[2, 3]\n\n{"step": 2}\n', "appending")
    path.write_text(path.read_text() + '{"step": 3, "lo')
    assert disk.read_json_lines(path) == [{"step": 1}, {"step": 2}]  # neither a list nor half a line


def test_results_of_a_finished_run_survive_a_full_disk(medium):
    results = {"depth": {"abs_err": 0.5}}
    evaluate.write_results(epath.Path(medium.root), "joint", 6, results, None)
    before = snapshot(medium.root)
    record = {"name": "joint", "step": 8, "metrics": {"depth": {"abs_err": 0.25}}, "delta_m": None,
              "delta_m_convention": comparison.DELTA_M_DEFAULT}
    with medium.full():
        with pytest.raises(disk.DiskFullError,
                           match=needs(medium.root / "results.json", "writing results.json",
                                       len(json.dumps(record, indent=2)))):
            evaluate.write_results(epath.Path(medium.root), "joint", 8, record["metrics"], None)
    assert snapshot(medium.root) == before  # results.json intact, no temporary file left
    with medium.full():
        with pytest.raises(disk.DiskFullError, match=needs(medium.root / "config.json", "writing config.json", 2)):
            workdir_lib.write_text_atomic(epath.Path(medium.root) / "config.json", "{}")
    assert snapshot(medium.root) == before


def test_a_failed_export_keeps_the_previous_one(medium):
    variables = {"params": {"w": np.arange(6, dtype=np.float32)}}
    checkpoint_lib.export_inference(medium.root, variables, {"model": {}, "tasks": {"depth": 1}})
    before = snapshot(medium.root)
    with medium.full():
        with pytest.raises(disk.DiskFullError, match=rf"the disk holding {re.escape(os.fspath(medium.root))}/inference "
                                                     r"is full: exporting the model needs about \d+ bytes"):
            checkpoint_lib.export_inference(medium.root, {"params": {"w": np.ones(6, np.float32)}},
                                            {"model": {}, "tasks": {"depth": 1}})
    assert snapshot(medium.root) == before and sorted(path.name for path in medium.root.iterdir()) == ["inference"]


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_step(tmp_path, monkeypatch):
    """Fault-injected in orbax's save (the real background failure on a tmpfs: tests/e2e/test_full_disk.py)."""
    state = {"w": jnp.arange(1000, dtype=jnp.float32)}
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3)
    checkpointer.save(1, state, {"next_batch": 1})
    checkpointer.wait()
    save = checkpoint_lib.ProcessLocalJsonHandler.save

    def full_at_step_2(handler, directory, args):
        if "/2.orbax-checkpoint-tmp" in os.fspath(directory):
            raise enospc(directory)
        return save(handler, directory, args)

    monkeypatch.setattr(checkpoint_lib.ProcessLocalJsonHandler, "save", full_at_step_2)
    on_disk = sum(path.stat().st_size for path in (tmp_path / "checkpoints" / "1").rglob("*") if path.is_file())
    with pytest.raises(disk.DiskFullError, match=(
            rf"^the disk holding {re.escape(os.fspath(tmp_path / 'checkpoints'))} is full: saving checkpoint step 2 "
            rf"needs about {re.escape(disk.format_bytes(on_disk))} \(as checkpoint step 1 took; the train state is "
            r"4\.0 kB\), .* are free; free space and re-run the same command to resume from step 1\.$")):
        checkpointer.save(2, state, {"next_batch": 2})
        checkpointer.wait()
    checkpointer.close()
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert checkpoint_lib.integrity_problem(tmp_path / "checkpoints" / "1",
                                            tmp_path / "checkpoint_integrity" / "1.json") is None
    resumed = checkpoint_lib.Checkpointer(tmp_path)
    step, restored, data_state = resumed.restore_latest_intact(state)
    resumed.close()
    assert step == 1 and data_state == {"next_batch": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_an_uncommitted_save_left_by_a_killed_run_is_never_the_latest_and_is_removed(tmp_path):
    state = {"w": jnp.arange(10, dtype=jnp.float32)}
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3)
    checkpointer.save(1, state, {"next_batch": 1})
    checkpointer.close()
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"  # as a run killed during the save of step 3 leaves it
    (partial / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (partial / "state.orbax-checkpoint-tmp" / "_sharding").write_text("{}")
    resumed = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=3)
    assert resumed.latest_step() == 1
    step, _, data_state = resumed.restore_latest_intact(state)
    assert (step, data_state) == (1, {"next_batch": 1})
    resumed.save(2, state, {"next_batch": 2})
    resumed.close()
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
