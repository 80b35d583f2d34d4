"""An int8 matmul for XLA:CPU on AVX512-VNNI (``int8_matmul.cc``, an XLA FFI custom call).

XLA:CPU multiplies int8 matrices at about half the speed of PyTorch's fbgemm, and repacks the
weight in every call, which bounds a decode step (``scripts/bench.py int8``). This kernel takes the
weight packed once (:func:`pack`) in VNNI's layout and shares its column tiles with XLA's
intra-op thread pool. It is built from source with the system C++ compiler the first time it is
needed, into ``$CGJAX_CACHE`` (default ``~/.cache/cgjax``); without a compiler, without VNNI, off
a CPU backend, or with ``CGJAX_INT8_KERNEL=0``, :func:`available` is False and cgjax keeps XLA's own
int8 matmul. qwix has no kernels of its own on a CPU (its ``dot_general`` lowers to XLA's), so this
is the one place cgjax writes its own int8 dot.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

TARGET = "cgjax_int8_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_matmul.cc")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
CPU_FEATURES = ("avx512f", "avx512bw", "avx512_vnni")


def cpu_has_vnni() -> bool:
    """Whether this CPU has the instructions the kernel needs (``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(feature in flags for feature in CPU_FEATURES)


def _build() -> str:
    """The compiled library's path (built once per source and compiler flags, written to a temporary
    name and renamed, so concurrent builds never load a half-written file)."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + jax.ffi.include_dir().encode()).hexdigest()[:16]
    cache = os.environ.get("CGJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cgjax")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"int8_matmul-{digest}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            cmd = [os.environ.get("CXX", "g++"), *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel does not serve here (None when it does): ``CGJAX_INT8_KERNEL=0``, not a CPU
    backend, no AVX512-VNNI, or a failed build. Builds the kernel if needed (once per process)."""
    if os.environ.get("CGJAX_INT8_KERNEL", "1") == "0":
        return "CGJAX_INT8_KERNEL=0"
    if jax.default_backend() != "cpu":
        return f"the {jax.default_backend()} backend has its own int8 matmuls"
    if not cpu_has_vnni():
        return "this CPU has no AVX512-VNNI"
    try:
        lib = _build()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        return f"it did not build ({detail[:300]})"
    handler = ctypes.cdll.LoadLibrary(lib).CgjaxInt8Matmul
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return None


@functools.cache
def available() -> bool:
    """Whether the kernel serves here (see :func:`unavailable_reason`); registers the custom call on
    first use. The call has no sharding rule: on several CPU devices XLA gathers sharded operands
    first (the same numbers, not partitioned). A failed build is said once, on stderr."""
    reason = unavailable_reason()
    if reason and reason.startswith("it did not build"):
        print(f"cgjax: the int8 CPU kernel: {reason}; using XLA's int8 matmul", file=sys.stderr)
    return reason is None


def packable(k: int, n: int) -> bool:
    """Whether a ``[k, n]`` weight fits the kernel's layout (``k % 4 == 0`` and ``n % 16 == 0``)."""
    return k % 4 == 0 and n % 16 == 0


def pack(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(wp, comp)`` of an int8 weight ``w [K, N]``: ``wp [N/16, K/4, 16, 4]`` with
    ``wp[nb, kb, j, i] = w[4 kb + i, 16 nb + j]`` and ``comp [N] = 128 * sum_k w[k, n]`` (int32)."""
    k, n = w.shape
    if w.dtype != jnp.int8 or not packable(k, n):
        raise ValueError(f"pack needs an int8 [K, N] weight with K % 4 == 0 and N % 16 == 0, got {w.dtype} {w.shape}")
    wp = w.reshape(k // 4, 4, n // 16, 16).transpose(2, 0, 3, 1)
    comp = 128 * jnp.sum(w.astype(jnp.int32), axis=0)
    return wp, comp


def matmul(x: jax.Array, wp: jax.Array, comp: jax.Array) -> jax.Array:
    """``x [M, K] int8`` times the packed weight -> ``[M, N] int32`` (exact)."""
    m = x.shape[0]
    n = wp.shape[0] * 16
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.int32))(x, wp, comp)
