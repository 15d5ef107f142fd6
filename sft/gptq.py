"""GPTQ is optional: its packages (requirements-gptq.txt) are needed only to quantise (run_gptq.py) and to load a
GPTQ-quantised model, so that `pip install -r requirements.txt` needs no compiler (GPT-QModel builds from source).

`require_gptq` turns their absence into one error line saying what to install, before anything is loaded.
"""

from __future__ import annotations

import importlib.util

import sft.quiet
from sft.errors import UserError

GPTQ_REQUIREMENTS = "requirements-gptq.txt"
GPTQ_PACKAGES = ("gptqmodel", "optimum")  # transformers' GPTQ integration needs both


class GptqMissingError(UserError):
    """A GPTQ path was taken without the GPTQ packages installed."""


def missing_gptq_packages() -> list[str]:
    """The GPTQ packages this Python cannot import (looked up, not imported: gptqmodel talks when imported)."""
    return [name for name in GPTQ_PACKAGES if importlib.util.find_spec(name) is None]


def require_gptq(what: str) -> None:
    """Raises GptqMissingError, naming `what` needed them and how to install them, if a GPTQ package is missing;
    otherwise quiets their INFO chatter (sft.quiet.quiet_gptq) before they are imported."""
    missing = missing_gptq_packages()
    if missing:
        raise GptqMissingError(
            f"{what} needs the GPTQ packages, not installed here ({', '.join(missing)}): "
            f"pip install -r {GPTQ_REQUIREMENTS} (GPT-QModel builds from source: it needs a C/C++ compiler)"
        )
    sft.quiet.quiet_gptq()
