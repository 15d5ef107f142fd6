"""What the user can fix, and the one way every entry point reports it.

A `UserError` is a mistake in the command, the data, a model folder or the output folder: something the user
mends by changing what they gave us. Every entry point runs its `main` through `run_main`, which prints such an
error as one line, `error: <what and where>`, on stderr and exits with code 2, without a traceback. Anything else
is a bug in our code or a library's, and keeps its traceback.

Under a finetune/*.sh launcher (`sft.torchrun`, which sets OUTCOME_DIR_ENV) a worker also records how it ended,
its exit code and error line, in a file of that folder: the launcher then ends with that line and code instead of
torchrun's report of a failed child, which is kept for what no worker recorded (a crash).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130

T = TypeVar("T")

# Set by sft.torchrun for its workers: the folder where each records its outcome (`record_outcome`).
OUTCOME_DIR_ENV = "SFT_OUTCOME_DIR"


class UserError(Exception):
    """A mistake the user can fix; its message says what and where (file, line or sample, field)."""

    exit_code = USER_ERROR_EXIT_CODE  # a subclass may say more (finetune.py's NaN stop has its own code)


class ConfigurationError(UserError, ValueError):
    """Arguments that contradict each other or the machine (a flag without its partner, a missing path)."""


class RunStopped(Exception):
    """A run that stopped early on purpose and said why in its log (a stop requested by a signal): the process
    ends with `exit_code`, without an error line."""

    def __init__(self, exit_code: int, message: str = ""):
        super().__init__(message)
        self.exit_code = exit_code


def record_outcome(exit_code: int, message: str = "") -> bool:
    """Writes this worker's outcome where its launcher reads it (OUTCOME_DIR_ENV, one file per rank); False when
    no launcher asked for it (the process then reports the outcome itself)."""
    folder = os.environ.get(OUTCOME_DIR_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    try:
        with open(os.path.join(folder, f"rank-{rank}.json"), "w") as file:
            json.dump({"exit_code": exit_code, "message": message}, file)
    except OSError:  # the launcher's folder is gone: say it here instead
        return False
    return True


def fail(message: str, exit_code: int = USER_ERROR_EXIT_CODE) -> NoReturn:
    """Stops the process the way `run_main` does for a UserError (for code outside any `run_main`); under a
    launcher the error line is the launcher's to print, once for all workers."""
    if not record_outcome(exit_code, message):
        print(f"error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def run_main(main: Callable[[], T]) -> T:
    """Runs an entry point's `main`, turning a UserError into one `error:` line and exit code 2."""
    try:
        return main()
    except UserError as error:
        fail(str(error), error.exit_code)
    except RunStopped as stopped:
        record_outcome(stopped.exit_code)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        record_outcome(INTERRUPTED_EXIT_CODE)
        sys.exit(INTERRUPTED_EXIT_CODE)
