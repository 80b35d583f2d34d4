"""Weight-only quantization of the frozen base (int8 per output channel, int4 in groups), on qwix.

Only the concept values train; the LLaVA base is frozen, so its linear layers can be held in 8 or
4 bits. A quantized weight is two parameters: ``kernel`` (``int8``/``int4``, the weight's shape)
and ``kernel_scale`` (``float32``, the weight's rank with the reduced axes of size 1 -- int8 -- or
``in / group_size`` -- int4, groups along the last input axis). ``w ~ kernel * scale``.

qwix serves two parts: :func:`quantize_array` is ``qwix.quantize`` (abs-max calibration) and
:func:`dot` is ``qwix.dot_general`` on a ``qwix.QArray``. qwix's model-level PTQ
(``qwix.quantize_model``) cannot serve: it intercepts the dots of a model call and rebuilds each
weight from its sharding metadata, which for cgjax's stacked decoder layers (``nnx.vmap`` with a
leading ``layers`` axis, run under ``scan``) names one axis more than the per-layer weight it sees
(an ``AssertionError`` in ``qwix.update_sharding``); so cgjax creates the quantized parameters
itself, in their shardings, while it loads the checkpoint (``converters.common.load_state``).

``activations=True`` also quantizes each row of the activations to int8 on the fly (per token,
abs-max) so the matmul runs in int8 with int32 accumulation: PyTorch's ``quantize_dynamic``
scheme. On a CPU that is the fast path (XLA does not fuse a weight-only dequantization into the
matmul); on TPU/GPU weight-only is the usual choice. Generation on a CPU with AVX512-VNNI goes
further: its laid-out layers hold those weights packed (:func:`pack`) for cgjax's own int8 matmul
(:mod:`cgjax.kernels.int8_cpu`, :func:`packed_dot`), about twice as fast as XLA:CPU's per decoder
layer (``scripts/bench.py int8``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from absl import flags
from flax import nnx

from cgjax import sharding
from cgjax.kernels import int8_cpu

MODES = ("none", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """``mode``: none | int8 | int4; ``group_size``: int4's group along the input axis;
    ``activations``: int8 dynamic activations too (w8a8, int8 weights only)."""

    mode: str = "none"
    group_size: int = 128
    activations: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size < 1:
            raise ValueError(f"quantize_group_size must be >= 1, got {self.group_size}")
        if self.activations and self.mode != "int8":
            raise ValueError(f"quantize_activations needs quantize='int8' (got {self.mode!r})")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def qtype(self):
        return QTYPES[self.mode]

    @classmethod
    def from_config(cls, config) -> "QuantConfig":
        """From a stage/inference config's ``quantize``, ``quantize_group_size`` and
        ``quantize_activations`` (absent fields: none, 128, False)."""
        return cls(str(config.get("quantize", "none") or "none"), int(config.get("quantize_group_size", 128)),
                   bool(config.get("quantize_activations", False)))

    def to_json(self) -> dict:
        return {"mode": self.mode, "group_size": int(self.group_size), "activations": bool(self.activations)}


def scale_shape(shape: Sequence[int], n_in: int, cfg: QuantConfig, where: str) -> tuple[int, ...]:
    """The scale of a ``[*in, *out]`` weight: int8 one per output channel, int4 one per output
    channel and group of ``group_size`` consecutive inputs (the last input axis must divide by it:
    else an error naming ``where``, the layer)."""
    shape = tuple(int(s) for s in shape)
    if cfg.mode != "int4":
        return (1,) * n_in + shape[n_in:]
    width = shape[n_in - 1]
    if width % cfg.group_size:
        raise ValueError(f"quantize=int4: group size {cfg.group_size} does not divide the input width {width} "
                         f"of {where} (shape {shape}); set quantize_group_size to a divisor of {width}")
    # groups of group_size consecutive inputs of the flattened input: every index of the leading
    # input axes (e.g. o_proj's heads) is its own block, the last input axis is split
    return shape[: n_in - 1] + (width // cfg.group_size,) + shape[n_in:]


def scale_axes(axes: Sequence[str | None], n_in: int) -> tuple[str | None, ...]:
    """Logical axes of a scale: the output axes as the weight's, the (reduced) input axes replicated."""
    return (None,) * n_in + tuple(axes[n_in:])


