"""Named points where the fault tests kill a real process with SIGKILL (``kill -9``).

``CGJAX_KILL_AT="NAME"`` (or ``"NAME@N"``: at its N-th hit in this process) makes :func:`hit`
kill the calling process, with no clean-up, when the code passes that point. Unset (always, in
normal use) :func:`hit` costs one dictionary lookup. The points:

- ``before_rename:FILE``: a whole-file write of ``FILE`` (a base name) is staged in its temporary
  and not yet renamed over the target (:func:`cgjax.persistence.write_files`);
- ``prototype_epoch``: the prototype stage computed an epoch and has not saved it yet.

tests/test_faults.py kills there and checks that the same command, run again, ends where an
uninterrupted run ends, bit for bit.
"""
from __future__ import annotations

import os
import signal

__all__ = ["ENV", "hit"]

ENV = "CGJAX_KILL_AT"
_hits: dict[str, int] = {}


def hit(name: str) -> None:
    """Kill this process (SIGKILL) if ``CGJAX_KILL_AT`` names ``name`` (at this hit count)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
