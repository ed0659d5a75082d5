"""A full disk: a write that fails for lack of space stops the run with one line naming the path and the bytes.

Every write a run makes goes through `space_for` (the atomic writer `write_text_atomic`, `append`, the
checkpoint saves and the export), which turns an `OSError` ENOSPC or EDQUOT, and the same error as tensorstore
reports it for orbax (a ValueError whose text ends "No space left on device [os_error_code='28']"), into one
`DiskFullError`:

    the disk holding W/checkpoints is full: saving checkpoint step 4 needs about 4.0 MB (as checkpoint step 2
    took; the train state is 3.2 MB), 1.2 MB are free; free space and re-run the same command to resume from step 2.

What was written before stays intact: an atomic write leaves the old file and removes its temporary file, an
append is cut back to the file's previous length (no half line), an uncommitted checkpoint is removed
(`remove_uncommitted_checkpoints`) and never taken for the latest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Iterator

import jax
import numpy as np
from etils import epath

from auxmtl_jax.errors import UserError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore (orbax's array writer) puts the OS error into the text of a ValueError.
_FULL_TEXT = re.compile("|".join([re.escape(os.strerror(code)) for code in FULL_ERRNOS]
                                 + [rf"os_error_code='?{code}\b" for code in FULL_ERRNOS]))
RESUME = "to resume from the last checkpoint"


class DiskFullError(UserError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT); what was written before it is intact."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def full_errno(error: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when `error` (or one it was raised from) is a write that failed for lack of space."""
    for inner in _chain(error):
        if isinstance(inner, OSError) and inner.errno in FULL_ERRNOS:
            return inner.errno
        if not isinstance(inner, UserError) and (match := _FULL_TEXT.search(str(inner))):
            quota = match.group(0) == os.strerror(errno.EDQUOT) or match.group(0).endswith(str(errno.EDQUOT))
            return errno.EDQUOT if quota else errno.ENOSPC
    return None


def format_bytes(count: int) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    if count < 1000:
        return f"{count} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 999.95 or unit == "TB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing ancestor); None when unknown."""
    text = os.fspath(path)
    if "://" in text:
        return None
    path = os.path.abspath(text)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tree_nbytes(tree: Any) -> int:
    """Bytes of the arrays in `tree` (global arrays: their whole size), without moving any."""
    return sum(int(leaf.nbytes) if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes
               for leaf in jax.tree.leaves(tree))


def disk_full_error(path, doing: str, needed: int | None, *, what: str | None = None, resume: str = RESUME,
                    code: int = errno.ENOSPC) -> DiskFullError:
    full = "is over its disk quota" if code == errno.EDQUOT else "is full"
    needs = "found no room" if needed is None else f"needs about {format_bytes(needed)}"
    free = free_bytes(path)
    return DiskFullError(f"the disk holding {os.fspath(path)} {full}: {doing} {needs}{f' ({what})' if what else ''}, "
                         f"{'an unknown number of bytes' if free is None else format_bytes(free)} are free; free "
                         f"space and re-run the same command {resume}.")


@contextlib.contextmanager
def space_for(path, doing: str, needed: int | None | Callable[[], tuple[int | None, str | None]], *,
              what: str | None = None, resume: str | Callable[[], str] = RESUME,
              on_full: Callable[[], None] | None = None) -> Iterator[None]:
    """Turns a write inside that fails for lack of space into one `DiskFullError` about `path`: what it was
    `doing`, the bytes it `needed` (`what` they are) and how to go on (`resume`). Callables are asked after
    `on_full`, which cleans up: `needed` then gives (bytes, what). Any other error passes unchanged."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  (orbax and tensorstore raise ValueError for an OS error)
        code = None if isinstance(error, UserError) else full_errno(error)
        if code is None:
            raise
        if on_full is not None:
            on_full()
        if callable(needed):
            needed, what = needed()
        raise disk_full_error(path, doing, needed, what=what, resume=resume() if callable(resume) else resume,
                              code=code) from error