def _qwix_axes(shape: Sequence[int], sshape: Sequence[int]):
    channelwise = tuple(i for i, (w, s) in enumerate(zip(shape, sshape)) if s == w and w > 1)
    tiled = {i: w // s for i, (w, s) in enumerate(zip(shape, sshape)) if 1 < s < w}
    return channelwise, tiled


def quantize_array(w: jax.Array, sshape: Sequence[int], qtype) -> tuple[jax.Array, jax.Array]:
    """``(qvalue, scale)`` of ``w`` (abs-max, symmetric) for the scale shape ``sshape`` (same rank:
    an axis of the weight's size keeps one scale per index, an axis of size 1 shares one, and an
    axis in between is split in equal groups). Works on stacked weights as well."""
    if len(sshape) != w.ndim:
        raise ValueError(f"scale shape {tuple(sshape)} does not match the weight's rank ({w.shape})")
    channelwise, tiled = _qwix_axes(w.shape, sshape)
    q = qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=channelwise, tiled_axes=tiled)
    scale = q.scale.reshape(tuple(sshape)).astype(jnp.float32)
    return q.qvalue, scale


#: From this many rows on, a CPU w8a8 product runs as bf16 x bf16 -> fp32 on the int8 values (see :func:`dot`).
CPU_BF16_MIN_ROWS = 256


def dot(x: jax.Array, kernel: jax.Array, scale: jax.Array, n_in: int, activations: bool = False) -> jax.Array:
    """``tensordot(x, kernel * scale, n_in)`` with the quantized weight, by ``qwix.dot_general``;
    with ``activations`` each row of ``x`` is quantized to int8 first (int8 x int8 -> int32).

    On a CPU, a w8a8 product of at least :data:`CPU_BF16_MIN_ROWS` rows (a prefill, a training
    batch) multiplies the same int8 values as bf16 with fp32 accumulation: every int8 value and
    product is exact in bf16/fp32, and XLA:CPU's bf16 matmul outruns its int8 one there (848 x 512
    x 1536: 1.6 ms against 2.0 ms); below that (decoding) the int8 matmul is the faster one."""
    lead = x.shape[:x.ndim - n_in]
    if math.prod(lead) == 0:  # no rows (a layer trimmed to last=0): qwix cannot quantize an empty array
        return jnp.zeros(lead + kernel.shape[n_in:], x.dtype)
    qtype = kernel.dtype
    qarr = qwix.QArray(kernel, scale.astype(x.dtype) if not activations else scale, qtype=qtype)
    lhs_contract = tuple(range(x.ndim - n_in, x.ndim))
    dims = ((lhs_contract, tuple(range(n_in))), ((), ()))
    if activations:
        lead = tuple(range(x.ndim - n_in))
        xq = qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=lead)
        if math.prod(x.shape[:x.ndim - n_in]) >= CPU_BF16_MIN_ROWS and jax.default_backend() == "cpu":
            return _exact_bf16_dot(xq, kernel, scale, dims, n_in).astype(x.dtype)
        return qwix.dot_general(xq, qarr, dims).astype(x.dtype)
    return qwix.dot_general(x, qarr, dims, preferred_element_type=x.dtype)


def int8_as_bf16(q: jax.Array) -> jax.Array:
    """``q.astype(bfloat16)`` for int8 ``q``, as the high half of its fp32 bits: an int8 value has at
    most 8 significant bits, so the low half is zero and dropping it is exact. XLA:CPU runs this about
    twice as fast as its rounding fp32 -> bf16 convert (0.10 against 0.18 ms for a 512 x 2752 weight)."""
    bits = jax.lax.bitcast_convert_type(q.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)


class Packed(nnx.Variable):
    """A weight in :mod:`cgjax.kernels.int8_cpu`'s packed layout (generation's laid-out layers on a CPU)."""


def pack(kernel: jax.Array, n_in: int) -> tuple[Packed, Packed] | None:
    """``(wp, comp)`` of an int8 ``kernel [*in, *out]`` for :func:`packed_dot` (the VNNI kernel of
    :mod:`cgjax.kernels.int8_cpu`), or None where that kernel does not serve (not a CPU with VNNI,
    not int8, or a width it cannot tile)."""
    k, n = math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:])
    if kernel.dtype != jnp.int8 or not int8_cpu.packable(k, n) or not int8_cpu.available():
        return None
    wp, comp = int8_cpu.pack(kernel.reshape(k, n))
    return Packed(wp), Packed(comp)


