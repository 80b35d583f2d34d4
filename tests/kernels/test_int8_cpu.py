"""cgjax's int8 CPU matmul (cgjax.kernels.int8_cpu): exact against numpy's integer product, and the
model's packed weights give the numbers of XLA's int8 matmul."""
import os
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cgjax import quantize
from cgjax.kernels import int8_cpu

def integer_product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The exact product in numpy (int64 accumulation)."""
    return (np.asarray(x, np.int64) @ np.asarray(w, np.int64)).astype(np.int32)


needs_kernel = pytest.mark.skipif(not int8_cpu.available(), reason=f"int8 CPU kernel not used: {int8_cpu.unavailable_reason()}")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernel is for XLA:CPU")
def test_the_kernel_builds_where_it_can_serve():
    """A CPU with VNNI and a C++ compiler must get the kernel: a broken build fails here instead of
    skipping every kernel test."""
    if not int8_cpu.cpu_has_vnni() or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("this machine has no AVX512-VNNI or no C++ compiler: XLA's int8 matmul serves")
    if os.environ.get("CGJAX_INT8_KERNEL") == "0":
        pytest.skip("CGJAX_INT8_KERNEL=0")
    assert int8_cpu.unavailable_reason() is None


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 4, 16), (5, 8, 48), (6, 12, 64), (7, 20, 80), (13, 64, 112), (4, 512, 2752),
                                   (848, 512, 1536), (37, 1376, 512)])
def test_matmul_is_the_exact_integer_product(m, k, n):
    """Every tile shape (rows 1-6 and 16-64 columns, their remainders) and both threads' share."""
    rng = np.random.default_rng(m * 7 + n)
    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    x[0, :4] = -128  # the extremes, where an offset error would show
    w[:4, 0] = -128
    wp, comp = int8_cpu.pack(jnp.asarray(w))
    got = np.asarray(jax.jit(int8_cpu.matmul)(jnp.asarray(x), wp, comp))
    np.testing.assert_array_equal(got, integer_product(x, w))


def test_pack_refuses_a_width_it_cannot_tile():
    with pytest.raises(ValueError, match="K % 4 == 0 and N % 16 == 0"):
        int8_cpu.pack(jnp.zeros((6, 16), jnp.int8))
    with pytest.raises(ValueError, match="int8"):
        int8_cpu.pack(jnp.zeros((8, 16), jnp.float32))
    assert int8_cpu.packable(8, 32) and not int8_cpu.packable(8, 40)


@needs_kernel
@pytest.mark.parametrize("n_in,shape", [(1, (64, 4, 8)), (2, (4, 16, 32))])
def test_packed_dot_gives_the_int8_matmul(monkeypatch, n_in, shape):
    """The model's product on a packed weight equals XLA's w8a8 int8 matmul (quantize.dot)."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=shape).astype(np.float32)
    q, s = quantize.quantize_array(jnp.asarray(w), quantize.scale_shape(shape, n_in, quantize.QuantConfig("int8"), "w"),
                                   jnp.int8)
    x = jnp.asarray(rng.normal(size=(3, 5) + shape[:n_in]).astype(np.float32))
    packed = quantize.pack(q, n_in)
    assert packed is not None
    got = jax.jit(lambda x: quantize.packed_dot(x, [p.get_value() for p in packed], s, n_in))(x)
    monkeypatch.setattr(quantize, "CPU_BF16_MIN_ROWS", 10**9)  # XLA's int8 matmul for any number of rows
    want = jax.jit(lambda x: quantize.dot(x, q, s, n_in, True))(x)
    assert got.shape == want.shape == x.shape[:2] + shape[n_in:]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_unavailable_leaves_the_weight_as_it_is(monkeypatch):
    monkeypatch.setattr(int8_cpu, "available", lambda: False)
    assert quantize.pack(jnp.zeros((8, 16), jnp.int8), 1) is None


@needs_kernel
def test_sharded_operands_give_the_same_product():
    """The custom call has no sharding rule: on a mesh XLA gathers its operands (the tests run on 8
    CPU devices) and the product is still exact."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if jax.device_count() < 8:
        pytest.skip("needs 8 CPU devices (tests/conftest.py sets them)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (16, 64), dtype=np.int8)
    w = rng.integers(-128, 128, (64, 128), dtype=np.int8)
    wp, comp = int8_cpu.pack(jnp.asarray(w))
    args = (jax.device_put(x, NamedSharding(mesh, P("data", None))), jax.device_put(wp, NamedSharding(mesh, P("model"))),
            jax.device_put(comp, NamedSharding(mesh, P("model"))))
    np.testing.assert_array_equal(np.asarray(jax.jit(int8_cpu.matmul)(*args)), integer_product(x, w))
