"""Faults with real processes: ``kill -9`` of a training run at seeded random points (during a step,
or while an async checkpoint save is in flight), then the same command again. The resumed run
ends with the losses and values of an uninterrupted run, bit for bit; ``metrics.jsonl`` has each
step once. docs/reliability.md keeps the table of what was tried.
"""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest

import multiproc

pytestmark = pytest.mark.slow
STEPS = 12
MESH = "data=1"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return multiproc.demo_assets(str(tmp_path_factory.mktemp("fault_assets")))


def argv(workdir: str, root: str) -> list[str]:
    # a checkpoint every 2 steps, saved asynchronously: kills land in steps and in saves
    return multiproc.stage_argv("A", workdir, root, MESH, STEPS, "--config.checkpoint.every_steps=2",
                                "--config.checkpoint.async_save=true", "--config.val.at_end=false")


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("uninterrupted"))
    multiproc.run(argv(wd, demo_root), 1, 1, wd + "_logs", timeout=400)
    return wd


def _values(workdir: str) -> np.ndarray:
    import torch

    blob = torch.load(os.path.join(workdir, "concepts_stageA.pt"), weights_only=True)
    return blob[STEPS]["values"].numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_during_training_then_resume_is_bit_identical(demo_root, uninterrupted, tmp_path, seed):
    wd = str(tmp_path / "run")
    kill_after = random.Random(seed).randint(1, STEPS - 2)  # train rows logged before the kill
    metrics = os.path.join(wd, "metrics.jsonl")

    def reached() -> bool:
        try:
            return sum(1 for ln in open(metrics) if '"split": "train"' in ln) >= kill_after
        except OSError:
            return False

    first = multiproc.Launch(argv(wd, demo_root), 1, 1, str(tmp_path / "logs1"))
    codes = first.wait(400, until=reached, then=lambda la: la.signal(0, signal.SIGKILL))
    assert codes == [-signal.SIGKILL], f"the run ended before the kill ({codes})"
    multiproc.run(argv(wd, demo_root), 1, 1, str(tmp_path / "logs2"), timeout=400)
    a, b = multiproc.train_losses(uninterrupted), multiproc.train_losses(wd)  # each step once
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]
    np.testing.assert_array_equal(_values(wd), _values(uninterrupted))
    leftovers = [n for n in os.listdir(wd) if n.startswith(".") and ".tmp-" in n]
    assert not leftovers
