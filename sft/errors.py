"""What the user can fix, and the one way every entry point reports it.

A `UserError` is a mistake in the command, the data, a model folder or the output folder: something the user
mends by changing what they gave us. Every entry point runs its `main` through `run_main`, which prints such an
error as one line, `error: <what and where>`, on stderr and exits with code 2, without a traceback. Anything else
is a bug in our code or a library's, and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix; its message says what and where (file, line or sample, field)."""


class ConfigurationError(UserError, ValueError):
    """Arguments that contradict each other or the machine (a flag without its partner, a missing path)."""


def fail(message: str) -> NoReturn:
    """Stops the process the way `run_main` does for a UserError (for code outside any `run_main`)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)


def run_main(main: Callable[[], T]) -> T:
    """Runs an entry point's `main`, turning a UserError into one `error:` line and exit code 2."""
    try:
        return main()
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
