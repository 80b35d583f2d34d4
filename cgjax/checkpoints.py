"""Every orbax call of cgjax: the only module that imports orbax.

- A training stage's ``CheckpointManager`` (:func:`manager`; items ``state``: params, optimizer
  state, step, RNG; ``meta``: JSON with the data-iterator state, concept index and validation)
  with keep-N and best-N policies, and save / restore on it (:func:`save`, :func:`restore`,
  :func:`restore_latest_good`, :func:`read_meta`, :func:`saved_tree`, :func:`restore_state`).
- A plain keep-N manager with the same two items (:func:`plain_manager`: the prototype trainer's
  epochs, prototype checkpoints) and save / restore of one step as it is (:func:`save_step`,
  :func:`restore_step`).
- Single checkpoints at a path, without a manager: a pytree (:func:`save_tree`,
  :func:`restore_tree`: params-only bases, the doctor's pod check) and the same ``state`` + ``meta``
  items (:func:`save_items`, :func:`read_items_meta`, :func:`restore_items_state`: converted
  open_clip towers).
"""
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
           "read_meta", "saved_tree", "tree_differences", "restore_state", "plain_manager", "save_step",
           "restore_step", "save_tree", "restore_tree", "save_items", "read_items_meta", "restore_items_state"]

ITEMS = ("state", "meta")


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


def plain_manager(directory: str, *, keep: int | None = None, create: bool = True,
                  this_process_only: bool = False):
    """A ``CheckpointManager`` in ``directory`` with the items ``state`` and ``meta`` and synchronous
    saves: the last ``keep`` steps are kept (``None``: all); the folder is made if missing when
    ``create``. With ``this_process_only`` the calling process alone writes (a small replicated
    checkpoint the other processes take no part in)."""
    opts = {"max_to_keep": keep, "create": create, "enable_async_checkpointing": False}
    if this_process_only:
        me = jax.process_index()
        opts["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.CheckpointManager(persistence.resolve(directory), options=ocp.CheckpointManagerOptions(**opts),
                                 item_names=ITEMS)


def save_step(mngr, step: int, state, meta: dict, metrics: dict | None = None, *, force: bool = False) -> None:
    """Save the pytree ``state`` and the JSON ``meta`` at ``step`` as they are (no copy); ``force``
    saves even where the manager's save policy would skip the step."""
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=force)


def restore_step(mngr, step: int, abstract_state=None):
    """``(state, meta)`` of ``step``, ``state`` restored into ``abstract_state`` (``ShapeDtypeStruct``
    leaves, with shardings or not; ``None``: as saved)."""
    got = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         meta=ocp.args.JsonRestore()))
    return got["state"], got["meta"]


def save(mngr, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Save ``state`` and the JSON ``meta`` at ``step`` (a copy: the caller may donate ``state``)."""
    state = jax.tree.map(jnp.copy, state)  # the next step donates the live buffers
    save_step(mngr, step, state, meta, metrics, force=True)


def restore(mngr, step: int, like_state):
    """``(state, meta)`` of ``step``, restored into the shapes and shardings of ``like_state``."""
    return restore_step(mngr, step, abstract(like_state, lambda x: x.sharding))


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


def _leaf_shapes(tree) -> dict[str, tuple]:
    """``{"opt_state.inner_opt_state.1.0.mu.concepts.values": shape}`` of a live tree or of the
    array metadata :func:`saved_tree` gives (orbax saves a named tuple as a dict of its fields)."""
    def name(k):
        return str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))

    return {".".join(name(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def tree_differences(saved, like) -> list[str]:
    """How the saved tree ``saved`` (:func:`saved_tree`) differs from the live ``like``: one line per
    array only one of them has or that has another shape (empty when they match)."""
    a, b = _leaf_shapes(saved), _leaf_shapes(like)
    out = [f"{k}: saved only" for k in sorted(set(a) - set(b))]
    out += [f"{k}: this run only" for k in sorted(set(b) - set(a))]
    out += [f"{k}: shape {a[k]} saved, {b[k]} here" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out


def restore_state(mngr, step: int, abstract_state):
    """The ``state`` item of ``step`` restored into ``abstract_state`` (``ShapeDtypeStruct`` leaves
    with shardings; a sub-tree of the saved one restores only those leaves; ``None``: all, as saved)."""
    return mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]


# ------------------------------------------------------------------ single checkpoints at a path

def save_tree(path: str, tree, *, force: bool = False) -> None:
    """Save the pytree ``tree`` (arrays may be sharded: every process writes its shards) as a
    checkpoint folder ``path`` (local or a URL); ``force`` replaces an existing one."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=force)
        ckptr.wait_until_finished()


def restore_tree(path: str, target=None):
    """The pytree saved by :func:`save_tree` in ``path``, restored into ``target`` (arrays or
    ``ShapeDtypeStruct`` leaves, with shardings or not; ``None``: as saved)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def save_items(directory: str, state, meta: dict) -> None:
    """Save the pytree ``state`` and the JSON ``meta`` as the items ``state/`` and ``meta/`` of one
    checkpoint in the local folder ``directory``, which may exist and be empty (the temporary of
    :func:`cgjax.persistence.atomic_dir`): orbax writes a new folder, so the checkpoint goes to one
    inside ``directory`` and its entries are moved up."""
    os.makedirs(directory, exist_ok=True)
    inner = os.path.join(directory, "ckpt")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(inner, ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    for name in os.listdir(inner):
        os.rename(os.path.join(inner, name), os.path.join(directory, name))
    os.rmdir(inner)


def read_items_meta(directory: str) -> dict:
    """The JSON ``meta`` item of the checkpoint :func:`save_items` wrote in ``directory``."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_items_state(directory: str, abstract_state=None):
    """The ``state`` item of the checkpoint :func:`save_items` wrote in ``directory``, restored into
    ``abstract_state`` (``ShapeDtypeStruct`` leaves, with shardings or not; ``None``: as saved)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(directory, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
