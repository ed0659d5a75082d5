"""A full disk (docs/reliability.md, "A full disk"): a run whose disk fills up mid-checkpoint stops with one line naming
the path and the bytes it needed, keeps its last intact checkpoint, and after space is freed the same command resumes
and ends as an uninterrupted run; a finished run's results.json survives a re-run on a full disk.

For real on a tmpfs, mounted in a private mount namespace held by a sleeping process (as root; skipped where that is
not permitted): `run.py` runs in it through `nsenter`, and this process sees it at /proc/<pid>/root/... A checkpoint's
size on disk varies from run to run (orbax's OCDBT files: 3.7 to 6.5 MB for the same state here), so the disk is not
sized in advance: the failing run is run.py with a ballast file written just before its step-4 save, leaving half
the train state's bytes free (`FILL_BEFORE_SAVE`), and the save fills the rest and fails in orbax's background
thread. Everywhere, a fault-injected save (an `OSError` ENOSPC inside orbax's save) takes the same path in-process;
each writer's own fault-injected and tmpfs tests are in tests/test_disk.py.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from auxmtl_jax import checkpoint as checkpoint_lib
from auxmtl_jax import disk
from auxmtl_jax import errors
from auxmtl_jax import programs
from test_train import final_params, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
RUNLOCAL = "configs/synthetic_three_task.py:runlocal,strategy=joint"
STEPS = 6  # checkpoints at 2, 4 and 6
OVERRIDES = {"num_train_steps": STEPS, "checkpoint_every_steps": 2, "eval_every_steps": STEPS,
             "max_checkpoints_to_keep": 3, "analysis.grad_log_every_steps": 0, "analysis.figures": False}
TMPFS_SIZE = 64 << 20
FILL_AT_STEP = 4

# run.py, with a ballast file written just before the save of step FILL_AT_STEP (after the saves before it are
# committed and recorded) that leaves half the train state's bytes free.
FILL_BEFORE_SAVE = """
import os, runpy, sys
from auxmtl_jax import checkpoint, disk

save = checkpoint.Checkpointer.save


def save_on_a_nearly_full_disk(self, step, state, *args, **kwargs):
    if step == int(os.environ["FILL_AT_STEP"]):
        self.wait()
        leave = disk.tree_nbytes(state) // 2
        with open(os.environ["BALLAST"], "wb") as ballast:
            ballast.write(bytes(max(disk.free_bytes(self.directory) - leave, 0)))
        save(self, step, state, *args, **kwargs)
        print(f"the save of step {step} went on in the background", flush=True)
        return None
    return save(self, step, state, *args, **kwargs)


checkpoint.Checkpointer.save = save_on_a_nearly_full_disk
sys.argv[0] = "run.py"
runpy.run_path("run.py", run_name="__main__")
"""


class Tmpfs:
    """A tmpfs of `size` bytes at `mount_point` in a private mount namespace, held by a sleeping process.

    Commands run in the namespace through `nsenter` (`run`); this process reads and writes the tmpfs through
    `/proc/<holder>/root/<mount_point>` (`view`). Gone, with all it holds, when the holder is stopped (`close`).
    """

    def __init__(self, mount_point: pathlib.Path, size: int):
        self.mount_point = mount_point
        self._holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size="$1" tmpfs "$0" && echo mounted && exec sleep 3600', str(mount_point),
             str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.mounted = self._holder.stdout.readline().strip() == "mounted"

    @property
    def view(self) -> pathlib.Path:
        return pathlib.Path(f"/proc/{self._holder.pid}/root{self.mount_point}")

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        """`python argv...` in the repository, inside the namespace."""
        return subprocess.run(["nsenter", "-t", str(self._holder.pid), "-m", f"--wd={REPO}", "--", sys.executable,
                               *argv], cwd=REPO, env={**run_env(), **env}, capture_output=True, text=True, timeout=600)

    def fill(self) -> pathlib.Path:
        """A ballast file taking all the free space."""
        ballast = self.view / "ballast"
        with ballast.open("ab") as stream:
            stream.write(bytes(shutil.disk_usage(self.view).free))
        return ballast

    def close(self) -> None:
        self._holder.kill()
        self._holder.wait()


def tmpfs_or_skip(mount_point: pathlib.Path, size: int = TMPFS_SIZE) -> Tmpfs:
    """A mounted Tmpfs, or a skip saying why there is none (not root, no unshare/nsenter, mounting refused)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("a size-limited file system needs root with unshare and nsenter (a tmpfs in a private mount "
                    "namespace); the fault-injected tests cover the same paths")
    mount_point.mkdir(parents=True, exist_ok=True)
    tmpfs = Tmpfs(mount_point, size)
    if not tmpfs.mounted or shutil.disk_usage(tmpfs.view).total > 2 * size:
        tmpfs.close()
        pytest.skip("mounting a tmpfs in a private mount namespace (unshare -m) is not permitted here; the "
                    "fault-injected tests cover the same paths")
    return tmpfs


