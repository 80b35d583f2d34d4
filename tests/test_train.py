"""Staged training (cgjax.train): steps, checkpoints / resume, SIGTERM, NaN, export, sharding, A -> B.

One tiny LLaVA (vocab of a tokenizer trained on the demo texts), 24 demo images at 32 px and
label-derived signals, shared by every test; the Stage A runs share one compiled step per mesh.
"""
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgjax import text, train
from cgjax.losses import IGNORE_INDEX, SEGMENT_KEYS, SEGMENT_REASON
from cgjax.data.demo_data import make_demo
from cgjax.config import load_config, override
from cgjax.testing import tiny_llava_with_tokenizer
from cgjax.data.demo_data import write_label_signals
from cgjax.text_rows import Collate, TextRows, in_share, parse_key_lines
from cgjax import steps
from cgjax.demo_assets import ensure_demo_assets
from cgjax.metrics_log import MetricsLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(stage):
    return load_config(os.path.join(ROOT, "configs", f"stage{stage}.py"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):

    root = str(tmp_path_factory.mktemp("train"))
    paths = make_demo(os.path.join(root, "data"), n_images=24, size=32)
    ckpt, tok = tiny_llava_with_tokenizer(os.path.join(root, "llava"), paths["targets_csv"])
    signals = os.path.join(root, "signals.keyed.json")
    data_dir = os.path.dirname(paths["dataset_json"])
    write_label_signals(paths["dataset_json"], data_dir, signals, dims=("artist", "style", "genre"), seed=0)
    return {"root": root, "ckpt": ckpt, "signals": signals, "data_dir": data_dir, **paths}


def config(assets, stage="A", **over):
    c = _load_config(stage)
    c.demo.generate_missing = False
    c.llava_checkpoint = assets["ckpt"]
    c.data.dataset_json = assets["dataset_json"]
    c.data.images_root = assets["data_dir"]
    c.data.targets_csv = assets["targets_csv"]
    c.data.signals = (assets["signals"],)
    c.text.max_text_tokens = 96 if stage == "A" else 144
    c.num_steps = 6
    c.mesh = "data=1"
    c.loss.attn_reg_interval = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.val.every_steps = 0
    c.val.at_end = False
    c.log.every_steps = 2
    c.log.progress_bar = False
    c.data.read_threads = 1
    c.init_from = ""
    return override(c, **over)


def _checkpoint_values(workdir, step=None):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    steps = mngr.all_steps()
    mngr.close()
    return step, np.asarray(got["state"]["params"]["concepts"]["values"]), got["meta"], steps


def _flat_state(workdir, step):
    """A checkpoint's training state as ``{"opt_state.inner_opt_state.1.0.mu.concepts.values": array}``."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                 item_handlers={"state": ocp.StandardCheckpointHandler()})
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))  # noqa: E731
    return {".".join(key(k) for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(got)[0]}


def _one(flat, suffix):
    (name,) = [k for k in flat if k.endswith(suffix)]
    return flat[name]


def _train_records(assets):
    return sum(r.get("split") == "train" for r in json.load(open(assets["dataset_json"])))


@pytest.fixture(scope="module")
def run6(assets, tmp_path_factory):
    """Stage A, 6 uninterrupted steps (checkpoints every 2, the regulariser every 2)."""
    wd = str(tmp_path_factory.mktemp("a6"))
    return wd, train.train_stage(config(assets), wd)


# ------------------------------------------------------------------------------------------------


def test_text_rows_and_collate(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["ckpt"])
    img = tok.convert_tokens_to_ids("<image>")
    names = (("maren-okafor", "teodor-lindqvist"), ("Impasto_Dabs",), ("landscape",))
    ex = {"labels": {"artist": 1, "style": 0, "genre": 0}, "target_keys": "artist: teodor-lindqvist\nstyle: "
          "Impasto_Dabs\ngenre: landscape", "target_reason": "Long thin strokes. " * 40, "has_target": 1,
          "image_path": "x.png", "pixel_values": np.zeros((3, 32, 32), np.float32),
          "signals": {"artist": np.array([0.1, 0.9], np.float32), "style": np.array([0.8], np.float32),
                      "genre": np.array([0.3], np.float32)}}
    kw = dict(tokenizer=tok, n_image_block=7, image_token_id=img, length=200, concept_dims=("artist", "style", "genre"),
              label_dims=("artist", "style", "genre"), label_names=names, prompt_seed=42, max_reason_tokens=10,
              add_eos=True)
    a = TextRows(stage="A", **kw)(ex)
    b = TextRows(stage="B", with_prompt=True, **kw)(ex)
    np.testing.assert_array_equal(a["scores"], np.float32([0.1, 0.9, 0.8, 0.3]))
    for r in (a, b):
        ids = r["input_ids"]
        start = int(np.argmax(ids == img))
        assert (ids[start:start + 7] == img).all() and (ids == img).sum() == 7
        assert (r["labels"][: start + 7] == IGNORE_INDEX).all()
        assert tok.decode(ids[r["segment_ids"] == SEGMENT_KEYS], skip_special_tokens=True).strip() == ex["target_keys"]
        assert ids[r["attention_mask"] > 0][-1] == tok.eos_token_id
    assert (a["segment_ids"] == SEGMENT_REASON).sum() == 0
    n_reason = int((b["segment_ids"] == SEGMENT_REASON).sum())
    assert 1 < n_reason <= 10 + 2  # "\n" + at most 10 reason tokens + EOS
    # the generation prompt (validation) is chosen from the image path, never from the labels
    want = text.stage_b_prompt_for_image("x.png", 42)
    np.testing.assert_array_equal(b["prompt_ids"][b["prompt_mask"] > 0], text.encode(tok, want, 7, img).input_ids)
    relabelled = dict(ex, labels={"artist": 0, "style": 0, "genre": 0})
    np.testing.assert_array_equal(TextRows(stage="B", with_prompt=True, **kw)(relabelled)["prompt_ids"],
                                  b["prompt_ids"])
    assert b["prompt_mask"][0] == 0 and b["prompt_mask"][-1] == 1  # left padded inference prompt
    batch = Collate(3)([a, a])
    assert batch["input_ids"].shape == (3, 200) and batch["valid"].tolist() == [1, 1, 0]
    # an image that did not decode (data.skip_undecodable): its row has no target and is not valid
    skipped = TextRows(stage="B", **kw)(dict(ex, skipped=np.int32(1)))
    assert (skipped["labels"] == IGNORE_INDEX).all() and (b["labels"] != IGNORE_INDEX).any()
    assert Collate(3)([a, skipped])["valid"].tolist() == [1, 0, 0]
    assert parse_key_lines("Artist: x\nstyle:y \nnoise\nartist: z", ("artist", "style", "genre")) == \
        {"artist": "x", "style": "y"}


def test_text_rows_structured_share(assets):
    """``structured_share``: that share of the images (md5 of the path) is asked the structured
    prompt and answers one JSON object between the sentinels: the labels in the keys segment, the
    truncated reason as ``evidence`` in the reason segment; the validation prompt stays Stage B's.
    ``no_concept_share``: that share gets no concept token."""
    from transformers import AutoTokenizer

    from cgjax.infer import structured_prompt

    tok = AutoTokenizer.from_pretrained(assets["ckpt"])
    img = tok.convert_tokens_to_ids("<image>")
    dims = ("artist", "style", "genre")
    reason = "Long thin strokes: a calm, even light. " * 20
    ex = {"labels": {"artist": 1, "style": 0, "genre": 0}, "target_keys": "artist: teodor-lindqvist\nstyle: "
          "Impasto_Dabs\ngenre: landscape", "target_reason": reason, "has_target": 1, "image_path": "x.png",
          "pixel_values": np.zeros((3, 32, 32), np.float32),
          "signals": {d: np.array([0.5], np.float32) for d in dims}}
    kw = dict(tokenizer=tok, n_image_block=7, image_token_id=img, length=240, concept_dims=dims, label_dims=dims,
              label_names=(("maren-okafor", "teodor-lindqvist"), ("Impasto_Dabs",), ("landscape",)),
              prompt_seed=42, max_reason_tokens=10, add_eos=True, stage="B", with_prompt=True)
    prompt = structured_prompt(dims)
    r = TextRows(structured_share=1.0, structured_prompt=prompt, **kw)(ex)
    ids, seg = r["input_ids"], r["segment_ids"]
    head = text.encode(tok, prompt, 7, img).input_ids
    np.testing.assert_array_equal(ids[:len(head)], head)  # asked the structured prompt
    answer = tok.decode(ids[seg != 0], skip_special_tokens=True).strip()
    assert answer.startswith("<BEGIN_JSON>{") and answer.endswith("}<END_JSON>")
    obj = json.loads(answer[len("<BEGIN_JSON>"):-len("<END_JSON>")])
    assert obj == {"artist": "teodor-lindqvist", "style": "Impasto_Dabs", "genre": "landscape",
                   "evidence": text.truncate_tokens(tok, reason.strip(), 10)}
    keys_part = tok.decode(ids[seg == SEGMENT_KEYS], skip_special_tokens=True)
    assert "landscape" in keys_part and "evidence" not in keys_part
    assert "evidence" in tok.decode(ids[seg == SEGMENT_REASON], skip_special_tokens=True)
    want = text.encode(tok, text.stage_b_prompt_for_image("x.png", 42), 7, img).input_ids
    np.testing.assert_array_equal(r["prompt_ids"][r["prompt_mask"] > 0], want)
    assert r["gold_keys"] == ex["target_keys"]  # validation still scores the key lines
    plain = TextRows(**kw)(ex)  # share 0: the Stage B row
    assert "BEGIN_JSON" not in tok.decode(plain["input_ids"][plain["segment_ids"] != 0])
    picked = np.asarray([[in_share(f"img_{i}.png", 42, 0.3, w) for w in ("structured", "no_concepts")]
                         for i in range(2000)])
    assert (0.26 < picked.mean(0)).all() and (picked.mean(0) < 0.34).all() and not in_share("x.png", 42, 0.0, "x")
    assert 0.05 < picked.all(1).mean() < 0.13  # independent draws: about 0.3 * 0.3 of the images are in both
    # no_concept_share: scores below every gating threshold (>= 0, backoff included): no concept token
    empty = TextRows(no_concept_share=1.0, **kw)(ex)
    np.testing.assert_array_equal(empty["input_ids"], plain["input_ids"])
    assert (empty["scores"] < 0).all() and (plain["scores"] == 0.5).all()
    with pytest.raises(ValueError, match="structured_prompt"):
        TextRows(structured_share=1.0, **kw)(ex)


def test_shortcuts_equal_full_forward(assets, tmp_path):
    """The prefix without gradient + logits at the targets only = the full forward (loss, regulariser, gradient).
    (The stage is given in epochs here: its steps and the cosine schedule's length come from the training split.)"""
    tr = train.Trainer(config(assets, num_steps=0, num_epochs=2, **{"optim.schedule": "warmup_cosine"}), str(tmp_path))
    n = _train_records(assets)
    want = -(-2 * -(-n // 4) // 4) * 4  # 2 epochs of ceil(n / batch 4) batches, whole updates of 4 steps
    assert tr.stage_length.steps == want and tr.sc.decay_updates == want // 4
    assert tr.sc.prefix_len == tr.n_head + tr.n_image_tokens > 0
    batch = tr.device_batch(next(iter(tr.train_dataset())), tr.TRAIN_KEYS)
    assert 0 < tr.sc.max_targets < tr.length - tr.sc.prefix_len
    full = dataclasses.replace(tr.sc, prefix_len=0, max_targets=0)

    @jax.jit
    def both(params, frozen, batch):
        f = jax.value_and_grad(steps.loss_fn, has_aux=True)
        args = (tr.graphdef, frozen, batch)
        no_fault = jnp.full((2,), -1, jnp.int32)
        a = f(params, *args, tr.sc, True, 0, no_fault)
        b = f(params, *args, full, True, 0, no_fault)
        return a, b

    ((la, aux_a), ga), ((lb, aux_b), gb) = both(tr.params0, tr.frozen, batch)
    assert float(aux_a["reg"]) > 0
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    np.testing.assert_allclose(float(aux_a["reg"]), float(aux_b["reg"]), rtol=1e-4)
    ga, gb = np.asarray(ga["concepts"]["values"]), np.asarray(gb["concepts"]["values"])
    assert np.abs(gb).max() > 0
    np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-6 * np.abs(gb).max())


def test_loss_decreases_and_only_values_train(assets, tmp_path):
    from converters import hf_llava

    tr = train.Trainer(config(assets), str(tmp_path))
    assert tr.trainable_paths == ["concepts/values"]
    state = tr.init_state()
    values_shape = state["params"]["concepts"]["values"].shape
    # frozen parameters have no optimizer state: every optimizer array is a scalar or values-shaped
    assert {x.shape for x in jax.tree.leaves(state["opt_state"])} <= {(), values_shape}
    v0 = np.asarray(state["params"]["concepts"]["values"])
    batch = tr.device_batch(next(iter(tr.train_dataset())), tr.TRAIN_KEYS)
    losses = []
    for s in range(12):  # 3 optimizer updates (grad_accum 4) on one batch
        state, m = tr.train_step(state, batch, s)
        losses.append(float(m["loss"]))
    assert losses[11] < losses[7] < losses[3] - 1e-3, losses
    assert not np.array_equal(np.asarray(state["params"]["concepts"]["values"]), v0)
    fresh = nnx.to_pure_dict(nnx.state(hf_llava.load(assets["ckpt"]), nnx.Param))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), tr.frozen["llava"], fresh)
    assert all(jax.tree.leaves(same)) and len(jax.tree.leaves(same)) == len(jax.tree.leaves(fresh))


def test_run_writes_logs_checkpoints_and_original_pt(assets, run6):
    import torch

    wd, out = run6
    assert out["step"] == 6 and len(out["history"]) == 6 and not out["preempted"]
    step, values, meta, steps = _checkpoint_values(wd)
    assert step == 6 and steps == [4, 6]  # keep 2
    assert meta["concept_index"]["k_max"] == 6 and meta["concept_index"]["dims"] == ["artist", "style", "genre"]
    pt = torch.load(out["pt"], weights_only=True)
    assert list(pt) == [6] and list(pt[6]) == ["values"]
    np.testing.assert_array_equal(pt[6]["values"].numpy(), values)
    info = json.load(open(out["pt_meta"]))
    n = [len(info["names"][d]) for d in info["dims"]]
    assert info["dim_ranges"]["style"] == [n[0], n[0] + n[1]] and info["k_max"] == 6
    assert values.shape == (sum(n), 6, 64)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["loss"] for r in train_rows] == out["history"]
    assert any(r["split"] == "perf" and r["tflops_per_device"] > 0 for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tensorboard")))


def test_resume_is_bit_identical(assets, run6, tmp_path):
    wd6, full = run6
    wd = str(tmp_path)
    first = train.train_stage(config(assets, num_steps=3), wd)
    second = train.train_stage(config(assets, num_steps=6), wd)
    assert second["start_step"] == 3
    assert first["history"] + second["history"] == full["history"]  # bit for bit
    np.testing.assert_array_equal(_checkpoint_values(wd)[1], _checkpoint_values(wd6)[1])


def test_sigterm_saves_and_exits(assets, run6, tmp_path):
    wd = str(tmp_path)

    def term(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = train.train_stage(config(assets, **{"checkpoint.every_steps": 0}), wd, step_callback=term)
    assert out["preempted"] and out["step"] == 2
    step, values, meta, _ = _checkpoint_values(wd)
    assert step == 2 and np.isfinite(values).all()
    assert out["history"] == run6[1]["history"][:2]
    test_sigterm_saves_and_exits.values2 = values


@pytest.mark.parametrize("fault, message", [("debug.nan_at_step", r"non-finite loss nan at step 3"),
                                             ("debug.nan_grad_at_step", r"non-finite gradient \(norm\) nan at step 3")])
def test_nan_loss_or_gradient_stops_with_last_good_checkpoint(assets, tmp_path, fault, message):
    """A NaN loss, or a NaN in the gradients with a finite loss, is not applied nor accumulated:
    the run stops, and the last good checkpoint stays the latest (the uninterrupted run's step 2)."""
    wd = str(tmp_path)
    with pytest.raises(FloatingPointError, match=message):
        train.train_stage(config(assets, **{fault: 3}), wd)
    step, values, _, steps = _checkpoint_values(wd)
    assert step == 2 and steps == [2] and np.isfinite(values).all()
    ref = getattr(test_sigterm_saves_and_exits, "values2", None)
    if ref is not None:  # the same two steps as the SIGTERM run
        np.testing.assert_array_equal(values, ref)
    assert not os.path.exists(os.path.join(wd, "concepts_stageA.pt"))


def test_one_and_eight_devices_give_equal_losses(assets, run6, tmp_path):
    assert jax.device_count() == 8
    # 5 steps: the regulariser on 0, 2, 4 and one optimizer update after step 3
    out = train.train_stage(config(assets, num_steps=5, mesh="data=2,fsdp=2,tensor=2"), str(tmp_path))
    np.testing.assert_allclose(out["history"], run6[1]["history"][:5], rtol=2e-6)
    # The first AdamW update is lr * g / (|g| + eps) per element (lr = 1, eps = 1e-8): where |g| is
    # about eps or less it is g / eps, so the ~1e-12 rounding of a sharded gradient sum moves such an
    # element by ~1e-4. Every element but a handful must agree; a wrong sharding moves them all.
    sharded, single = _checkpoint_values(str(tmp_path))[1], _checkpoint_values(run6[0], 4)[1]
    off = np.abs(sharded - single) > 2e-4
    assert off.mean() < 1e-3, f"{off.sum()} of {off.size} values differ by more than 2e-4"


def test_stage_b_starts_from_stage_a(assets, run6, tmp_path):
    import torch

    wd_a, out_a = run6
    # one update, after step 4 (grad_accum 4); the regulariser on every step: one compiled variant
    c = config(assets, "B", num_steps=4, init_from=wd_a, **{"loss.attn_reg_interval": 1})
    c.val.at_end = True
    c.val.max_new_tokens = 8
    out = train.train_stage(c, str(tmp_path))
    assert out["init_from_step"] == 6
    a = torch.load(out_a["pt"], weights_only=True)[6]["values"].numpy()
    # Stage A's values, unchanged until Stage B's first update (Stage A's 2 accumulated steps are not carried)
    np.testing.assert_array_equal(_checkpoint_values(str(tmp_path), 2)[1], a)
    # Stage B's first update continues Stage A's AdamW (torch.optim.AdamW's step, in NumPy): the
    # moments, decayed from Stage A's, and its step count + 1 for the bias corrections
    sa, sb = _flat_state(wd_a, 6), _flat_state(str(tmp_path), 4)
    mu_a, nu_a, t_a = _one(sa, ".mu.concepts.values"), _one(sa, ".nu.concepts.values"), int(_one(sa, "0.count"))
    mu_b, nu_b, t_b = _one(sb, ".mu.concepts.values"), _one(sb, ".nu.concepts.values"), int(_one(sb, "0.count"))
    assert t_a == 1 and t_b == 2 and np.abs(mu_a).max() > 0
    g = (mu_b.astype(np.float64) - 0.9 * mu_a) / 0.1  # the gradient Stage B's update applied
    np.testing.assert_allclose(nu_b, 0.999 * nu_a.astype(np.float64) + 0.001 * g**2, rtol=1e-3, atol=1e-12)
    want = a * (1 - 1e-4) - (mu_b / (1 - 0.9**2)) / (np.sqrt(nu_b / (1 - 0.999**2)) + 1e-8)
    b = torch.load(out["pt"], weights_only=True)[4]["values"].numpy()
    np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-5)
    assert np.abs(b - a).max() > 0.1
    assert out["loss_reason"] > 0 and out["loss_keys"] > 0
    for k in ("val_acc_artist", "val_acc_style", "val_acc_genre", "val_key_acc"):
        assert 0.0 <= out[k] <= 1.0
    assert out["val_examples"] > 0 and out["val_loss_reason"] > 0 and np.isfinite(out["val_loss"])
    # a different concept index is refused
    bad = config(assets, "B", num_steps=1, init_from=wd_a)
    bad.gating.k_max = 4
    with pytest.raises(ValueError, match="concept index"):
        train.train_stage(bad, str(tmp_path / "bad"))
    # another optimizer cannot carry Stage A's state: an error naming the way to start it fresh
    other = config(assets, "B", num_steps=1, init_from=wd_a, **{"optim.clip_mode": "original_micro"})
    with pytest.raises(ValueError, match=r"optimizer state differs .*config.init_optimizer=False"):
        train.train_stage(other, str(tmp_path / "other"))


def test_stage_b_in_a_stage_a_workdir_is_refused(assets, run6):
    """Stage B pointed at Stage A's work dir would "resume" Stage A's checkpoint: refused, naming both."""
    wd_a, _ = run6
    before = sorted(os.listdir(wd_a))
    with pytest.raises(ValueError, match=r"stage: work dir .* is Stage A, this run is Stage B"):
        train.train_stage(config(assets, "B", num_steps=8), wd_a)
    assert sorted(os.listdir(wd_a)) == before


def test_demo_assets_only_under_demo_root(assets, tmp_path):
    """A demo-preset path pointing outside demo.root is an error, never generated over the user's folder."""
    c = _load_config("A")  # the demo preset
    c.demo.root = str(tmp_path / "demo")
    user = tmp_path / "models"  # "one folder too high": the user's models folder, no config.json
    user.mkdir()
    (user / "NOTES.txt").write_text("mine")
    (user / "llava-1.5-7b-hf").mkdir()
    c.llava_checkpoint = str(user)
    with pytest.raises(FileNotFoundError, match=r"config.llava_checkpoint: .*models/config.json does not exist"):
        ensure_demo_assets(c)
    assert sorted(os.listdir(user)) == ["NOTES.txt", "llava-1.5-7b-hf"]
    assert not os.path.exists(tmp_path / "demo")

    c = _load_config("A")
    c.demo.root = str(tmp_path / "demo")
    c.data.signals = (str(tmp_path / "signals_typo.json"),)
    with pytest.raises(FileNotFoundError, match=r"config.data.signals: .*signals_typo.json does not exist"):
        ensure_demo_assets(c)
    assert not os.path.exists(tmp_path / "signals_typo.json")


def test_only_the_demo_preset_generates_assets(assets, tmp_path):
    c = config(assets, llava_checkpoint=str(tmp_path / "nowhere"))
    c.demo.generate_missing = True  # not the demo preset: nothing is generated, the missing path is an error
    c.preset = "llava-1.5-7b"
    with pytest.raises(Exception, match="nowhere"):
        train.train_stage(c, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "nowhere")


def test_packed_arrayrecord_set_trains_like_the_files(assets, run6, tmp_path):
    """config.data.packed_dir: the same records in the same order as the image folder, so the
    same losses step for step."""
    from cgjax.data.tfds_builder import pack

    packed = pack(assets["dataset_json"], assets["data_dir"], str(tmp_path / "packed"),
                  targets_csv=assets["targets_csv"], signals=[assets["signals"]])
    c = config(assets)
    c.data.packed_dir = packed
    c.data.dataset_json = str(tmp_path / "not-read.json")  # the packed set is all the trainer reads
    out = train.train_stage(c, str(tmp_path / "wd"))
    np.testing.assert_allclose(out["history"], run6[1]["history"], rtol=1e-6)


def test_a_mistyped_validation_split_is_an_error(assets, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'validaton' \(expected one of .*'validation'"):
        train.train_stage(config(assets, **{"data.val_split": "validaton"}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_truncated_latest_checkpoint_falls_back_to_the_previous(assets, run6, tmp_path, caplog):
    """The latest step's array data cut in half (a copy or a save killed mid-write): resume warns,
    sets it aside, restores the step before it and continues with the uninterrupted losses."""
    import shutil

    wd = str(tmp_path / "wd")
    shutil.copytree(run6[0], wd)
    data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(wd, "checkpoints", "6", "state")) for f in fs]
    biggest = max(data, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    n = _train_records(assets)  # one epoch: ceil(n / batch 4) batches, whole updates of 4 steps
    want = -(-(-(-n // 4)) // 4) * 4
    assert want > 6
    out = train.train_stage(config(assets, num_steps=0, num_epochs=1), wd)
    assert out["start_step"] == 4 and out["step"] == out["num_steps"] == want
    np.testing.assert_array_equal(out["history"][:2], run6[1]["history"][4:6])
    assert "cannot be restored" in caplog.text and "falling back to step 4" in caplog.text
    assert any(n.startswith("6.unreadable-") for n in os.listdir(os.path.join(wd, "checkpoints")))


def test_resume_and_init_from_refuse_another_base_or_data_set(assets, run6, tmp_path):
    """provenance.json: a work dir trained on one LLaVA or data set is not resumed, nor used as
    init_from, with another; the refusal names both sides, accept_mismatch lets it through."""
    import shutil

    from cgjax import provenance

    prov = provenance.read(run6[0])
    assert prov["stage"] == "A" and prov["base"]["fingerprint"] == provenance.base_fingerprint(assets["ckpt"])
    other_base = str(tmp_path / "other_llava")
    shutil.copytree(assets["ckpt"], other_base)
    cfg = json.load(open(os.path.join(other_base, "config.json")))
    cfg["text_config"]["rms_norm_eps"] = 1e-5  # another model, same shapes
    json.dump(cfg, open(os.path.join(other_base, "config.json"), "w"))
    wd = str(tmp_path / "wd")
    shutil.copytree(run6[0], wd)
    with pytest.raises(provenance.ProvenanceError, match=r"base checkpoint: work dir .* was trained on .*llava.* "
                                                         r"\(fingerprint [0-9a-f]+\), this run has .*other_llava"):
        train.train_stage(config(assets, num_steps=8, llava_checkpoint=other_base), wd)
    other_data = str(tmp_path / "dataset.json")  # the same records, one split renamed: another data set
    records = json.load(open(assets["dataset_json"]))
    records[0]["split"] = "test" if records[0].get("split") != "test" else "train"
    json.dump(records, open(other_data, "w"))
    with pytest.raises(provenance.ProvenanceError, match=r"data set: config.init_from .* was trained on"):
        train.train_stage(config(assets, "B", num_steps=1, init_from=run6[0], **{"data.dataset_json": other_data}),
                          str(tmp_path / "b"))
    # another optimizer layout (clip_mode) is refused before the restore, which would set the steps aside
    with pytest.raises(ValueError, match=r"step 6: the saved training state differs .*optim.clip_mode"):
        train.train_stage(config(assets, num_steps=8, **{"optim.clip_mode": "original_micro"}), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "6"]
    out = train.train_stage(config(assets, num_steps=7, llava_checkpoint=other_base, accept_mismatch=True), wd)
    assert out["start_step"] == 6


def test_resumed_logs_drop_later_and_cut_off_rows(tmp_path):
    """A kill -9 can leave rows past the last checkpoint and a half-written last row: the resumed
    run's metrics.jsonl keeps only the complete rows up to the resumed step."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n'
                    '{"step": 3, "split": "train"}\n{"step": 4, "spl')
    logs = MetricsLog(str(tmp_path), True, False, resume_step=2)
    logs.write(3, "train", {"loss": 1.0})
    logs.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3]
