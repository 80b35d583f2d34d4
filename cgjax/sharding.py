"""Logical-axis sharding: parameter annotations, the rule table, and mesh helpers.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ...). A rule
table, owned by the config, maps logical names to mesh axes (``data``, ``fsdp``,
``tensor``). The same model runs unchanged on one device, on 8 virtual CPU devices and on
a pod: only the mesh and the rule table change.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch", None),
    ("channels", None),
    ("positions", None),
    ("concepts", None),
    ("concept_tokens", None),
    ("proj", None),
)


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` annotated with logical axis names (sharded later, not eagerly)."""
    if len(axes) != np.ndim(value):
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter rank {np.ndim(value)}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A topology-aware ``(data, fsdp, tensor)`` mesh (``jax.make_mesh``). ``shape`` may leave out
    axes (size 1); by default every device goes on ``data``. A size of -1 takes the remaining
    devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {ax: 1 for ax in MESH_AXES}
    sizes.update(dict(shape or {"data": -1}))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    for ax, s in sizes.items():
        if s == -1:
            sizes[ax] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, but {len(devices)} are given")
    # jax.make_mesh lays the axes out on the physical topology (ICI rings on TPU); elsewhere it
    # is the plain reshape. Auto axes: the model's sharding is declared, XLA propagates the rest.
    return jax.make_mesh([sizes[a] for a in MESH_AXES], MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=8,tensor=1"`` -> ``{"data": 1, "fsdp": 8, "tensor": 1}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh entry {part!r} is not of the form axis=size")
        out[name.strip()] = int(size)
    return out


def logical_to_spec(
    axes: Sequence[str | None] | None,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``. A mesh axis is used at most once;
    with ``mesh`` and ``shape`` given, a dimension that does not divide evenly over its
    mesh axes stays replicated."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and (mesh is None or a in mesh.shape))
        if mesh is not None and shape is not None:
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if size > 1 and shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every variable of an (abstract or concrete) ``nnx.State``."""

    def one(var):
        axes = var.get_metadata().get("out_sharding")
        spec = logical_to_spec(axes, rules, mesh, np.shape(var.get_value()))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of ``model`` on ``mesh`` by its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())),
        state,
        shardings,
        is_leaf=_is_variable,
    )
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding for an input batch: leading axis over ``batch``'s mesh axes, rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding by logical axes when a mesh is set (``jax.set_mesh``);
    a no-op otherwise. Keeps the batch split over ``data``/``fsdp`` inside the layer stack, where
    FSDP-sharded weights would otherwise pull activations to full-batch replicas."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh, x.shape))


def canonical_sharding(s, mesh) -> NamedSharding:
    """``s`` as a NamedSharding on ``mesh`` without mesh axes of size 1 (jit outputs drop them)."""
    if not isinstance(s, NamedSharding):
        return NamedSharding(mesh, PartitionSpec())
    spec = []
    for e in s.spec:
        axes = tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if s.mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(s.mesh, PartitionSpec(*spec))
