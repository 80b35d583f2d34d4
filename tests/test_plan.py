"""Launch planner: published parameter counts, per-device bytes against a real sharded tiny model
and its optimizer state, the compiled step's arguments, and the out-of-memory warning."""
import jax
import jax.numpy as jnp
import pytest
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cgjax import commandline, plan as P, sharding, steps
from cgjax.concepts.index import ConceptIndex, gating_config
from cgjax.concepts.model import ConceptLlava
from cgjax.config import load_config
from cgjax.models.llava import Llava, LlavaConfig

PUBLISHED = {"llava-1.5-7b": 7_063_427_072, "llava-1.5-13b": 13_351_494_656}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_parameter_counts(preset):
    config = load_config("configs/stageA.py:preset=llava-1.5-7b")
    p = P.make_plan(config, model=preset, mesh="data=1,fsdp=8,tensor=1", device="tpu-v5p",
                    concepts="artist=5,style=4,genre=3", compile=False)
    assert p.n_llava == PUBLISHED[preset]
    d = p.llava_cfg.text_config.hidden_size
    values = 12 * int(config.gating.k_max) * d
    assert p.n_trainable == values == p.counts["concepts.values"]
    assert p.n_total == PUBLISHED[preset] + values
    assert sum(p.counts.values()) == p.n_total
    # fsdp=8 splits every bf16 weight whose embed axis divides: about 1/8 of 2 bytes per parameter
    assert 0.99 * 2 * p.n_llava / 8 < p.memory["params_frozen"] < 1.05 * 2 * p.n_llava / 8


def _device0_bytes(tree) -> int:
    d0 = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == d0)
    return total


@pytest.fixture(scope="module")
def tiny_plan():
    config = load_config("configs/stageA.py:preset=demo")
    config.batch_size = 8
    config.param_dtype = "float32"
    config.loss.reg_lambda = 0.0  # the step without the regulariser: quicker to compile
    return config, P.make_plan(config, model="tiny", mesh="data=1,fsdp=4,tensor=2", device="tpu-v5e",
                               concepts="artist=5,style=4,genre=3", compile=True)


def test_tiny_memory_matches_the_real_sharded_state(tiny_plan):
    """Per-device bytes from the shapes == bytes device 0 really holds for the tiny model and its
    optimizer state, placed as the trainer places them; the compiled step's arguments agree."""
    config, p = tiny_plan
    mesh = sharding.make_mesh(p.mesh, jax.devices()[:8])
    rules = tuple(config.sharding_rules)
    index = ConceptIndex(("artist", "style", "genre"),
                               tuple(tuple(f"{d}{i}" for i in range(n)) for d, n in (("a", 5), ("s", 4), ("g", 3))),
                               int(config.gating.k_max))

    cfg = LlavaConfig.from_hf(P.tiny_llava_hf_config("tiny"))
    gcfg = gating_config(config, index)
    # real arrays (eager initialisation compiles op by op: filling the abstract model is quicker)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ConceptLlava(Llava(cfg, rngs=nnx.Rngs(0)), gcfg,
                                                                    rngs=nnx.Rngs(1))))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), state))
    sharding.shard_model(model, mesh, rules)
    _, trainable, frozen = nnx.split(model, steps.trainable_filter(tuple(config.trainable)), ...)
    assert _device0_bytes(frozen) == p.memory["params_frozen"] > 0
    assert _device0_bytes(trainable) == p.memory["params_trainable"] > 0
    # some weights really are split (the test would not see a replication bug otherwise)
    assert p.memory["params_frozen"] < 0.5 * sum(x.nbytes for x in jax.tree.leaves(frozen))

    params = nnx.to_pure_dict(trainable)
    opt = steps.make_optimizer(steps.StepConfig.from_config(config, p.prefix_len)).init(params)
    like = {(x.shape, x.dtype): x.sharding for x in jax.tree.leaves(params)}
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.tree.map(lambda x: jax.device_put(x, like.get((x.shape, x.dtype), replicated)), opt)
    assert _device0_bytes(opt) == p.memory["opt_state"] > 0

    # the compiled step on 8 CPU devices: its arguments are the state + frozen weights + batch
    assert p.activations_compiled is not None, p.compile_note
    args = p.memory["params_frozen"] + p.memory["params_trainable"] + p.memory["opt_state"] + p.memory["batch"]
    got = p.compiled["argument_size_in_bytes"]
    assert abs(got - args) <= 64, (got, args)  # + step counter, nan_at and the RNG key
    assert p.activations == p.compiled["temp_size_in_bytes"] > 0
    assert p.total_per_device > args


