"""User errors: mistakes in the user's data, config, shards, checkpoints or input files.

Every expected error derives from ``UserError``. The entry points (``train.py``, ``eval.py``,
``scripts/prepare_data.py``, the ``gmeta`` CLI) turn one into a short message on stderr and exit
status 2 (``report_user_errors``); any other exception is a bug and keeps its full traceback.

A message says what is wrong, where (file, row, task, column, key) and how to fix it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: exit status of a run stopped by a user error (argparse uses 2 for bad arguments too)
USER_ERROR_EXIT = 2

T = TypeVar("T")
#: the gmeta package folder: a ValueError raised from a file in it is gmeta's own check
_PACKAGE = Path(__file__).resolve().parent


class UserError(Exception):
    """Base class of the errors a user can fix (bad data, config, shards, checkpoint, input file)."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work (names the key and the accepted values)."""


class InputFileError(UserError, FileNotFoundError):
    """An input file or folder that is missing or cannot be read."""


def _config_error_types() -> tuple[type[BaseException], ...]:
    """omegaconf's errors about values the user gave: a missing ``???`` value, a value of the wrong
    type, an interpolation naming a key that does not exist. (A key missing from a struct config is
    not listed: in code it is a bug; as an override, Hydra reports it before the run starts.)"""
    try:
        from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, ValidationError
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return ()
    return (MissingMandatoryValue, ValidationError, InterpolationKeyError)


def _hydra_error_types() -> tuple[type[BaseException], ...]:
    """Hydra's errors about the command line: a bad override, a config group option that does not exist."""
    try:
        from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return ()
    return (ConfigCompositionException, MissingConfigException, OverrideParseException)


def _is_bad_arguments(exc: BaseException) -> bool:
    """``instantiate`` called a config's ``_target_`` with a key it does not take (a typo in the config)."""
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover
        return False
    cause = exc.__cause__
    return (
        isinstance(exc, InstantiationException)
        and isinstance(cause, TypeError)
        and (
            "unexpected keyword argument" in str(cause)
            or "missing" in str(cause)
            and "argument" in str(cause)
        )
    )


def _is_argument_check(exc: BaseException) -> bool:
    """A ``ValueError`` raised by gmeta's own code (its raising frame is in the package): while an
    object is built from the config, that is a deliberate check refusing a config value."""
    if not isinstance(exc, ValueError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``, or None if ``exc`` is unexpected (a bug: keep the traceback).

    Looks through the ``__cause__`` chain, because ``hydra.utils.instantiate`` wraps whatever a
    constructor raises (e.g. a ``TaskConfig`` value check) in an ``InstantiationException``; below
    one, a ``ValueError`` raised by gmeta's own code is a constructor refusing a config value (e.g.
    ``data.verify=bogus``), while one raised inside a library stays a bug. A plain
    ``FileNotFoundError`` counts as a user error: it names a path the user gave.
    """
    expected: tuple[type[BaseException], ...] = (
        UserError,
        FileNotFoundError,
        *_config_error_types(),
        *_hydra_error_types(),
    )
    wrappers: tuple[type[BaseException], ...] = ()  # isinstance of an empty tuple is always False
    try:
        from hydra.errors import InstantiationException

        wrappers = (InstantiationException,)
    except ImportError:  # pragma: no cover
        pass
    seen: set[int] = set()
    building = False  # below an InstantiationException: an object was being built from the config
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, expected) or _is_bad_arguments(e) or (building and _is_argument_check(e)):
            return e
        building = building or isinstance(e, wrappers)
        e = e.__cause__
    return None


def user_message(exc: BaseException) -> str:
    """The one-paragraph message of a user error.

    An error raised in a DataLoader worker arrives re-raised by torch as the same type with the
    worker's traceback in its text; keep only the final ``Type: message`` part of it.
    """
    text = str(exc)
    filename = getattr(exc, "filename", None)
    if exc.__class__.__name__ == "FileNotFoundError" and filename:
        text = f"{filename}: {getattr(exc, 'strerror', None) or 'no such file or directory'}"
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def report_user_errors(fn: Callable[[], T], prog: str) -> T:
    """Run ``fn``; on a user error print ``<prog>: error: <message>`` and exit with status 2.

    Unexpected exceptions propagate unchanged (full traceback, the interpreter's exit status 1).
    """
    try:
        return fn()
    except Exception as exc:
        found = find_user_error(exc)
        if found is None:
            raise
        print(f"{prog}: error: {user_message(found)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


class HydraEntry:
    """Exit statuses of a ``@hydra.main`` entry point (``train.py``, ``eval.py``).

    Inside the task function, ``run`` turns user errors into a message and status 2. Hydra reports
    its own command-line errors (a bad override, an unknown config option) before the task function
    runs, with a short message and status 1; ``main`` turns that status into 2 too. A status 1
    after the task function started is an unexpected error (Hydra printed its traceback): kept.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.started = False

    def run(self, fn: Callable[[], T]) -> T:
        self.started = True
        return report_user_errors(fn, self.prog)

    def main(self, hydra_main: Callable[[], object]) -> None:
        try:
            hydra_main()
        except SystemExit as e:
            if e.code == 1 and not self.started:
                raise SystemExit(USER_ERROR_EXIT) from None
            raise
