"""Inference (reasoning.json + the no-concept baseline): ``python scripts/infer.py --config configs/infer.py``.

Presets (``configs/infer.py:preset=NAME``):

* ``demo`` (default): every path relative to the demo work dir ``--config.workdir=DIR``
  (``scripts/demo.py --workdir DIR``): ``DIR/checkpoints/llava-base``, Stage B in ``DIR/stageB``,
  the prototype head of ``DIR/prototypes``, the test split of ``DIR/data/dataset.json``;
  writes ``DIR/eval/reasoning.json`` and ``DIR/eval/reasoning_baseline.json``.
* ``llava-1.5-7b``: a local ``llava-hf/llava-1.5-7b-hf`` in bf16; set the paths.

Override any field on the command line, e.g. ``--config.generation.temperature=0.2``. See
``cgjax/infer.py`` for the prompt modes and the output schema.
"""
from __future__ import annotations

import ml_collections

from cgjax.config import parse_preset
from cgjax.sharding import DEFAULT_RULES

PRESETS = ("demo", "llava-1.5-7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, PRESETS, "demo")
    c = ml_collections.ConfigDict()
    c.task = "infer"
    c.preset = preset
    c.workdir = "runs/infer"
    c.output_dir = ""  # "" -> workdir/eval
    c.seed = 0  # sampling RNG
    c.compile_cache_dir = ""
    # Mesh for the LLaVA ("" = one device; e.g. "fsdp=-1" for a 7B model over every chip) and the
    # logical-axis rules (as training's): weights created in their shardings, batches sharded.
    c.mesh = ""
    c.sharding_rules = DEFAULT_RULES  # JAX's persistent compilation cache (local or gs://)

    c.llava_checkpoint = ""  # HF LLaVA directory (config.json, safetensors, tokenizer files)
    c.stage_workdir = ""  # Stage A/B work dir (or its checkpoints/): the trained concept values
    c.accept_mismatch = False  # True: answer with a base other than the one the values were trained on
    c.step = -1  # checkpoint step; -1 = latest
    c.dtype = "float32"  # compute dtype of LLaVA: float32 | bfloat16
    c.param_dtype = ""  # "" = dtype
    # Weight-only quantization of the frozen base's language model and projector (cgjax.quantize):
    # none | int8 (per output channel) | int4 (groups of quantize_group_size inputs). The HF
    # checkpoint is quantized weight by weight as it loads (or a quantized orbax one is read as it is).
    c.quantize = "none"
    c.quantize_group_size = 128
    c.quantize_activations = False  # int8 only: int8 activations too (PyTorch's dynamic int8; the CPU fast path)

    # Signals: the prototype head (CLIP tower + prototypes), or signals files when ``signals`` is set.
    c.prototypes = ml_collections.ConfigDict()
    c.prototypes.workdir = ""  # a prototypes work dir (its prototypes/ checkpoint + export settings)
    c.prototypes.checkpoint = ""  # or prototype checkpoint(s): an orbax dir or .pt files (comma-separated)
    c.prototypes.clip_model_name = ""  # "" = the name stored with the prototypes
    c.prototypes.clip_checkpoint = ""  # local open_clip weights ("" for local-dir:/hf-hub: names)
    c.prototypes.batch_size = 32
    c.prototypes.normalize = "auto"  # auto = as the exported signals (keyed file meta), else zscore
    c.prototypes.temperature = 0.0  # 0 = as the export (else 0.8)
    c.prototypes.clip = True
    c.signals = ()  # signals files (any format) used instead of the head
    # the concept index of list-format signals: prototype .pt file(s), a prototypes work dir or a
    # vocab.json; "" = the vocab.json beside the signals
    c.signals_index = ""

    c.data = ml_collections.ConfigDict()
    c.data.dataset_json = ""
    c.data.images_root = ""  # "" -> the JSON's folder
    c.data.split = "test"  # records of this split ("" = all)
    # Records without a ``split`` take theirs from the data set's split file, as in training
    # (cgjax.data.splits; made here if no stage made it yet): "" = <dataset stem>.splits.json beside it.
    c.data.splits_json = ""
    c.data.val_fraction = 0.15
    c.data.test_fraction = 0.15
    c.data.split_seed = 0
    c.data.allow_outside_root = False  # image paths that are absolute or climb out with '..' are refused
    c.data.limit = 0  # > 0: the first N images
    c.data.dimensions = ()  # () = the records' concepts keys; artist, style, genre when they name none
    c.data.preprocess = "auto"  # auto: the checkpoint's preprocessor_config.json, else HF CLIP at the tower size

    # Gating (defaults of training); with from_stage, the stage's exported concepts_stage*.json wins.
    c.gating = ml_collections.ConfigDict()
    c.gating.from_stage = True
    c.gating.threshold = 0.75
    c.gating.backoff_delta = 0.05
    c.gating.topk_per_dim = 2
    c.gating.max_concepts = 3
    c.gating.priority = "artist,style,genre"

    c.prompt = ml_collections.ConfigDict()
    c.prompt.mode = "both"  # structured | natural | stageA | stageB | both | all | comma-separated
    c.prompt.sentinel_start = "<BEGIN_JSON>"
    c.prompt.sentinel_end = "<END_JSON>"
    c.prompt.stage_b_seed = 42  # the Stage B prompt hash seed (training's text.prompt_seed)

    c.generation = ml_collections.ConfigDict()
    c.generation.batch_size = 8  # fixed batch (the last one padded)
    # reasoning.json is rewritten (atomically) every this many images (0 = every generation batch);
    # a rerun keeps the answers written under the same settings and answers only the rest
    c.write_every = 0
    c.generation.max_new_tokens = 200  # the original's max_reason_tokens
    c.generation.temperature = 0.0  # 0 = greedy; the original sampled at 0.2
    c.generation.top_p = 0.7  # the original's nucleus (used when temperature > 0)
    # the decoder stack in generation: "unrolled" (per-layer weights; fastest on a CPU) or "scanned"
    # (compile time flat in depth); "" picks by backend (cgjax.generate.default_layout)
    c.generation.layout = ""

    c.baseline = True  # also write reasoning_baseline.json (same model and prompts, no concept tokens)

    c.saliency = ml_collections.ConfigDict()
    c.saliency.enabled = False
    c.saliency.n_images = 8  # first N images (-1 = all)
    c.saliency.source = "both"  # prototype | llava | both
    c.saliency.prompt_mode = "structured"  # the answer whose loss the LLaVA map explains
    c.saliency.grid = 8
    c.saliency.minibatch = 8  # occluded copies per lax.map step

    if preset == "demo":
        root = ml_collections.FieldReference("runs/demo")  # --config.workdir=DIR moves every path
        c.workdir = root
        c.llava_checkpoint = root + "/checkpoints/llava-base"
        c.stage_workdir = root + "/stageB"
        c.prototypes.workdir = root + "/prototypes"
        c.data.dataset_json = root + "/data/dataset.json"
        c.data.images_root = root + "/data/images"
        c.generation.max_new_tokens = 96
        c.saliency.enabled = True
        c.saliency.n_images = 12
    elif preset == "llava-1.5-7b":
        c.workdir = "runs/infer_llava-1.5-7b"
        c.dtype = "bfloat16"
        c.mesh = "fsdp=-1"  # 7B in bf16 is ~14 GB: shard it over every chip
    c.lock()  # a mistyped field (command line or override) is an error, not a new field
    return c
