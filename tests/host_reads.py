"""Counting a piece of code's reads of tensor values on the host (item(), bool(), float(), tolist(), cpu()...): on a GPU
each one waits for the device to finish its queue. Shared by the training loop's and the fused loss's tests."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from torch.overrides import TorchFunctionMode

HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts the host reads made by code in `files`, by caller ("file.py:function")."""

    def __init__(self, files: tuple[str, ...]):
        super().__init__()
        self.files = files
        self.by_caller: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_READS:
            caller = sys._getframe(1).f_code
            if caller.co_filename in self.files:
                self.by_caller[f"{Path(caller.co_filename).name}:{caller.co_name}"] += 1
        return func(*args, **(kwargs or {}))