def test_tiny_plan_prints_every_section(tiny_plan):
    _, p = tiny_plan
    text = P.format_plan(p)
    for needle in ("parameters", "memory per device", "activations + temporaries (compiled)",
                   "generation KV cache", "FLOPs per step", "expected step time at 40% MFU", "OK: fits"):
        assert needle in text, needle
    t = p.llava_cfg.text_config
    assert p.kv["total"] == 2 * t.num_hidden_layers * p.kv["batch"] * p.kv["length"] * t.num_key_value_heads \
        * t.head_dim * 4 + p.kv["batch"] * p.kv["length"]
    assert p.flops["total"] > p.flops["model"] > 0
    assert p.step_seconds == pytest.approx(p.flops["total"] / (8 * 197e12 * 0.4))


def test_warning_and_strict_exit_for_a_launch_that_cannot_fit(capsys):
    # 7B in bf16 on one 16 GiB v5e chip: 13 GiB of weights plus the activations
    rc = P.main(["--config", "configs/stageA.py:preset=llava-1.5-7b", "--mesh", "data=1,fsdp=1,tensor=1",
                 "--device", "tpu-v5e", "--no-compile", "--strict"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "WARNING: does not fit" in out and "tpu-v5e has 16.00 GiB" in out
    # the same launch on a v5p-8 slice fits
    rc = P.main(["--config", "configs/stageA.py:preset=llava-1.5-7b", "--mesh", "data=1,fsdp=8,tensor=1",
                 "--device", "tpu-v5p", "--no-compile", "--strict"])
    out = capsys.readouterr().out
    assert rc == 0 and "OK: fits" in out and "WARNING" not in out


def test_warning_for_a_tiny_config_on_a_tiny_device(monkeypatch, tiny_plan):
    config, _ = tiny_plan
    monkeypatch.setitem(P.DEVICES, "toy", P.DeviceSpec("toy", 64 * 2**10, 1e12, "64 KiB"))
    p = P.make_plan(config, model="tiny", mesh="data=1,fsdp=8,tensor=1", device="toy",
                    concepts="artist=5,style=4,genre=3", compile=False)
    assert not p.fits and p.warnings and p.warnings[0].startswith("WARNING: does not fit")


def test_mesh_and_override_parsing():
    assert P.resolve_mesh_shape("fsdp=-1", 32) == {"data": 1, "fsdp": 32, "tensor": 1}
    assert P.resolve_mesh_shape("data=2,fsdp=4,tensor=1", None) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="-1 axis"):
        P.resolve_mesh_shape("fsdp=-1", None)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        P.resolve_mesh_shape("pipe=2", None)
    # config fields are overridden as for scripts/train.py: --config.FIELD=VALUE (absl, config_flags)
    fv = commandline.parse(P.define_flags, ["--config", "configs/stageA.py:preset=demo", "--config.batch_size=16",
                                            "--config.text.max_text_tokens", "64", "--config.dtype=bfloat16",
                                            "--num-devices=4", "--no-compile", "--mesh", "fsdp=-1"])
    config = fv.config
    assert (config.batch_size, config.text.max_text_tokens, config.dtype) == (16, 64, "bfloat16")
    assert fv["num-devices"].value == 4 and fv["no-compile"].value and fv.mesh == "fsdp=-1"
    assert fv["config"].config_filename == "configs/stageA.py:preset=demo"
    assert P.mesh_devices_needed(fv.mesh, 4) == 4 and P.mesh_devices_needed("data=2,fsdp=4") == 8
    assert P.mesh_devices_needed("") == 8
    with pytest.raises(commandline.UsageError, match=r"--config\.nope"):
        commandline.parse(P.define_flags, ["--config", "configs/stageA.py:preset=demo", "--config.nope=1"])
    with pytest.raises(flags.Error, match="--set is gone.*--config.batch_size=16"):
        commandline.parse(P.define_flags, ["--config", "configs/stageA.py:preset=demo", "--set", "batch_size=16"])
    with pytest.raises(flags.Error, match="Unknown command line flag 'stict'"):
        commandline.parse(P.define_flags, ["--config", "configs/stageA.py:preset=demo", "--stict"])
    with pytest.raises(commandline.UsageError, match="unexpected argument"):
        commandline.parse(P.define_flags, ["--config", "configs/stageA.py:preset=demo", "stray"])


def test_inference_plan_llava_7b_on_one_and_two_v5e_chips():
    """7B in bf16 with a batch-8 x 1024 KV cache: the weights (7.06e9 params x 2 B) plus the cache
    (32 layers x 8 x 1024 x 32 KV heads x 128 x 2 (K, V) x 2 B) exceed one 16 GiB v5e; the planner
    says so and names fsdp=2, on which the same plan fits."""
    config = load_config("configs/stageA.py:preset=llava-1.5-7b")
    one = P.make_plan(config, model="llava-1.5-7b", mesh="data=1", device="tpu-v5e", gen_batch=8, gen_len=1024,
                      compile=False)
    inf = one.inference
    kv_want = 32 * 8 * 1024 * 32 * 128 * 2 * 2 + 8 * 1024
    assert inf["kv_cache"] == kv_want
    assert 7.0e9 * 2 < inf["weights"] < 7.2e9 * 2 + 2**24
    assert not inf["fits"] and inf["suggest"].startswith("--config.mesh=fsdp=2 ")
    assert any(w.startswith("WARNING: inference") and "fsdp=2" in w for w in one.warnings)
    two = P.make_plan(config, model="llava-1.5-7b", mesh="fsdp=2", device="tpu-v5e", gen_batch=8, gen_len=1024,
                      compile=False)
    assert two.inference["fits"] and two.inference["weights"] < 0.51 * inf["weights"]
    assert two.inference["kv_cache"] == -(-kv_want // 2)  # the batch of 8 shards over fsdp=2
    assert "inference (scripts/infer.py" in P.format_plan(two)
    # the stage's length: the preset's 100 epochs need the training set size to become steps
    assert one.length is None and "100 epochs (config.num_epochs): --train-examples N" in P.format_plan(one)
    three = P.make_plan(config, model="llava-1.5-7b", mesh="fsdp=2", device="tpu-v5e", compile=False,
                        train_examples=175)  # the original's set: 44 batches of 4 an epoch, an update every 4
    assert (three.length.steps, three.length.updates) == (4400, 1100)
    text = P.format_plan(three)
    assert "= 4400 steps, 1100 optimizer updates" in text and "the stage, 4,400 steps:" in text
    assert P.to_json(three)["num_steps"] == 4400


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("int4", 4)])
def test_quantized_7b_weights_and_the_single_chip_verdicts(mode, bits):
    """llava-1.5-7b with config.quantize: the language model's linear weights (decoder layers,
    lm_head) and the projector take ``bits`` per parameter (+ one fp32 scale per output channel, or per 128 inputs for int4);
    the rest stays bf16. Sizes from the published architecture, not from the planner's tables."""
    config = load_config("configs/stageA.py:preset=llava-1.5-7b")
    config.quantize = mode
    p = P.make_plan(config, model="llava-1.5-7b", mesh="data=1", device="tpu-v5e", gen_batch=4, gen_len=1024,
                    compile=False)
    L, D, F, dv, V = 32, 4096, 11008, 1024, 32064
    lm = L * (4 * D * D + 3 * D * F) + D * V  # q, k, v, o (32 heads x 128 = D, no GQA) + gate, up, down; lm_head
    proj = dv * D + D * D
    quantized = lm + proj
    if mode == "int8":  # one scale per output channel: q, k, v, o (D each), gate, up (F), down (D); projector (2 D); lm_head (V)
        scales = (L * (5 * D + 2 * F) + 2 * D + V) * 4
    else:  # one per output channel and 128 inputs (o_proj: per head, its 128 head dims)
        scales = (L * (4 * (D // 128) * D + 2 * (D // 128) * F + (F // 128) * D) + (dv // 128) * D + (D // 128) * D
                  + (D // 128) * V) * 4
    assert p.n_llava == PUBLISHED["llava-1.5-7b"]  # scales are memory, not parameters
    want = (p.n_llava - quantized) * 2 + quantized * bits // 8 + scales
    assert p.memory["params_frozen"] == pytest.approx(want, rel=1e-6)
    verdicts = {d.name: (t, a, i) for d, t, a, i in p.single_chip_fits()}
    assert set(verdicts) == {"tpu-v5e", "t4", "l4"}
    for name, (train_ok, analytic_ok, infer_ok) in verdicts.items():
        hbm = P.DEVICES[name].hbm_bytes
        assert train_ok == (p.total_per_device <= hbm) and infer_ok == (p.inference["total"] <= hbm)
        assert analytic_ok == (p.total_per_device - p.activations + p.activations_analytic <= hbm)
    assert "one chip (Colab / v5e-1)" in P.format_plan(p)
    bf16 = P.make_plan(load_config("configs/stageA.py:preset=llava-1.5-7b"), model="llava-1.5-7b", mesh="data=1",
                       device="tpu-v5e", gen_batch=4, gen_len=1024, compile=False)
    assert p.inference["weights"] < bf16.inference["weights"] * (0.55 if bits == 8 else 0.35)
