"""User errors and how every command line reports them: one line `error: ...`, a non-zero exit, no traceback.

A `UserError` is a problem the user fixes: a config key or value, a missing or malformed file, a dataset that
does not fit, a changed config on resume, a diverged run. Its message names the key, file or value and what was
expected. Any other exception is a bug and keeps its traceback. `--verbose` shows the traceback of a user
error too (for bug reports).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Iterator, NoReturn, Sequence

INPUT_ERROR_STATUS = 1  # a bad input: config, file, dataset, resume mismatch
USAGE_ERROR_STATUS = 2  # a bad command line (argparse's status)
VERBOSE_FLAG = "--verbose"


class UserError(ValueError):
    """A bad input or setting the user can fix; the CLIs print its message as one line, without a traceback."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def one_line(message: object) -> str:
    """`message` on one line: its lines joined with '; ' (after a trailing ':' with a space), blanks collapsed."""
    lines = [" ".join(line.split()) for line in str(message).splitlines()]
    joined = ""
    for line in filter(None, lines):
        joined += line if not joined else (" " if joined.endswith(":") else "; ") + line
    return joined


def exit_with_error(message: object, status: int = INPUT_ERROR_STATUS) -> NoReturn:
    """Prints `error: <message>` as one line on stderr and exits with `status`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    return chain


def find_user_error(error: BaseException) -> UserError | None:
    """The innermost UserError in `error`'s cause/context chain: libraries re-raise ours wrapped (absl), some
    with the traceback pasted into a new error of the same type (ml_collections), so the original is the last."""
    return next((inner for inner in reversed(_chain(error)) if isinstance(inner, UserError)), None)


@contextlib.contextmanager
def reported_as_one_line(verbose: bool = False) -> Iterator[None]:
    """Turns a UserError raised inside into `error: ...` and exit status 1; re-raises it when `verbose`."""
    try:
        yield
    except UserError as error:
        if verbose:
            raise
        exit_with_error(error)


@contextlib.contextmanager
def about(what: str) -> Iterator[None]:
    """Prefixes the message of a UserError raised inside with `what` (the config key or run it concerns)."""
    try:
        yield
    except UserError as error:
        raise type(error)(f"{what}: {error}") from error


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--verbose` and command-line mistakes reported as one line `error: ...` (status 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(VERBOSE_FLAG, action="store_true",
                          help="show the Python traceback of an error (for bug reports)")

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{message} (see {self.prog} --help)", USAGE_ERROR_STATUS)


def _config_file_problem(argv: Sequence[str], name: str) -> str | None:
    """A one-line problem with the `--<name>=FILE[:variant]` argument, or None when its file exists."""
    for arg in argv:
        match = re.fullmatch(rf"--?{name}=([^:]*)(:.*)?", arg)
        if match and not os.path.isfile(match.group(1)):
            return (f"--{name}={match.group(1)}: no such config file; expected a Python file with get_config() "
                    "(see configs/)")
    return None


def _unknown_override(argv: Sequence[str], name: str, error: AttributeError) -> str:
    key = str(error).strip("'\" ")
    for arg in argv:
        match = re.fullmatch(rf"--?(?:no)?{name}\.([\w.]+)(=.*)?", arg)
        if match and match.group(1).split(".")[-1] == key:
            return f"{arg}: {name}.{match.group(1)} is not a key of this config; expected a key the config file sets"
    return f"a --{name}.* override names no key of this config ({key})"


def parse_absl_flags(argv: list[str], config_flag: str = "config") -> list[str]:
    """A `flags_parser` for `absl.app.run`: every command-line problem (an unknown flag, a bad value, a missing
    config file, a bad config variant or override) is one line `error: ...` with status 2."""
    from absl import flags

    verbose = VERBOSE_FLAG in argv[1:]  # looked for before parsing, so that parse errors know it
    problem = _config_file_problem(argv[1:], config_flag)
    if problem and not verbose:
        exit_with_error(problem, USAGE_ERROR_STATUS)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - config files run arbitrary code while flags parse
        if verbose:
            raise
        user_error = find_user_error(error)
        where = str(error).split(": ", 1)[0].removeprefix("flag ")
        if user_error is not None:
            exit_with_error(f"{where}: {user_error}" if isinstance(error, flags.Error) else user_error,
                            USAGE_ERROR_STATUS)
        if isinstance(error, AttributeError):  # ml_collections: `--config.<key>` names no config key
            exit_with_error(_unknown_override(argv[1:], config_flag, error), USAGE_ERROR_STATUS)
        if isinstance(error, flags.Error):
            inner = _chain(error)[-1]
            if inner is error:
                exit_with_error(error, USAGE_ERROR_STATUS)
            exit_with_error(f"{where}: {type(inner).__name__}: {inner}", USAGE_ERROR_STATUS)
        raise
