"""Faults with real processes: ``kill -9`` of a run, then the same command again, for Stage A, its
``.pt`` export, inference and the prototype stage. Each resumed run ends with what an uninterrupted
run gives, bit for bit, and leaves no temporary behind. Kills land at seeded random steps (during
a step, or while an async checkpoint save is in flight) or at the named points of
``cgjax.failpoints`` (a file staged but not renamed, an epoch computed but not saved).
docs/reliability.md keeps the table of what was tried.
"""
from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest

import multiproc
from cgjax import failpoints

pytestmark = pytest.mark.slow
STEPS = 12
MESH = "data=1"
INFER = os.path.join(multiproc.ROOT, "scripts", "infer.py")


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


def _leftovers(folder: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp-" in n]


def _killed_at(argv_: list[str], point: str, log_dir: str, timeout: float = 400) -> None:
    """Runs ``argv_`` with ``CGJAX_KILL_AT=point``: it must die by SIGKILL there."""
    launch = multiproc.Launch(argv_, 1, 1, log_dir, env={failpoints.ENV: point})
    codes = launch.wait(timeout)
    assert codes == [-signal.SIGKILL], f"not killed at {point} ({codes}):\n{launch.tail()}"


def test_kill_9_in_steps_saves_and_export_then_resume_is_bit_identical(demo_root, uninterrupted, tmp_path):
    """One Stage A run killed three times, then the relaunch that finishes it: at two seeded random
    steps (a checkpoint every 2 steps, saved asynchronously, so a kill can land in a save) and with
    the final ``.pt`` staged but not renamed. Each relaunch is the same command."""
    wd = str(tmp_path / "run")
    first, second = sorted(random.Random(0).sample(range(1, STEPS - 1), 2))  # train rows logged before each kill
    second = max(second, first + 3)  # past the checkpoint the first relaunch resumes from
    metrics = os.path.join(wd, "metrics.jsonl")

    def reached(n: int):
        def check() -> bool:
            try:
                return sum(1 for ln in open(metrics) if '"split": "train"' in ln) >= n
            except OSError:
                return False
        return check

    for i, n in enumerate((first, second)):
        launch = multiproc.Launch(argv(wd, demo_root), 1, 1, str(tmp_path / f"logs{i}"))
        codes = launch.wait(400, until=reached(n), then=lambda la: la.signal(0, signal.SIGKILL))
        assert codes == [-signal.SIGKILL], f"the run ended before the kill at {n} train rows ({codes})"
    _killed_at(argv(wd, demo_root), "before_rename:concepts_stageA.pt", str(tmp_path / "logs2"))
    assert not os.path.exists(os.path.join(wd, "concepts_stageA.pt"))  # staged, never renamed
    assert _leftovers(wd), "the kill should have left the staged .pt behind"
    multiproc.run(argv(wd, demo_root), 1, 1, str(tmp_path / "logs3"), timeout=400)

    a, b = multiproc.train_losses(uninterrupted), multiproc.train_losses(wd)  # each step once
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]
    np.testing.assert_array_equal(_values(wd), _values(uninterrupted))
    assert not _leftovers(wd)


def infer_argv(stage_wd: str, root: str, out: str) -> list[str]:
    """``scripts/infer.py`` on the demo's 7 test images with the Stage A values, reasoning.json
    rewritten every 2 images."""
    return [INFER, "--config", os.path.join(multiproc.ROOT, "configs", "infer.py:preset=demo"),
            f"--config.workdir={out}", f"--config.output_dir={out}", f"--config.llava_checkpoint={root}/llava_tiny",
            f"--config.stage_workdir={stage_wd}", "--config.prototypes.workdir=",
            f"--config.signals={root}/signals/concept_signals.keyed.json",
            f"--config.data.dataset_json={root}/data/dataset.json", f"--config.data.images_root={root}/data",
            "--config.write_every=2", "--config.generation.batch_size=2", "--config.generation.max_new_tokens=12",
            "--config.prompt.mode=structured", "--config.baseline=false", "--config.saliency.enabled=false",
            f"--config.compile_cache_dir={os.path.join(root, 'jax_cache')}"]


def test_kill_9_during_inference_then_rerun_gives_the_same_answers(demo_root, uninterrupted, tmp_path):
    """Killed while its second rewrite of reasoning.json is staged: the rerun keeps the first
    write's answers, answers the rest, and ends with an uninterrupted run's file."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    multiproc.run(infer_argv(uninterrupted, demo_root, ref), 1, 1, str(tmp_path / "logs_ref"), timeout=400)
    _killed_at(infer_argv(uninterrupted, demo_root, out), "before_rename:reasoning.json@2", str(tmp_path / "logs1"))
    kept = json.load(open(os.path.join(out, "reasoning.json")))  # the first write: 2 images
    assert len(kept) == 2
    multiproc.run(infer_argv(uninterrupted, demo_root, out), 1, 1, str(tmp_path / "logs2"), timeout=400)
    with open(os.path.join(tmp_path / "logs2", "process0.log")) as f:
        assert "2 answered before under the same settings" in f.read()
    got, want = (json.load(open(os.path.join(d, "reasoning.json"))) for d in (out, ref))
    assert sorted(got) == sorted(want) and len(want) == 7
    for k in want:
        assert {p: a for p, a in got[k].items() if p != "__meta__"} == \
            {p: a for p, a in want[k].items() if p != "__meta__"}
    assert not _leftovers(out)


def prototype_argv(workdir: str) -> list[str]:
    return [multiproc.TRAIN, "--config", os.path.join(multiproc.ROOT, "configs", "prototypes.py:preset=demo"),
            "--workdir", workdir, "--config.data.demo.n_images=48", "--config.trainer.epochs=3"]


def test_kill_9_in_the_prototype_stage_then_resume_is_bit_identical(tmp_path):
    """Killed with epoch 2 computed but not saved, then with a signals file staged but not renamed:
    the relaunches resume from epoch 1 and end with the uninterrupted run's files, byte for byte."""
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "run")
    multiproc.run(prototype_argv(ref), 1, 1, str(tmp_path / "logs_ref"), timeout=400)
    _killed_at(prototype_argv(wd), "prototype_epoch@2", str(tmp_path / "logs1"))
    _killed_at(prototype_argv(wd), "before_rename:concept_signals_style.json", str(tmp_path / "logs2"))
    multiproc.run(prototype_argv(wd), 1, 1, str(tmp_path / "logs3"), timeout=400)
    with open(os.path.join(tmp_path / "logs2", "process0.log")) as f:
        assert "resumed from" in f.read()
    art = lambda d: os.path.join(d, "artifacts")  # noqa: E731
    names = sorted(n for n in os.listdir(art(ref)) if n.startswith("concept_signals_"))
    assert names and sorted(n for n in os.listdir(art(wd)) if n.startswith("concept_signals_")) == names
    for n in names:
        assert open(os.path.join(art(wd), n), "rb").read() == open(os.path.join(art(ref), n), "rb").read(), n
    h_ref, h_wd = (json.load(open(os.path.join(art(d), "metrics.json")))["history"] for d in (ref, wd))
    assert h_wd == h_ref and len(h_ref) == 3
    assert not _leftovers(wd)
