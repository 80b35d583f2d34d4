"""open_clip converter: checkpoint formats, hub layouts, round trips, errors, CLI, sharded load."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cgjax import sharding
from converters import common as C
from converters import openclip as oc
from converters.tiny_clip import cached_openclip_checkpoint


@pytest.fixture(scope="session")
def tiny():
    name, ckpt = cached_openclip_checkpoint(act="quick_gelu")
    sd = torch.load(ckpt, weights_only=True)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    model, pp = oc.load(name, ckpt)
    return name, ckpt, sd, visual, model, pp


@pytest.fixture(scope="session")
def pixels():
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))


def _params_equal(a, b):
    ea, eb = oc.export(a), oc.export(b)
    assert sorted(ea) == sorted(eb)
    for k in ea:
        assert np.array_equal(ea[k], eb[k]), k


def test_round_trip_bitwise_and_open_clip_loads_it(tiny, tmp_path):
    import open_clip

    name, _, _, visual, model, _ = tiny
    out = oc.export(model)
    assert sorted(out) == sorted(visual)
    for k, v in visual.items():
        assert out[k].dtype == np.float32 and np.array_equal(out[k], v.numpy()), k
    for path in (str(tmp_path / "v.safetensors"), str(tmp_path / "v.pt")):
        oc.save(model, path)
        sd = C.read_tensors(path).to_numpy()
        fresh = open_clip.create_model(name)
        res = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        assert not res.unexpected_keys
        assert res.missing_keys and not any(k.startswith("visual.") for k in res.missing_keys)
        for k, v in fresh.visual.state_dict().items():
            assert torch.equal(v, visual["visual." + k]), k
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_formats_safetensors_single_sharded_and_live_model(tiny, tmp_path, pixels):
    import open_clip

    name, ckpt, sd, _, model, _ = tiny
    np_sd = {k: v.numpy() for k, v in sd.items()}
    C.save_safetensors(np_sd, str(tmp_path / "single.safetensors"))
    C.save_safetensors(np_sd, str(tmp_path / "sharded"), max_shard_bytes=64 * 1024)
    assert len(json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))["weight_map"]) == len(sd)
    live = open_clip.create_model(name)
    live.load_state_dict(sd)
    for src in (str(tmp_path / "single.safetensors"), str(tmp_path / "sharded"), live, live.visual, sd):
        _params_equal(oc.load(name, src).model, model)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_files(tiny, tmp_path, half):
    from safetensors.torch import save_file

    name, _, sd, visual, _, _ = tiny
    path = str(tmp_path / "half.safetensors")
    save_file({k: v.to(half) for k, v in sd.items()}, path)
    m, _ = oc.load(name, path)
    out = oc.export(m)
    for k, v in visual.items():
        assert np.array_equal(out[k], v.to(half).float().numpy()), k
    m16, _ = oc.load(name, path, param_dtype=jnp.bfloat16)
    assert m16.blocks.mlp.fc1_kernel.get_value().dtype == jnp.bfloat16


def test_local_dir_and_hf_hub_layouts(tiny, tmp_path, pixels):
    name, ckpt, _, _, model, pp = tiny
    hub = os.path.join(os.path.dirname(ckpt), f"{name}-hub")
    m, pp2 = oc.load(f"local-dir:{hub}")
    _params_equal(m, model)
    assert pp2 == pp and pp2.size == (32, 32)
    # an offline HF cache layout: models--org--name/{refs/main, snapshots/<rev>/...}
    cache = tmp_path / "hf-cache"
    snap = cache / "models--someorg--tiny-clip" / "snapshots" / "0123abc"
    shutil.copytree(hub, snap)
    os.makedirs(cache / "models--someorg--tiny-clip" / "refs")
    (cache / "models--someorg--tiny-clip" / "refs" / "main").write_text("0123abc")
    m, _ = oc.load("hf-hub:someorg/tiny-clip", cache_dir=str(cache))
    _params_equal(m, model)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        oc.load("hf-hub:someorg/absent", cache_dir=str(cache))
    # preprocess_cfg from the hub config is honoured
    cfg = json.load(open(os.path.join(hub, "open_clip_config.json")))
    cfg["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], resize_mode="squash")
    custom = tmp_path / "custom"
    shutil.copytree(hub, custom)
    (custom / "open_clip_config.json").write_text(json.dumps(cfg))
    _, pp3 = oc.load(f"local-dir:{custom}")
    assert pp3.mean == (0.5, 0.5, 0.5) and pp3.resize_mode == "squash"


def test_errors_name_the_problem(tiny, tmp_path):
    name, _, sd, _, _, _ = tiny
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-Nope-99'"):
        oc.load("ViT-Nope-99", sd)
    broken = dict(sd)
    del broken["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        oc.load(name, broken)
    bad = dict(sd, **{"visual.ln_post.weight": torch.zeros(65)})
    with pytest.raises(ValueError, match=r"visual\.ln_post\.weight.*\(65,\).*\(64,\)"):
        oc.load(name, bad)
    extra = dict(sd, **{"visual.attn_pool.query": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"visual\.attn_pool\.query"):
        oc.load(name, extra)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        oc.load(name, str(tmp_path / "does-not-exist.pt"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        os.makedirs(tmp_path / "empty")
        oc.load(f"local-dir:{tmp_path / 'empty'}")


def test_load_directly_sharded_on_mesh(tiny, pixels):
    name, ckpt, _, _, model, _ = tiny
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    m, _ = oc.load(name, ckpt, mesh=mesh)
    w = m.blocks.mlp.fc1_kernel.get_value()
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (2, 16, 128)
    _params_equal(m, model)  # (the sharded forward itself is tested in tests/models/test_clip.py)


def test_cli_orbax_round_trip(tiny, tmp_path, capsys):
    name, ckpt, _, visual, _, _ = tiny
    dst = str(tmp_path / "orbax")
    assert oc.main(["to-orbax", name, ckpt, dst]) == 0
    assert oc.main(["to-orbax", name, ckpt, dst]) == 1  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    back = str(tmp_path / "back.safetensors")
    assert oc.main(["to-torch", name, dst, back]) == 0
    sd = C.read_tensors(back).to_numpy()
    assert sorted(sd) == sorted(visual)
    for k, v in visual.items():
        assert np.array_equal(sd[k], v.numpy()), k
    other, _ = cached_openclip_checkpoint(act="gelu")
    assert oc.main(["to-torch", other, dst, str(tmp_path / "x.pt")]) == 1  # config mismatch
    assert "not" in capsys.readouterr().err
    assert oc.main(["to-orbax", "ViT-Nope-99", ckpt, str(tmp_path / "o2")]) == 1
    assert "unknown open_clip model name" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2")
