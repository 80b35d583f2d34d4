"""The conversion engine on a toy stacked model: both directions, transforms, errors, I/O."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from cgjax import sharding
from converters import common as C

L, D, H, M = 3, 8, 2, 12


class Block(nnx.Module):
    def __init__(self, rngs):
        self.qkv = sharding.param(jnp.zeros((D, 3, H, D // H)), ("embed", None, "heads", "head_dim"))
        self.qkv_b = sharding.param(jnp.zeros((3, H, D // H)), (None, "heads", "head_dim"))
        self.out = sharding.param(jnp.zeros((H, D // H, D)), ("heads", "head_dim", "embed"))


class Toy(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return Block(r)

        self.blocks = make(rngs)
        self.conv = sharding.param(jnp.zeros((2, 2, 3, D)), ("patch", "patch", "channels", "embed"))
        self.fc = sharding.param(jnp.zeros((D, M)), ("embed", "mlp"))


def abstract():
    return nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))


FUSED = [
    (r"l\.(\d+)\.in_proj_weight", "blocks.qkv[{0}]", C.Linear(1)),
    (r"l\.(\d+)\.in_proj_bias", "blocks.qkv_b[{0}]", C.Reshape()),
    (r"l\.(\d+)\.out\.weight", "blocks.out[{0}]", C.Linear(2)),
    (r"conv\.weight", "conv", C.Conv2d()),
    (r"fc\.weight", "fc", C.Linear(1)),
]
SPLIT = [(r"l\.(\d+)\.in_proj_weight", tuple(f"blocks.qkv[{{0}},:,{s}]" for s in range(3)), C.Split(3, 0, C.Linear(1)))] + FUSED[1:]
SEPARATE = [
    (rf"l\.(\d+)\.{n}\.weight", f"blocks.qkv[{{0}},:,{s}]", C.Linear(1)) for s, n in enumerate("qkv")
] + [
    (rf"l\.(\d+)\.{n}\.bias", f"blocks.qkv_b[{{0}},{s}]", C.Reshape()) for s, n in enumerate("qkv")
] + FUSED[2:]


@pytest.fixture(scope="module")
def torch_sd():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(L):
        sd[f"l.{i}.in_proj_weight"] = torch.randn(3 * D, D, generator=g)
        sd[f"l.{i}.in_proj_bias"] = torch.randn(3 * D, generator=g)
        sd[f"l.{i}.out.weight"] = torch.randn(D, D, generator=g)
    sd["conv.weight"] = torch.randn(D, 3, 2, 2, generator=g)
    sd["fc.weight"] = torch.randn(M, D, generator=g)
    return sd


def _equal_sd(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        x = a[k].numpy() if hasattr(a[k], "numpy") else np.asarray(a[k])
        y = b[k].numpy() if hasattr(b[k], "numpy") else np.asarray(b[k])
        assert x.shape == y.shape and np.array_equal(x, y), k


def test_values_land_where_torch_math_says(torch_sd):
    m = C.load_state(abstract(), torch_sd, FUSED)
    w = torch_sd["l.1.in_proj_weight"].numpy()
    x = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    want = w @ x  # torch: y = W x, rows q | k | v, heads contiguous
    got = np.einsum("d,dshk->shk", x, np.asarray(m.blocks.qkv.get_value()[1]))
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-5)
    conv = torch_sd["conv.weight"].numpy()
    assert np.array_equal(np.asarray(m.conv.get_value()), conv.transpose(2, 3, 1, 0))
    assert np.array_equal(np.asarray(m.blocks.out.get_value()[2]).reshape(D, D), torch_sd["l.2.out.weight"].numpy().T)


@pytest.mark.parametrize("rules", [FUSED, SPLIT], ids=["fused", "split"])
def test_round_trip_bitwise(torch_sd, rules):
    m = C.load_state(abstract(), torch_sd, rules)
    _equal_sd(C.export_state(m, rules), torch_sd)


def test_separate_qkv_into_fused_slots(torch_sd):
    fused = C.load_state(abstract(), torch_sd, FUSED)
    sep_sd = C.export_state(fused, SEPARATE)
    assert "l.2.k.weight" in sep_sd and "l.0.v.bias" in sep_sd
    assert np.array_equal(sep_sd["l.1.k.weight"], torch_sd["l.1.in_proj_weight"].numpy()[D:2 * D])
    again = C.load_state(abstract(), sep_sd, SEPARATE)
    _equal_sd(C.export_state(again, FUSED), torch_sd)


def test_missing_key_named(torch_sd):
    sd = C.export_state(C.load_state(abstract(), torch_sd, FUSED), SEPARATE)
    del sd["l.1.k.weight"]
    with pytest.raises(KeyError, match=r"l\.1\.k\.weight"):
        C.load_state(abstract(), sd, SEPARATE)
    sd2 = dict(torch_sd)
    del sd2["l.2.out.weight"]
    with pytest.raises(KeyError, match=r"l\.2\.out\.weight"):
        C.load_state(abstract(), sd2, FUSED)


def test_unexpected_and_misshaped_key_named(torch_sd):
    sd = dict(torch_sd, **{"extra.thing": torch.zeros(2)})
    with pytest.raises(KeyError, match=r"extra\.thing"):
        C.load_state(abstract(), sd, FUSED)
    C.load_state(abstract(), sd, FUSED, ignore=[r"extra\..*"])  # ignored on request
    sd = dict(torch_sd, **{"fc.weight": torch.zeros(M, D + 1)})
    with pytest.raises(ValueError, match=r"fc\.weight.*\(12, 9\).*\(12, 8\)"):
        C.load_state(abstract(), sd, FUSED)


def test_bad_tables_rejected():
    with pytest.raises(ValueError, match="only literal text"):
        C.Rule(r"a\.(.*)", "x")
    with pytest.raises(ValueError, match="Split"):
        C.Rule(r"a", ("x", "y"))
    with pytest.raises(KeyError, match="nope"):
        C.load_state(abstract(), {"fc.weight": torch.zeros(M, D)}, [(r"fc\.weight", "nope", C.Linear(1))])


def test_sharded_placement_on_mesh(torch_sd):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    m = C.load_state(abstract(), torch_sd, FUSED, mesh=mesh)
    qkv = m.blocks.qkv.get_value()
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    assert len(qkv.addressable_shards) == 8
    assert qkv.addressable_shards[0].data.shape == (L, D // 4, 3, H // 2, D // H)
    _equal_sd(C.export_state(m, FUSED), torch_sd)


def test_read_tensors_formats(tmp_path, torch_sd):
    np_sd = {k: v.numpy() for k, v in torch_sd.items()}
    # single safetensors, fp32
    single = C.save_safetensors(np_sd, str(tmp_path / "one.safetensors"))[0]
    _equal_sd(C.read_tensors(single).to_numpy(), np_sd)
    # sharded directory + index
    files = C.save_safetensors(np_sd, str(tmp_path / "sharded"), max_shard_bytes=400)
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and len(files) > 2
    _equal_sd(C.read_tensors(str(tmp_path / "sharded")).to_numpy(), np_sd)
    # no temporary leftovers
    assert not [f for f in os.listdir(tmp_path / "sharded") if f.startswith(".tmp")]
    # bf16 / fp16 files come back as float32 / float16 with the rounded values
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in np_sd.items()}
    C.save_safetensors(bf, str(tmp_path / "bf16.safetensors"))
    st = C.read_tensors(str(tmp_path / "bf16.safetensors"))
    assert st["fc.weight"].dtype == "BF16"
    got = st.load("fc.weight")
    assert got.dtype == np.float32 and np.array_equal(got, bf["fc.weight"].astype(np.float32))
    torch.save({k: v.to(torch.bfloat16) for k, v in torch_sd.items()}, tmp_path / "bf16.pt")
    assert np.array_equal(C.read_tensors(str(tmp_path / "bf16.pt")).load("fc.weight"), got)
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in torch_sd.items()}, str(tmp_path / "fp16.safetensors"))
    h = C.read_tensors(str(tmp_path / "fp16.safetensors")).load("conv.weight")
    assert h.dtype == np.float16 and np.array_equal(h, torch_sd["conv.weight"].half().numpy())
    # safetensors written by us load in torch, bf16 included
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "bf16.safetensors"))["fc.weight"].dtype == torch.bfloat16
    # wrapped .pt state dict with module. prefix, torch module, dict
    torch.save({"state_dict": {"module." + k: v for k, v in torch_sd.items()}}, tmp_path / "wrapped.pt")
    _equal_sd(C.read_tensors(str(tmp_path / "wrapped.pt")).to_numpy(), np_sd)
    lin = torch.nn.Linear(3, 2)
    assert set(C.read_tensors(lin)) == {"weight", "bias"}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        C.read_tensors(str(tmp_path / "nowhere.safetensors"))


def test_load_from_bf16_file_into_fp32_params(tmp_path, torch_sd):
    bf = {k: v.to(torch.bfloat16) for k, v in torch_sd.items()}
    from safetensors.torch import save_file

    save_file(bf, str(tmp_path / "m.safetensors"))
    m = C.load_state(abstract(), str(tmp_path / "m.safetensors"), FUSED, dtype=jnp.float32)
    assert m.fc.get_value().dtype == jnp.float32
    _equal_sd(C.export_state(m, FUSED), {k: v.float() for k, v in bf.items()})
