"""orbax checkpoints of a training stage: one ``CheckpointManager`` layout (``state``: params,
optimizer state, step, RNG; ``meta``: JSON with the data-iterator state, concept index and
validation) with keep-N and best-N policies, and save / restore on it."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as cm

from cgjax import multihost, persistence

__all__ = ["manager", "abstract", "save", "restore", "restore_latest_good", "stage_dir", "has_checkpoints",
           "read_meta", "saved_tree", "restore_state"]


def manager(directory: str, config, read_only: bool = False):
    """The stage's ``CheckpointManager`` in ``directory``: keep the last ``config.checkpoint.keep``
    and the ``keep_best`` best by validation key accuracy, async saves if configured."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if read_only:
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                     item_handlers=handlers)
    policies = [cm.LatestN(max(1, int(config.checkpoint.keep)))]
    if int(config.checkpoint.keep_best) > 0:
        policies.append(cm.BestN(get_metric_fn=lambda m: m["val_key_acc"], reverse=False,
                                 n=int(config.checkpoint.keep_best), keep_checkpoints_without_metrics=False))
    opts = ocp.CheckpointManagerOptions(preservation_policy=cm.AnyPreservationPolicy(policies), create=True,
                                        enable_async_checkpointing=bool(config.checkpoint.async_save))
    return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def abstract(tree, sharding_of: Callable[[Any], Any]):
    """``ShapeDtypeStruct`` tree of ``tree`` with the shardings ``sharding_of(leaf)``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def save(mngr, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Save ``state`` and the JSON ``meta`` at ``step`` (a copy: the caller may donate ``state``)."""
    state = jax.tree.map(jnp.copy, state)  # the next step donates the live buffers
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


def restore(mngr, step: int, like_state):
    """``(state, meta)`` of ``step``, restored into the shapes and shardings of ``like_state``."""
    abstract_state = abstract(like_state, lambda x: x.sharding)
    got = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         meta=ocp.args.JsonRestore()))
    return got["state"], got["meta"]


def restore_latest_good(mngr, like_state):
    """``(state, meta, step)`` of the newest step that restores. A step that does not (a truncated
    or half-copied checkpoint) is renamed ``<step>.unreadable-<n>`` beside the others, with a
    warning, and the step before it is tried; with no good step left the last error is raised."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            state, meta = restore(mngr, step, like_state)
            return state, meta, int(step)
        except Exception as e:  # noqa: BLE001 - any failure to read a step: fall back, say why
            if i == len(steps) - 1:
                raise
            logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); falling back to step %d",
                            step, mngr.directory, type(e).__name__, str(e).splitlines()[0][:300], steps[i + 1])

            def set_aside(step=step):
                src = persistence.join(str(mngr.directory), str(step))
                n = 0
                while persistence.exists(f"{src}.unreadable-{n}"):
                    n += 1
                if persistence.is_url(src):
                    persistence.Path(src).rename(f"{src}.unreadable-{n}")
                else:
                    os.rename(src, f"{src}.unreadable-{n}")

            multihost.on_primary("setting an unreadable checkpoint aside", set_aside)
            mngr.reload()
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")


def stage_dir(path: str) -> str:
    """A stage work dir's ``checkpoints/`` folder (``path`` itself when it has none)."""
    path = persistence.resolve(path)
    sub = persistence.join(path, "checkpoints")
    return sub if persistence.isdir(sub) else path


def has_checkpoints(directory: str) -> bool:
    """Whether ``directory`` holds a checkpoint step (read-only: nothing is created)."""
    if not persistence.isdir(directory):
        return False
    mngr = manager(directory, None, read_only=True)
    try:
        return mngr.latest_step() is not None
    finally:
        mngr.close()


def read_meta(mngr, step: int) -> dict:
    """The JSON ``meta`` item of ``step``."""
    return mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def saved_tree(mngr, step: int):
    """The saved ``state`` tree of ``step`` as array metadata (shapes and dtypes; nothing is read)."""
    tree = mngr.item_metadata(int(step))["state"]
    return getattr(tree, "tree", tree)


def restore_state(mngr, step: int, abstract_state):
    """The ``state`` item of ``step`` restored into ``abstract_state`` (``ShapeDtypeStruct`` leaves
    with shardings; a sub-tree of the saved one restores only those leaves)."""
    return mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