def run_env() -> dict:
    """The test process's environment (its XLA device flags) and compilation cache, for run.py subprocesses."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore",
                JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def command(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
    return ["run.py", f"--config={RUNLOCAL}", f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
            *(f"--config.{key}={value}" for key, value in OVERRIDES.items())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(data dir, workdir, results record) of the run trained straight through, on an ordinary disk."""
    root = tmp_path_factory.mktemp("full_disk")
    data_dir, workdir = root / "tfds", root / "uninterrupted"
    record = programs.run(tiny_config(str(data_dir), **OVERRIDES), str(workdir))
    return data_dir, workdir, record


def flat(metrics):
    return {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    output = result.stdout + result.stderr
    assert "Traceback" not in output and not re.search(r"^\w+(Error|Exception)\b", output, re.M), output
    return [line for line in output.splitlines() if line.startswith("error:")]


def steps_and_records(workdir: pathlib.Path) -> tuple[list[str], list[str]]:
    """The entries of WORKDIR/checkpoints (orbax's temporary folders included) and the steps with an integrity
    record."""
    return (sorted(path.name for path in (workdir / checkpoint_lib.CHECKPOINT_DIR).iterdir()),
            sorted(path.stem for path in (workdir / checkpoint_lib.INTEGRITY_DIR).glob("*.json")))


def committed(workdir: pathlib.Path) -> tuple[list[str], list[str]]:
    """`steps_and_records` without orbax's temporary folders. The one of a save that failed is removed at once, but
    tensorstore may still be writing into it for a moment: what it writes then is removed when the next run
    starts (the tests check that no temporary folder is left after it) and is never taken for a step."""
    entries, records = steps_and_records(workdir)
    return [name for name in entries if not name.endswith(ocp.utils.TMP_DIR_SUFFIX)], records


def assert_intact(workdir: pathlib.Path, step: int) -> None:
    assert checkpoint_lib.integrity_problem(workdir / checkpoint_lib.CHECKPOINT_DIR / str(step),
                                            workdir / checkpoint_lib.INTEGRITY_DIR / f"{step}.json") is None


def assert_whole_lines(path: pathlib.Path) -> None:
    text = path.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


def test_a_disk_that_fills_up_mid_checkpoint_stops_in_one_line_and_the_same_command_resumes(uninterrupted, tmp_path):
    data_dir, reference, record = uninterrupted
    tmpfs = tmpfs_or_skip(tmp_path / "disk")
    try:
        workdir, seen = tmpfs.mount_point / "run", tmpfs.view / "run"

        failed = tmpfs.run(["-c", FILL_BEFORE_SAVE, *command(workdir, data_dir)[1:]], FILL_AT_STEP=str(FILL_AT_STEP),
                           BALLAST=str(tmpfs.mount_point / "ballast"))

        lines = error_lines(failed)
        assert failed.returncode == errors.INPUT_ERROR_STATUS and len(lines) == 1, failed.stdout + failed.stderr
        assert f"the save of step {FILL_AT_STEP} went on in the background" in failed.stdout  # and failed there
        assert re.fullmatch(
            rf"error: the disk holding {re.escape(str(workdir / 'checkpoints'))} is full: saving checkpoint step 4 "
            r"needs about \d+\.\d MB \((as checkpoint step 2 took; )?the train state( is \d+\.\d MB)?\), "
            r"[\d.]+ (kB|MB) are free; free space and re-run the same command to resume from step 2\.",
            lines[0]), lines[0]
        assert committed(seen) == (["2"], ["2"])
        assert_intact(seen, 2)
        assert_whole_lines(seen / "metrics.jsonl")
        assert not (seen / "results.json").exists() and not (seen / "inference").exists()

        (tmpfs.view / "ballast").unlink()  # space freed
        resumed = tmpfs.run(command(workdir, data_dir))

        assert resumed.returncode == 0 and not error_lines(resumed), resumed.stdout + resumed.stderr
        assert f"resumed {workdir} from step 2" in resumed.stderr
        assert steps_and_records(seen) == (["2", "4", "6"], ["2", "4", "6"])
        for step in (2, 4, 6):
            assert_intact(seen, step)
        finished = json.loads((seen / "results.json").read_text())
        assert flat(finished["metrics"]) == pytest.approx(flat(record["metrics"]), rel=1e-5)
        for ours, theirs in zip(jax.tree.leaves(final_params(seen)), jax.tree.leaves(final_params(reference))):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)

        # a finished run re-run on a full disk: one line, and its results stay as they were, no temporary file left
        results = {name: (seen / name).read_bytes() for name in ("results.json", "results.txt", "config.json")}
        tmpfs.fill()
        again = tmpfs.run(command(workdir, data_dir))
        lines = error_lines(again)
        assert again.returncode == errors.INPUT_ERROR_STATUS and len(lines) == 1, again.stdout + again.stderr
        assert re.fullmatch(rf"error: the disk holding {re.escape(str(workdir))}/config.json is full: writing "
                            r"config.json needs about \d\.\d kB, 0 bytes are free; free space and re-run the same "
                            r"command to resume from the last checkpoint\.", lines[0]), lines[0]
        assert {name: (seen / name).read_bytes() for name in results} == results
        assert not [path for path in seen.rglob("*") if path.name.endswith((".tmp", ocp.utils.TMP_DIR_SUFFIX))]
    finally:
        tmpfs.close()


