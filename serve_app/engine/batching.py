"""How sequences are grouped into forward passes, the same rule in process and in a replica's
queue. Pure Python: no torch, so the runtime's queue imports it cheaply."""

from __future__ import annotations

from collections.abc import Sequence


def fits_pass(n: int, width: int, max_size: int, max_tokens: int) -> bool:
    """Whether a forward pass of ``n`` sequences padded to ``width`` tokens keeps within
    ``max_size`` sequences and ``max_tokens`` padded tokens: the one rule every pass is formed
    by, in process (:func:`plan_batches`) and in a replica's queue."""
    return n <= max_size and n * width <= max_tokens


def plan_batches(lengths: Sequence[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Group indices into forward passes: longest first, so each pass pads little, each pass
    within :func:`fits_pass` (a single sequence longer than the budget still gets a pass of its
    own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:  # the first of a pass is its widest
        if not batches or not fits_pass(len(batches[-1]) + 1, lengths[batches[-1][0]], max_size,
                                        max_tokens):
            batches.append([])
        batches[-1].append(i)
    return batches
