"""A stage's ``metrics.jsonl`` and TensorBoard events (written by process 0), on disk or in a bucket."""
from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from cgjax import persistence


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard) of process 0. A local work dir gets each row at once; on an
    object store rows are buffered and the object rewritten at :meth:`flush` (every
    ``log.every_steps``, before a checkpoint, at the end), and TensorBoard writes to a local folder
    uploaded at :meth:`close`. Resuming from step ``s`` first drops the rows past ``s`` that the
    interrupted run had logged (and a row a kill cut in half), so no step appears twice."""

    def __init__(self, workdir: str, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self.path = persistence.join(workdir, "metrics.jsonl")
        self.remote = persistence.is_url(workdir)
        self.pending: list[str] = []
        self.tb = self._tb_local = None
        if not enabled:
            return
        if resume_step is not None:
            persistence.keep_lines(self.path, lambda ln: _row_step(ln) is not None and _row_step(ln) <= resume_step)
        elif persistence.exists(self.path):
            persistence.write_text(self.path, "")  # a fresh run: no rows of an earlier one
        if tensorboard:
            if self.remote:
                self._tb_local = tempfile.mkdtemp(prefix="cgjax-tensorboard-")
            self.tb = SummaryWriter(self._tb_local or persistence.join(workdir, "tensorboard"))

    def flush(self) -> None:
        if self.pending:
            persistence.append_lines(self.path, self.pending)
            self.pending = []

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _py(v) for k, v in metrics.items()}}
        self.pending.append(json.dumps(row) + "\n")
        if not self.remote:
            self.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if not self.enabled:
            return
        self.flush()
        if self.tb is not None:
            self.tb.close()
            if self._tb_local:
                persistence.upload_tree(self._tb_local, persistence.join(self.workdir, "tensorboard"))
                shutil.rmtree(self._tb_local, ignore_errors=True)


def _row_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; None for a blank or cut-off one."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def _py(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, jax.Array):
        return np.asarray(v).item()
    return v
