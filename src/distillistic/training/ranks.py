"""Ranks that agree: under torchrun every process checks, at start, that it holds what rank 0 holds.

Each process parses its own command line and reads its own data, so two ranks may disagree (another flag on
one node, another copy of the data): they would train two different things under one run directory, or one
would stop on a bad input while the others wait for it in a collective until a timeout. :func:`agree` gathers
every rank's value (the resolved config, the data's checksum) or the one-line problem it stopped on; then every
rank stops with the same one line (exit 2) when any rank had a problem or holds another value than rank 0.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from distillistic.errors import UserError, short_repr


def agree(what: str, value: Any, problem: UserError | None = None) -> None:
    """Every rank of the process group holds rank 0's ``value`` (``what``: e.g. ``config``); a rank with a
    ``problem`` stops every rank with its line. A no-op on one process (``problem`` is then raised)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if problem is not None:
            raise problem
        return
    world = dist.get_world_size()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"problem": str(problem) if problem is not None else None, "value": value})
    failed = [(r, g["problem"]) for r, g in enumerate(gathered) if g["problem"]]
    if failed:
        rank, text = failed[0]
        raise UserError(f"rank {rank} of {world}: {text} (every rank stops: give every rank the same, valid input)")
    reference = gathered[0]["value"]
    for rank, g in enumerate(gathered):
        if g["value"] != reference:
            differ = _difference(reference, g["value"])
            raise UserError(f"rank {rank} of {world} holds another {what} than rank 0 ({differ}); every rank stops: "
                            f"give every rank the same {what}")


def _difference(ours: Any, theirs: Any) -> str:
    """The first key where two mappings differ, ``key: rank 0's -> theirs``; or the two values."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            if ours.get(key) != theirs.get(key):
                return f"{key}: {short_repr(ours.get(key))} -> {short_repr(theirs.get(key))}"
    return f"{short_repr(ours)} -> {short_repr(theirs)}"
