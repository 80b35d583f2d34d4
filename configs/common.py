"""Shared fields of the Stage A / Stage B configs (``configs/stageA.py``, ``configs/stageB.py``).

Presets (``configs/stageA.py:preset=NAME``):

* ``demo`` (default): the embedded procedural demo set and a tiny LLaVA (+ locally trained
  tokenizer) under ``demo.root``; with ``demo.generate_missing`` the trainer builds whatever is
  missing there (data set, tiny LLaVA checkpoint, label-derived stand-in signals), so the command
  runs on a fresh machine. ``scripts/demo.py`` points the paths at its own artefacts instead.
* ``llava-1.5-7b``: a local ``llava-hf/llava-1.5-7b-hf`` directory (``llava_checkpoint``) in
  bf16, FSDP over all devices; set the ``data.*`` paths.

Defaults follow the original training script (``train_concept_embedding.py``): K_max 6,
threshold 0.75, backoff 0.05, top-k per dimension 2, budget 3, priority artist,style,genre,
reg lambda 0.0075 every 4 steps, gradient accumulation 4, batch 4, AdamW lr 1.0 / wd 1e-4,
clip 0.05, max_reason_tokens 64, seed 42, 100 epochs per stage, the optimizer carried from
Stage A into Stage B.

A stage's length is ``num_epochs`` (passes over the training split, converted to steps from its
size, ``batch_size`` and ``grad_accum``: ``cgjax.steps.stage_length``; the log and the planner
print the result) or ``num_steps``: exactly one is set, the other 0; both set is an error. The
``llava-1.5-7b`` preset trains 100 epochs (the original's 175 images: 4,400 steps, 1,100 updates);
to give steps instead, ``--config.num_epochs=0 --config.num_steps=N``. The demo preset gives steps.
"""
from __future__ import annotations

import ml_collections

from cgjax.config import parse_preset
from cgjax.sharding import DEFAULT_RULES