def test_a_checkpoint_save_that_finds_the_disk_full_stops_and_the_run_resumes_to_the_same_end(uninterrupted,
                                                                                              tmp_path, monkeypatch):
    """Fault-injected (everywhere): the save of step 4 fails with ENOSPC inside orbax."""
    data_dir, _, record = uninterrupted
    workdir = tmp_path / "run"
    config = tiny_config(str(data_dir), **OVERRIDES)
    save = checkpoint_lib.ProcessLocalJsonHandler.save

    def full_at_step_4(handler, directory, args):
        if "/4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return save(handler, directory, args)

    monkeypatch.setattr(checkpoint_lib.ProcessLocalJsonHandler, "save", full_at_step_4)
    with pytest.raises(disk.DiskFullError, match=rf"^the disk holding {re.escape(str(workdir / 'checkpoints'))} is "
                       r"full: saving checkpoint step 4 needs about \d+\.\d MB \((as checkpoint step 2 took; )?the "
                       r"train state( is \d+\.\d MB)?\), .* are free; free space and re-run the same command to resume "
                       r"from step 2\.$"):
        programs.run(config, str(workdir))
    assert committed(workdir) == (["2"], ["2"])
    assert_intact(workdir, 2)
    assert_whole_lines(workdir / "metrics.jsonl")

    monkeypatch.setattr(checkpoint_lib.ProcessLocalJsonHandler, "save", save)
    again = programs.run(config, str(workdir))
    assert flat(again["metrics"]) == pytest.approx(flat(record["metrics"]), rel=1e-5)
    assert steps_and_records(workdir) == (["2", "4", "6"], ["2", "4", "6"])
