"""Count the per-expert histograms a piece of code computes.

    with count_histograms() as calls:
        layer(x)
    assert calls == [("count_ids", 8)]

Every module that imported `count_ids` (the project's one counting helper) gets a counting
wrapper for the duration, and so does `torch.bincount` (the other way to count); each call is
recorded as (name, size). Modules imported later are not patched: import the code first.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from deepseek_moe.model import dispatch


@contextmanager
def count_histograms():
    calls: list[tuple[str, int]] = []
    original = dispatch.count_ids
    original_bincount = torch.bincount

    def counting(ids, size):
        calls.append(("count_ids", size))
        return original(ids, size)

    def bincount(ids, *args, **kwargs):
        calls.append(("bincount", int(kwargs.get("minlength", 0))))
        return original_bincount(ids, *args, **kwargs)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "count_ids", None) is original]
    for module in patched:
        module.count_ids = counting
    torch.bincount = bincount
    try:
        yield calls
    finally:
        for module in patched:
            module.count_ids = original
        torch.bincount = original_bincount
