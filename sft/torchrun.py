"""What finetune/*.sh starts: torchrun itself (same arguments), ending the way its workers ended.

torchrun reports any worker that exits non-zero as a crash: a 30-line `ChildFailedError` traceback and exit code 1,
also after a worker printed a user error (exit 2), the NaN guard's stop (3) or a stop on request with its checkpoint
saved (75). Here each worker records its outcome in a folder of this run (sft.errors.record_outcome), and
`launcher_outcome` decides from those records, once torchrun is done:

- a worker recorded a user error: its `error:` line, printed once whatever the number of workers that recorded
  it, and its exit code (the other workers were stopped because of it);
- torchrun was signalled (Ctrl-C, a scheduler's SIGTERM) or the workers stopped on request: the workers' own exit
  code (75 once they saved a checkpoint), else 128 + the signal's number, without a traceback;
- a worker that failed without recording anything crashed: torchrun's own report is kept.

    python -m sft.torchrun [torchrun arguments] finetune.py [finetune.py arguments]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from sft.errors import OUTCOME_DIR_ENV
from sft.quiet import quiet_torchrun


class Outcome(NamedTuple):
    """How the launcher ends: its exit code and the error lines to print (none: the workers said it already)."""

    exit_code: int
    messages: list[str]


def read_outcomes(folder: str | os.PathLike) -> dict[int, dict]:
    """The outcome each worker recorded, by rank (a worker still writing its file, or a crash, records none)."""
    outcomes = {}
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            outcomes[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return outcomes


def launcher_outcome(
    outcomes: dict[int, dict], signal_number: int | None = None, failed_ranks: Sequence[int] = ()
) -> Outcome | None:
    """The launcher's ending, from the workers' recorded `outcomes` (rank -> exit code and message), the signal
    torchrun itself received (None: it received none) and the ranks torchrun saw fail; None for a crash (keep
    torchrun's report)."""
    codes = [outcomes[rank]["exit_code"] for rank in sorted(outcomes)]
    errors = [outcomes[rank] for rank in sorted(outcomes) if outcomes[rank].get("message")]
    if errors:  # a user error is the cause; workers without a record were stopped because of it
        messages = list(dict.fromkeys(error["message"] for error in errors))
        return Outcome(int(errors[0]["exit_code"]), messages)
    if signal_number is None and any(rank not in outcomes for rank in failed_ranks):
        return None  # a worker failed without a word: a crash
    if codes and len(set(codes)) == 1:  # stopped on request (75) or interrupted before training (130)
        return Outcome(int(codes[0]), [])
    if signal_number is not None:
        return Outcome(max(codes) if codes else 128 + signal_number, [])
    return None


def main(argv: Sequence[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet_torchrun()
    arguments = parse_args(list(sys.argv[1:] if argv is None else argv))
    folder = tempfile.mkdtemp(prefix="sft-outcomes-")
    os.environ[OUTCOME_DIR_ENV] = folder  # the workers inherit it
    try:
        try:
            run(arguments)
            return
        except ChildFailedError as failed:
            outcome = launcher_outcome(read_outcomes(folder), failed_ranks=list(failed.failures))
            if outcome is None:
                raise  # a crash: torchrun's report, with the failed workers' tracebacks
        except SignalException as signalled:
            outcome = launcher_outcome(read_outcomes(folder), int(signalled.sigval))
        except KeyboardInterrupt:  # before torchrun set its own handlers
            outcome = launcher_outcome(read_outcomes(folder), 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for message in outcome.messages:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