def checkpoint_space(directory: epath.Path, step: int, state_bytes: int, committed_steps: Callable[[], list[int]],
                     primary: bool) -> contextlib.AbstractContextManager:
    """`space_for` a checkpoint save of `step` into `directory` (orbax; its error may come from the background
    thread, when the save is waited for): the uncommitted folder is removed (by the `primary` process), the
    bytes needed are the larger of the state's and the previous checkpoint's on disk, and the re-run resumes from
    the newest committed step before `step`."""
    def earlier() -> int | None:
        steps = [kept for kept in committed_steps() if kept < step]
        return steps[-1] if steps else None

    def remove_partial_save() -> None:
        if primary:
            remove_uncommitted_checkpoints(directory)

    def needed() -> tuple[int, str]:
        previous = earlier()
        on_disk = 0 if previous is None else sum(path.stat().st_size for path in
                                                 pathlib.Path(directory, str(previous)).rglob("*") if path.is_file())
        if on_disk > state_bytes:
            return on_disk, f"as checkpoint step {previous} took; the train state is {format_bytes(state_bytes)}"
        return state_bytes, "the train state"

    def resume() -> str:
        previous = earlier()
        return "to train it from step 0" if previous is None else f"to resume from step {previous}"

    return space_for(directory, f"saving checkpoint step {step}", needed, resume=resume, on_full=remove_partial_save)


def append(path, data: bytes, doing: str) -> None:
    """Appends `data` to the file `path` whole or not at all: a write that fails (a full disk: one
    `DiskFullError`) is cut back off the file, so it never ends in half a line or half a record."""
    path = epath.Path(path)
    with space_for(path, doing, len(data)):
        if "://" in os.fspath(path):  # remote (gs://...): written whole by the object store, or not at all
            with path.open("ab") as stream:
                stream.write(data)
            return
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(handle).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(handle, view):]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(handle, start)
                raise
        finally:
            os.close(handle)


def read_json_lines(path) -> list[dict]:
    """The JSON objects of a file written a line at a time with `append` ([] when there is no file). A line that is
    not a JSON object is skipped: a kill can cut the last line short, and a reader must still resume."""
    path = epath.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_text_atomic(path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so a reader never sees half a file.

    A write that fails (a full disk: one `DiskFullError` naming the path and bytes) removes its temporary file
    and leaves `path` as it was."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with space_for(path, f"writing {path.name}", len(text.encode("utf-8", "replace"))):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise


def remove_uncommitted_checkpoints(directory: epath.Path, attempts: int = 20) -> None:
    """Removes orbax's temporary folders in `directory` (saves that never committed; call on process 0 only).

    Best effort: when one write of a save fails, orbax stops waiting for the others, and tensorstore may still
    write (and recreate folders) for a moment, so removal is tried again for up to `attempts` tenths of a second.
    What is left is removed when the next run starts (orbax's `cleanup_tmp_directories`) and is never a step."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    for attempt in range(attempts):
        temporary = [path.get() for path in ocp.step.all_temporary_paths(directory)]
        if not temporary:
            return
        if attempt:
            time.sleep(0.1)
        for path in temporary:
            shutil.rmtree(os.fspath(path), ignore_errors=True)


class _DropFullDiskReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return full_errno(error) is None and not _FULL_TEXT.search(record.getMessage())


class _DropClosedLoopCallbacks:
    """sys.unraisablehook without tensorstore's callbacks that find orbax's event loop closed (orbax closes it
    when one write of a save fails, while the others are still under way); anything else goes to `hook`."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            self.hook(unraisable)


_FILTER = _DropFullDiskReports()


def quiet_background_reports() -> None:
    """A checkpoint save that fails for lack of space fails in orbax's background threads, which report it over and
    over: orbax's log records with their tracebacks (logger 'absl'), asyncio's "Task exception was never
    retrieved" (logger 'asyncio'), and tensorstore callbacks that find orbax's event loop closed (unraisable
    exceptions). The run reports it once, as one `DiskFullError` line; this drops those reports (log records of
    a disk-full error only; everything else passes). Idempotent."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not isinstance(sys.unraisablehook, _DropClosedLoopCallbacks):
        sys.unraisablehook = _DropClosedLoopCallbacks(sys.unraisablehook)