def packed_dot(x: jax.Array, packed: tuple[jax.Array, jax.Array], scale: jax.Array, n_in: int) -> jax.Array:
    """:func:`dot` with int8 activations on a weight :func:`pack` laid out: each row of ``x`` quantized
    to int8 (as :func:`dot` does), the exact int32 product from the VNNI kernel, then both scales."""
    wp, comp = packed
    lead, out_shape = x.shape[:x.ndim - n_in], scale.shape[n_in:]
    if math.prod(lead) == 0:
        return jnp.zeros(lead + out_shape, x.dtype)
    rows = x.reshape(math.prod(lead), math.prod(x.shape[x.ndim - n_in:])).astype(jnp.float32)
    xq = qwix.quantize(rows, jnp.int8, channelwise_axes=(0,))
    acc = int8_cpu.matmul(xq.qvalue, wp, comp).astype(jnp.float32)
    y = acc * xq.scale.reshape(-1, 1) * scale.reshape(1, -1).astype(jnp.float32)
    return y.reshape(lead + out_shape).astype(x.dtype)


def _exact_bf16_dot(xq, kernel, scale, dims, n_in: int) -> jax.Array:
    """The w8a8 product ``(xq.qvalue @ kernel) * xq.scale * scale`` with the int8 operands in bf16
    (exact) and fp32 accumulation; ``scale`` per output channel (int8: reduced axes of size 1)."""
    acc = jax.lax.dot_general(int8_as_bf16(xq.qvalue), int8_as_bf16(kernel), dims, preferred_element_type=jnp.float32)
    n_lead = xq.qvalue.ndim - n_in
    row_scale = xq.scale.reshape(xq.scale.shape[:n_lead] + (1,) * (acc.ndim - n_lead))
    return acc * row_scale * scale.reshape(scale.shape[n_in:]).astype(jnp.float32)


def dequantize(kernel: Any, scale: Any) -> np.ndarray:
    """The float32 weight a quantized one stands for (``kernel * scale``, groups broadcast)."""
    k = np.asarray(kernel).astype(np.float32)
    s = np.asarray(scale, np.float32)
    for ax, (w, n) in enumerate(zip(k.shape, s.shape)):
        if 1 < n < w:
            s = np.repeat(s, w // n, axis=ax)
    return k * s


def define_flags(fv: flags.FlagValues, help_text: str) -> None:
    """``--quantize``, ``--quantize-activations`` and ``--group-size`` on ``fv`` (the benchmarks'
    flags; configs use ``--config.quantize``)."""
    flags.DEFINE_enum("quantize", "none", list(MODES), help_text, flag_values=fv)
    flags.DEFINE_bool("quantize-activations", False, "with --quantize int8: int8 activations too (w8a8)",
                      flag_values=fv)
    flags.DEFINE_integer("group-size", 128, "int4: inputs per scale", flag_values=fv)


def from_flags(fv: flags.FlagValues) -> QuantConfig:
    """The :class:`QuantConfig` of the flags :func:`define_flags` defined."""
    return QuantConfig(fv.quantize, fv["group-size"].value, fv["quantize-activations"].value)


def quantize_model(float_model, quantized_abstract, mesh=None, rules=None):
    """Fill ``quantized_abstract`` (the same architecture built with an enabled ``quant``, under
    ``nnx.eval_shape``) from ``float_model``: each weight that has a ``*_scale`` sibling is
    quantized in its sharding (``mesh`` + logical-axis ``rules``), every other value is copied in
    its dtype. The float model's values are released one by one; returns the filled model."""
    qstate = nnx.state(quantized_abstract)
    qflat = dict(nnx.to_flat_state(qstate))
    fflat = dict(nnx.to_flat_state(nnx.state(float_model)))
    if mesh is not None:
        sh = dict(nnx.to_flat_state(sharding.state_shardings(qstate, mesh, rules or sharding.DEFAULT_RULES)))
        where = lambda path: sh[path].get_value()  # noqa: E731
    else:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        where = lambda path: one  # noqa: E731
    new = []
    for path, var in qflat.items():
        if path[-1].endswith(SCALE_SUFFIX):
            continue
        value = fflat.pop(path).get_value()
        scale = path[:-1] + (path[-1] + SCALE_SUFFIX,)
        if scale in qflat:
            fn = jax.jit(lambda w, s=tuple(qflat[scale].get_value().shape), t=var.get_value().dtype:
                         quantize_array(w, s, t), out_shardings=(where(path), where(scale)))
            q, sc = fn(value)
            new += [(path, var.replace(q)), (scale, qflat[scale].replace(sc))]
        else:
            new.append((path, var.replace(jax.device_put(jnp.asarray(value, var.get_value().dtype), where(path)))))
        del value
    nnx.update(quantized_abstract, nnx.from_flat_state(new))
    return quantized_abstract