PRESETS = ("demo", "llava-1.5-7b")


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"preset=demo"`` (or a bare ``"demo"``) -> ``{"preset": "demo"}``; other keys are errors."""
    return {"preset": parse_preset(arg, PRESETS, "demo")}


def base_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``stage`` ("A" or "B") for the preset named in ``arg``."""
    if stage not in ("A", "B"):
        raise ValueError(f"stage must be 'A' or 'B', got {stage!r}")
    preset = parse_arg(arg)["preset"]
    c = ml_collections.ConfigDict()
    c.task = f"stage{stage}"
    c.stage = stage
    c.preset = preset
    c.workdir = f"runs/stage{stage}"
    c.seed = 42

    # Model: an HF LLaVA directory (config.json, safetensors, tokenizer files).
    c.llava_checkpoint = ""
    c.dtype = "float32"  # compute dtype of the frozen LLaVA: float32 | bfloat16
    c.param_dtype = "float32"  # storage dtype of the frozen LLaVA weights (the concept values stay fp32)
    # Weight-only quantization of the frozen base's language model and projector (cgjax.quantize):
    # none | int8 (per output channel) | int4 (groups of quantize_group_size inputs). The HF
    # checkpoint is quantized weight by weight as it loads (or a quantized orbax one is read as it is).
    c.quantize = "none"
    c.quantize_group_size = 128
    c.quantize_activations = False  # int8 only: int8 activations too (PyTorch's dynamic int8; the CPU fast path)
    # Stage hand-off: Stage B starts from Stage A's final checkpoint (a work dir or its checkpoints/ dir).
    c.init_from = ""
    # Resume / init_from refuse a work dir trained on another base checkpoint or data set (and resume
    # another stage); True accepts the mismatch with a warning.
    c.accept_mismatch = False
    # with init_from: also take AdamW's moments and step count (the original kept its optimizer
    # across the stages); False starts this stage's optimizer fresh
    c.init_optimizer = True
    # What trains: regexes over "/"-joined parameter paths (big_vision style); the rest is frozen
    # and has no optimizer state.
    c.trainable = ("concepts/.*",)

    # the stage's length: exactly one of these is > 0 (see the module docstring)
    c.num_epochs = 100  # passes over the training split (the original's 100 per stage)
    c.num_steps = 0  # train steps; one step = one batch (an optimizer update every grad_accum steps)
    c.batch_size = 4  # global batch per step
    c.grad_accum = 4

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1.0
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 0.05  # global norm over the trained parameters (0 = off)
    # update: clip the averaged gradient once per update (cgjax); original_micro: the original's
    # clip after every micro-batch on the running sum, AdamW fed that sum (cgjax.steps.CLIP_MODES)
    c.optim.clip_mode = "update"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.schedule = "constant"  # constant | warmup_cosine
    c.optim.warmup_updates = 0  # in optimizer updates (steps // grad_accum)
    c.optim.decay_updates = 0  # cosine length in updates; 0 = until the stage's end
    c.optim.end_lr_fraction = 0.0

    c.gating = ml_collections.ConfigDict()
    c.gating.k_max = 6
    c.gating.threshold = 0.75
    c.gating.backoff_delta = 0.05
    c.gating.topk_per_dim = 2
    c.gating.max_concepts = 3  # per-sample budget; 0 = none
    c.gating.priority = "artist,style,genre"
    c.gating.use_concepts = True  # False: the no-concept baseline (every slot empty)

    c.loss = ml_collections.ConfigDict()
    c.loss.w_keys = 1.0
    c.loss.w_reason = 0.0 if stage == "A" else 0.2
    c.loss.reg_lambda = 0.0075
    c.loss.attn_reg_interval = 4  # regulariser on steps with step % interval == 0

    c.text = ml_collections.ConfigDict()
    c.text.add_eos = True  # the original appended none, so generation never stopped
    c.text.max_reason_tokens = 64  # Stage B reason truncation
    c.text.max_text_tokens = 192  # fixed text length per row; the row adds the image block
    # logits only at the supervised positions, at most this many per row (0: every position)
    c.text.max_target_tokens = 64 if stage == "A" else 128
    c.text.prompt_seed = c.get_ref("seed")  # Stage B prompt hash seed (the original used cfg.seed)
    # Share of the images whose row asks the structured (JSON) inference prompt instead, answered with
    # the JSON of its keys and reason (cgjax.text_rows.structured_target). Only the demo's base
    # pretraining sets it: the original trains its stages on the Stage A/B prompts alone.
    c.text.structured_share = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.dataset_json = ""
    c.data.images_root = ""  # "" -> the JSON's folder
    c.data.targets_csv = ""
    c.data.signals = ()  # signals files in any format (e.g. concept_signals_<dim>.json, a keyed file)
    # The concept index of list-format signals (concept_signals_<dim>.json): prototype .pt file(s)
    # (comma-separated), a prototypes work dir or a vocab.json; "" = the vocab.json beside the signals.
    c.data.signals_index = ""
    # a packed set in a bucket (gs://) is copied once per host to this local folder ("" = the
    # temporary folder's cgjax-packs): ArrayRecord reads local files
    c.data.packed_cache_dir = ""
    c.data.packed_dir = ""  # a packed ArrayRecord set (cgjax.data.tfds_builder.pack) instead of the files above
    c.data.vocab_json = ""  # optional vocab.json fixing label / concept names
    # () = the data's own: the records' concepts keys, the targets CSV header, vocab_json (they must agree);
    # artist, style, genre when none names any
    c.data.dimensions = ()
    c.data.train_split = "train"
    c.data.val_split = "validation"
    # Records without a ``split`` (the original's dataset JSON) are split ONCE into a split file that
    # every stage reuses (cgjax.data.splits): "" = <dataset stem>.splits.json beside the dataset JSON.
    c.data.splits_json = ""
    c.data.val_fraction = 0.15  # used only when the split file is made
    c.data.test_fraction = 0.15
    c.data.split_seed = 0
    c.data.allow_outside_root = False  # image paths that are absolute or climb out with '..' are refused
    c.data.preload = False  # read every image file once into memory
    # an image that does not decode: False stops with an error naming it; True logs it, and its
    # batch row carries no loss and is not validated (counted as skipped_images in the metrics)
    c.data.skip_undecodable = False
    c.data.blank_images = False  # zero every image (the demo's base pretraining: learn to read concept tokens)
    c.data.no_concept_share = 0.0  # this share of the images gets no concept token (the demo's base pretraining)
    c.data.worker_count = 0  # grain mp_prefetch processes
    c.data.read_threads = 2
    c.data.prefetch_batches = 2
    c.data.preprocess = "auto"  # auto: the checkpoint's preprocessor_config.json, else HF CLIP at the tower size

    # JAX's persistent compilation cache (local or gs://): a relaunch after a preemption skips compiling.
    c.compile_cache_dir = ""
    # A work dir may be a URL (gs://bucket/run): a store that does not answer within this many
    # seconds is an error naming the URL, before any compute.
    c.storage_timeout_s = 30
    # Mesh (data, fsdp, tensor) and logical-axis rules.
    c.mesh = "data=-1"
    c.sharding_rules = DEFAULT_RULES

    c.val = ml_collections.ConfigDict()
    c.val.every_steps = 0  # 0: only at the end
    c.val.at_end = True
    c.val.batch_size = 4
    c.val.max_examples = 0  # 0: the whole split
    c.val.max_new_tokens = 32  # greedy tokens for the key lines
    c.val.no_concept_baseline = False  # also report accuracy with every concept slot empty

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2  # latest N
    c.checkpoint.keep_best = 1  # best N by validation key accuracy
    c.checkpoint.async_save = True
    c.checkpoint.resume = True

    c.export = ml_collections.ConfigDict()
    c.export.pt = True  # the original's {step: {"values": Tensor}} .pt + a metadata JSON
    c.export.pt_dtype = "float32"

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.progress_bar = True
    c.log.tensorboard = True

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_at_step = -1  # fault injection (tests): the loss of this step becomes NaN
    c.debug.nan_grad_at_step = -1  # fault injection (tests): a gradient element of this step becomes NaN

    c.demo = ml_collections.ConfigDict()
    c.demo.generate_missing = False
    c.demo.root = "runs/demo"
    c.demo.n_images = 240
    c.demo.image_size = 64
    c.demo.vocab_size = 1024

    if preset == "demo":
        root = ml_collections.FieldReference("runs/demo")  # --config.demo.root=DIR moves every demo path
        c.workdir = f"runs/stage{stage}_demo"
        c.demo.generate_missing = True
        c.demo.root = root
        c.llava_checkpoint = root + "/llava_tiny"
        c.data.dataset_json = root + "/data/dataset.json"
        c.data.images_root = root + "/data"
        c.data.targets_csv = root + "/data/targets.csv"
        c.data.signals = (root + "/signals/concept_signals.keyed.json",)
        c.text.max_text_tokens = 160
        # The original's validate_signals threshold. The demo has 4-8 concepts per dimension and
        # zscore signals (T 0.8): K scores have a top z of at most sqrt(K-1), so 4 genres reach at
        # most sigmoid(sqrt(3))**1.25 = 0.82, and at the training script's 0.75 style and genre
        # got no token in about half of the images.
        c.gating.threshold = 0.6
        c.num_epochs = 0  # the demo is short: 64 steps
        c.num_steps = 64
        c.checkpoint.every_steps = 16
        c.val.every_steps = 32
        if stage == "B":
            c.init_from = "runs/stageA_demo"
    elif preset == "llava-1.5-7b":
        c.workdir = f"runs/stage{stage}_llava-1.5-7b"
        c.dtype = "bfloat16"
        c.param_dtype = "bfloat16"
        c.mesh = "fsdp=-1"
        c.text.max_text_tokens = 256
        c.val.max_new_tokens = 48
        if stage == "B":
            c.init_from = "runs/stageA_llava-1.5-7b"
    c.lock()  # a mistyped field (command line or override) is an error, not a new field
    return c
