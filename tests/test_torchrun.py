"""How a launcher ends (sft/torchrun.py), decided from what its workers recorded; the launches themselves are in
tests/test_launchers.py."""

from __future__ import annotations

import subprocess
import sys

from sft.errors import OUTCOME_DIR_ENV
from sft.torchrun import Outcome, launcher_outcome, read_outcomes

MISSING = {"exit_code": 2, "message": "missing.jsonl: no such file"}


def test_a_user_error_is_printed_once_with_its_exit_code():
    # Both workers refused the same data; a third was stopped because of it and recorded nothing.
    assert launcher_outcome({0: MISSING, 1: MISSING}) == Outcome(2, ["missing.jsonl: no such file"])
    assert launcher_outcome({1: MISSING}) == Outcome(2, ["missing.jsonl: no such file"])
    nan_stop = {"exit_code": 3, "message": "non-finite loss"}
    assert launcher_outcome({0: nan_stop, 1: nan_stop}) == Outcome(3, ["non-finite loss"])


def test_a_stop_on_request_ends_with_the_workers_code():
    saved = {"exit_code": 75, "message": ""}
    assert launcher_outcome({0: saved, 1: saved}) == Outcome(75, [])
    assert launcher_outcome({0: saved, 1: saved}, signal_number=2) == Outcome(75, [])
    # torchrun was signalled and no worker got to record anything: the shell's convention, 128 + the signal.
    assert launcher_outcome({}, signal_number=15) == Outcome(143, [])


def test_a_crash_keeps_torchruns_report():
    assert launcher_outcome({}, failed_ranks=[0]) is None
    # One worker stopped on request, the other failed without recording anything: a crash, not a stop.
    assert launcher_outcome({0: {"exit_code": 75, "message": ""}}, failed_ranks=[0, 1]) is None


def test_a_worker_records_its_user_error_instead_of_printing_it(tmp_path):
    # A worker under the launcher: run_main records the error for the launcher, which prints it once.
    code = "from sft.errors import UserError, run_main\ndef main():\n    raise UserError('bad --flag')\nrun_main(main)"
    env = {OUTCOME_DIR_ENV: str(tmp_path), "RANK": "1", "PATH": ""}
    worker = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert worker.returncode == 2 and "error:" not in worker.stderr
    assert read_outcomes(tmp_path) == {1: {"exit_code": 2, "message": "bad --flag"}}
