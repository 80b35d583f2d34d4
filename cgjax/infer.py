"""Inference: image -> prototype signals -> gated concept tokens -> LLaVA answer, and the baseline.

``run_inference(config)`` (``python scripts/infer.py --config configs/infer.py``) answers every
image of a data set with the prompt templates asked for and writes, in the original project's
schema (indent 4, sorted keys, written atomically)::

    reasoning.json           {image_path: {"__meta__": {"activation": {dim: {"selected_global",
                              "selected_names", "ranked_global": [[idx, score], ...], "ranked_names"}}},
                              <prompt text>: <answer text>, ...}}
    reasoning_baseline.json  the same model and prompts without concept tokens ("activation": {})
    saliency.json            optional occlusion maps {image_path: {name: grid x grid}} (load_saliency)

``Inferencer`` is the same thing for Colab::

    inf = Inferencer.from_workdirs("ckpt/llava", "runs/stageB", prototypes="runs/prototypes")
    inf.answer(["a.jpg", pil_image], prompt_mode="both")  # -> [{"__meta__": ..., prompt: answer}, ...]

Prompt modes: ``structured`` (the original's JSON prompt; keys = the data set's dimensions +
``evidence``; sentinels configurable), ``natural`` (the original's prose prompt), ``stageA``
(``text.stage_a_prompt``), ``stageB`` (one of the original's Stage B variants, chosen by the md5 of
the image's key (its path) and the seed: never from its labels, so the question does not carry the
answer), ``both`` = structured + natural, ``all`` = the four; or a comma-separated list. Every prompt
is a template over the data set's dimensions; for artist/style/genre the original's bytes (the art
wording rule is ``cgjax.text``'s).

Signals: from the prototype head (CLIP tower + prototypes), post-processed exactly as the exported
training signals (the export's ``normalize`` / ``temperature`` / ``clip``, read from the keyed
signals file of the prototypes work dir), or read from signals files. The concept tokens follow
the trained gating (``cgjax.concepts.gating``); ``__meta__.activation`` reports the concepts the
gating actually injected (budget included; the original's meta ignored the budget) and the full
ranking per dimension. Generation: ``cgjax.generate`` (greedy, or temperature + top-p) on fixed
``[batch_size, prompt_length]`` left-padded batches (the last one padded), so each of the concept
and baseline runs compiles once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image

from cgjax import checkpoints, multihost, persistence, provenance, quantize, sharding, text
from cgjax.concepts import gating
from cgjax.concepts.index import ConceptIndex, gating_config_from_fields
from cgjax.concepts.model import ConceptLlava
from cgjax.config import check_choices, check_input_paths, config_paths
from cgjax.data.records import normalize_image_path, raw_image_paths, read_dataset_json, resolve_image
from cgjax.data.schema import normalize_split, read_json
from cgjax.data.signals import read_signals
from cgjax.data.splits import SplitPolicy
from cgjax.eval import saliency as sal
from cgjax.generate import LAYOUTS, Generator
from cgjax.losses import IGNORE_INDEX
from cgjax.preprocess import PREPROCESS_MODES, llava_preprocess_config, preprocess_image
from cgjax.prototypes import io as pio
from cgjax.prototypes.calibrate import postprocess
from cgjax.quantize import QuantConfig
from cgjax.steps import DTYPES, dtype_from_name
from converters import hf_llava, openclip

log = logging.getLogger(__name__)

__all__ = ["Inferencer", "run_inference", "load_trained_values", "TrainedValues", "structured_prompt",
           "natural_prompt", "prompt_modes", "write_reasoning", "load_saliency", "DEFAULT_SENTINELS",
           "PROMPT_MODES"]

DEFAULT_SENTINELS = ("<BEGIN_JSON>", "<END_JSON>")
PROMPT_MODES = ("structured", "natural", "stageA", "stageB")
# the enumerated fields of an inference config, checked first (cgjax.config.check_choices)
INFER_CHOICES = {"dtype": tuple(DTYPES), "param_dtype": ("",) + tuple(DTYPES), "data.preprocess": PREPROCESS_MODES,
                 "quantize": quantize.MODES, "generation.layout": ("",) + LAYOUTS}
#: The input paths of an inference config, checked to exist before anything is loaded.
INFER_INPUTS = ("llava_checkpoint", "stage_workdir", "prototypes.workdir", "prototypes.checkpoint",
                "prototypes.clip_checkpoint", "signals", "signals_index", "data.dataset_json", "data.images_root")


# ------------------------------------------------------------------------------------------------
# prompts


def structured_prompt(dims: Sequence[str] = ("artist", "style", "genre"),
                      sentinels: tuple[str, str] = DEFAULT_SENTINELS) -> str:
    """The original's structured prompt, byte for byte (its en dash in "2\u20133"; keys = ``dims`` + evidence)."""
    start, end = sentinels
    return (f"Between {start} and {end}, return only a compact JSON with keys {', '.join(list(dims) + ['evidence'])}. "
            "Use 'Unknown' if uncertain. In 'evidence', write 2\u20133 concise sentences explaining your reasoning. "
            "Do not include any text outside the JSON.")


def natural_prompt(dims: Sequence[str] = ("artist", "style", "genre")) -> str:
    """The original's natural prompt (the dimensions named in the prose; art words only for art dims)."""
    art = text.is_art_domain(dims)
    what, cues = ("painting", "brushwork") if art else ("image", "shape")
    return (f"Describe this {what} in one cohesive paragraph. Naturally mention the {text.join_names(dims)} in the "
            f"prose (no JSON, no key-value lines). Then briefly justify your identification by referring to {cues}, "
            "palette, and composition.")


def prompt_modes(mode: str | Sequence[str]) -> list[str]:
    """``"both"`` -> structured, natural; ``"all"`` -> the four; ``"a,b"`` or a list -> as given."""
    parts = [mode] if isinstance(mode, str) else list(mode)
    out: list[str] = []
    for part in parts:
        for m in str(part).split(","):
            m = m.strip()
            if not m:
                continue
            expanded = {"both": ["structured", "natural"], "all": list(PROMPT_MODES)}.get(m, [m])
            for e in expanded:
                if e not in PROMPT_MODES:
                    raise ValueError(f"unknown prompt mode {e!r}; expected one of {PROMPT_MODES}, both or all")
                if e not in out:
                    out.append(e)
    if not out:
        raise ValueError("no prompt mode given")
    return out


# ------------------------------------------------------------------------------------------------
# trained values


@dataclasses.dataclass
class TrainedValues:
    values: np.ndarray  # [n_concepts, k_max, D] float32
    index: ConceptIndex
    step: int
    stage: str
    directory: str
    export_meta: dict  # concepts_stage{A,B}.json of the work dir ({} when absent)


def load_trained_values(stage_workdir: str, index: ConceptIndex | None = None,
                        step: int | None = None) -> TrainedValues:
    """The trained ``concepts.values`` of a Stage A/B work dir (or its ``checkpoints/``), from the
    latest step (or ``step``), restored the way ``cgjax.train`` hands Stage A to Stage B. With
    ``index``, the checkpoint's concept index must equal it."""
    directory = checkpoints.stage_dir(stage_workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"stage work dir {stage_workdir}: {directory} is not a checkpoint directory")
    mngr = checkpoints.manager(directory, None, read_only=True)
    try:
        if step is None:
            step = mngr.latest_step()
        if step is None or int(step) not in mngr.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps: {list(mngr.all_steps())})")
        step = int(step)
        meta = checkpoints.read_meta(mngr, step)
        theirs = ConceptIndex.from_json(meta["concept_index"])
        if index is not None and theirs != index:
            raise ValueError(f"{directory} step {step}: its concept index {theirs.to_json()} differs from "
                             f"{index.to_json()}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        got = checkpoints.restore_state(mngr, step, checkpoints.abstract(checkpoints.saved_tree(mngr, step),
                                                                         lambda x: device))
    finally:
        mngr.close()
    params = got["params"]
    other = [k for k in params if k != "concepts"]
    if other or set(params.get("concepts", {})) != {"values"}:
        raise ValueError(f"{directory} step {step}: trained parameters other than concepts/values "
                         f"({sorted(params)}) are not supported by inference")
    values = np.asarray(jax.device_get(params["concepts"]["values"]), np.float32)
    if values.shape[:2] != (theirs.n_concepts, theirs.k_max):
        raise ValueError(f"{directory} step {step}: values of shape {values.shape} for {theirs.n_concepts} "
                         f"concepts x K_max {theirs.k_max}")
    stage = str(meta.get("stage", ""))
    workdir = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory
    export_meta = {}
    cands = [os.path.join(workdir, f"concepts_stage{stage}.json")] if stage else []
    cands += sorted(glob.glob(os.path.join(workdir, "concepts_stage*.json")))
    for p in cands:
        if os.path.isfile(p):
            export_meta = read_json(p)  # a corrupt file: a DataError naming it
            break
    return TrainedValues(values, theirs, step, stage, directory, export_meta)


# ------------------------------------------------------------------------------------------------
# images and signals


def _dtype(name: Any):
    return dtype_from_name(name) if isinstance(name, str) else name


def llava_preprocess(llava_checkpoint: str, model_config: Any, mode: str = "auto"):
    """The LLaVA checkpoint's preprocessing (:func:`cgjax.preprocess.llava_preprocess_config`)."""
    return llava_preprocess_config(llava_checkpoint, model_config.vision_config.image_size, mode)


def _open(image: Any):
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return image  # an array: cgjax.preprocess handles it


def image_key(image: Any, i: int) -> str:
    """reasoning.json key of an image: its absolute path, a PIL image's ``filename``, else ``image_<i>``."""
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    name = getattr(image, "filename", "") or ""
    return os.path.abspath(name) if name else f"image_{i}"


def _export_settings(prototypes_workdir: str) -> dict[str, Any]:
    """normalize / temperature / clip of the signals exported by a prototypes work dir ({} if unknown)."""
    for p in (os.path.join(prototypes_workdir, "artifacts", "concept_signals.keyed.json"),
              *sorted(glob.glob(os.path.join(prototypes_workdir, "**", "*.keyed.json"), recursive=True))):
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                meta = (json.load(f).get("meta") or {})
            if "normalize" in meta:
                return {k: meta[k] for k in ("normalize", "temperature", "clip") if k in meta}
    return {}


def _reorder(names_have: Sequence[str], names_want: Sequence[str], what: str) -> np.ndarray:
    pos = {n: i for i, n in enumerate(names_have)}
    missing = [n for n in names_want if n not in pos]
    if missing:
        raise ValueError(f"{what} lacks the trained concept(s) {missing} (it has {list(names_have)})")
    return np.asarray([pos[n] for n in names_want], np.int64)


# ------------------------------------------------------------------------------------------------
# the inferencer


class Inferencer:
    """A trained :class:`ConceptLlava` + tokenizer + signal source, answering images in fixed-shape
    jitted batches. Build it with :meth:`from_workdirs`."""

    def __init__(self, model: ConceptLlava, tokenizer: Any, index: ConceptIndex, preprocess: Any, *,
                 head: Any = None, signals: Any = None, signal_normalize: str = "none",
                 signal_temperature: float = 1.0, signal_clip: bool = True, dims: Sequence[str] | None = None,
                 images_root: str | None = None, batch_size: int = 8, max_new_tokens: int = 200,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 sentinels: tuple[str, str] = DEFAULT_SENTINELS, prompt_seed: int = 42, min_prompt_length: int = 0,
                 mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, Any]] | None = None,
                 layout: str | None = None):
        if head is None and signals is None:
            raise ValueError("Inferencer needs a prototype head or signals")
        self.model = model
        self.tokenizer = tokenizer
        self.index = index
        self.gating = model.gating
        self.preprocess = preprocess
        self.head = head
        self.signals = signals
        self.signal_normalize, self.signal_temperature, self.signal_clip = (
            str(signal_normalize), float(signal_temperature), bool(signal_clip))
        self.dims = tuple(dims) if dims else tuple(index.dims)
        self.images_root = images_root
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.layout = layout or None  # the decoder stack in generation (cgjax.generate.LAYOUTS; None = by backend)
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.sentinels = tuple(sentinels)
        self.prompt_seed = int(prompt_seed)
        self.image_token_id = model.llava.config.image_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._select = jax.jit(gating.select, static_argnums=1)
        self._generator = None  # a Generator over self.model, made at the first batch
        self.mesh = mesh  # with a mesh: the weights are sharded on it, and so is each generation batch
        self.rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
        self._encoded: dict[str, np.ndarray] = {}
        # one prompt length for every template: one compiled shape
        probes = [structured_prompt(self.dims, self.sentinels), natural_prompt(self.dims),
                  text.stage_a_prompt(self.dims), *text.stage_b_prompts(self.dims)]
        n = max(len(self.encode(p)) for p in probes)
        self.prompt_length = int(-(-max(n, int(min_prompt_length)) // 8) * 8)
        self._head_order = None
        if head is not None:
            ps = head.prototypes
            if ps is None:
                raise ValueError("the prototype head has no prototypes loaded")
            self._head_order = {}
            for d, names in zip(index.dims, index.names):
                if d not in ps.prototypes:
                    raise ValueError(f"the prototypes ({ps.source}) have no dimension {d!r}; they have {ps.dimensions}")
                self._head_order[d] = _reorder(ps.idx_to_concept[d], names, f"prototypes[{d!r}] ({ps.source})")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_workdirs(cls, llava_checkpoint: str, stage_workdir: str, prototypes: Any = None, signals: Any = None, *,
                      signals_index: Mapping[str, Any] | None = None, clip_model_name: str | None = None,
                      clip_checkpoint: str | None = None,
                      clip_batch_size: int = 32, signal_normalize: str | None = None,
                      signal_temperature: float | None = None, signal_clip: bool | None = None,
                      gating: Mapping[str, Any] | None = None, gating_from_stage: bool = True,
                      dataset_json: str | None = None,
                      images_root: str | None = None, dims: Sequence[str] | None = None, step: int | None = None,
                      dtype: str = "float32", param_dtype: str | None = None, preprocess: str = "auto",
                      mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, Any]] | None = None,
                      accept_mismatch: bool = False, quant: QuantConfig | None = None, **kwargs) -> "Inferencer":
        """Load everything from disk.

        ``prototypes``: a prototypes work dir (``scripts/train.py --config configs/prototypes.py``:
        its ``prototypes/`` checkpoint, and the export settings from its keyed signals file), a
        prototype checkpoint (orbax dir or ``.pt``) or a list of ``.pt`` files. ``signals``:
        signals file(s) in any format (used instead of the head; the original list JSON needs
        ``dataset_json`` and its concept index: ``signals_index`` ``{dim: Vocabulary}``, e.g.
        :func:`cgjax.prototypes.io.concept_index` of the prototypes ``.pt``, else the ``vocab.json``
        beside it). Gating: the training defaults, updated with ``gating`` (a dict of
        ``threshold``, ``backoff_delta``, ``topk_per_dim``, ``max_concepts``, ``priority``), then,
        with ``gating_from_stage``, with what the stage exported in ``concepts_stage*.json``. Other
        keyword arguments go to the constructor (``batch_size``, ``max_new_tokens``, ``temperature``,
        ``top_p``, ``seed``, ``sentinels``, ``prompt_seed``). With ``mesh`` (and the logical-axis
        ``rules``, as training's) the LLaVA is created directly in its shardings and every generation
        batch is sharded over the batch axes. ``quant``: the base's weights quantized
        (:mod:`cgjax.quantize`).
        """
        from transformers import AutoTokenizer  # optional [torch] extra


        if prototypes is None and not signals:
            raise ValueError("give a prototypes work dir / checkpoint or signals file(s)")
        tv = load_trained_values(stage_workdir, step=step)
        # the values answer with the base they were trained on (new data is normal, another base is not)

        mine = {"base": {"checkpoint": llava_checkpoint, "fingerprint": provenance.base_fingerprint(llava_checkpoint)}}
        for d in provenance.check(provenance.read(stage_workdir), mine, f"the values of {stage_workdir}",
                                  keys=("base",), accept=accept_mismatch):
            log.warning("accepted (accept_mismatch): %s", d)
        g = dict(gating or {})
        if gating_from_stage:
            g.update((tv.export_meta or {}).get("gating") or {})
        gcfg = gating_config_from_fields(tv.index, g)

        base_files = persistence.localize(llava_checkpoint, hf_llava.TOKENIZER_FILES)  # local for a gs:// base
        tokenizer = AutoTokenizer.from_pretrained(base_files)
        rules = tuple(rules) if rules is not None else sharding.DEFAULT_RULES
        llava = hf_llava.load_any(llava_checkpoint, dtype=_dtype(param_dtype or dtype), compute_dtype=_dtype(dtype),
                                  mesh=mesh, rules_table=rules, quant=quant)
        model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(0))
        if tuple(model.concepts.values.get_value().shape) != tuple(tv.values.shape):
            raise ValueError(f"trained values {tv.values.shape} do not fit this LLaVA "
                             f"({tuple(model.concepts.values.get_value().shape)})")
        model.concepts.values.set_value(jnp.asarray(tv.values))
        if mesh is not None:
            sharding.shard_model(model, mesh, rules)
        pp = llava_preprocess(base_files, llava.config, preprocess)

        head, sig, settings = None, None, {}
        if signals:
            sig = read_signals_files(signals, dataset_json, images_root, index=signals_index)
            images_root = images_root or (os.path.dirname(os.path.abspath(dataset_json)) if dataset_json else None)
        else:
            head, settings = load_head(prototypes, clip_model_name, clip_checkpoint, clip_batch_size)
        norm = signal_normalize if signal_normalize not in (None, "", "auto") else settings.get("normalize")
        temp = signal_temperature if signal_temperature not in (None, 0) else settings.get("temperature")
        clp = signal_clip if signal_clip is not None else settings.get("clip", True)
        if head is not None and norm is None:
            norm, temp = "zscore", temp or 0.8
            log.warning("signal post-processing unknown (no export settings found): using the prototype export "
                        "defaults normalize=zscore, temperature=%s", temp)
        inf = cls(model, tokenizer, tv.index, pp, head=head, signals=sig, signal_normalize=norm or "none",
                  signal_temperature=float(temp or 1.0), signal_clip=bool(clp), dims=dims, images_root=images_root,
                  mesh=mesh, rules=rules, **kwargs)
        inf.trained = tv
        log.info("inference: %s step %d (stage %s), %d concepts, gating %s; signals from %s (%s, T=%s)",
                 tv.directory, tv.step, tv.stage, tv.index.n_concepts, gcfg, "the prototype head" if head else
                 "files", inf.signal_normalize, inf.signal_temperature)
        return inf

    # -- text ------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> np.ndarray:
        """Prompt ids (image block included), ending at ``ASSISTANT:``."""
        return text.encode(self.tokenizer, prompt, self.model.n_image_block, self.image_token_id).input_ids

    def prompt(self, mode: str, key: str = "") -> str:
        """The prompt of ``mode`` for the image ``key``; nothing about the image's labels."""
        if mode == "structured":
            return structured_prompt(self.dims, self.sentinels)
        if mode == "natural":
            return natural_prompt(self.dims)
        if mode == "stageA":
            return text.stage_a_prompt(self.dims)
        if mode == "stageB":
            return text.stage_b_prompt_for_image(key, self.prompt_seed, dims=self.dims)
        raise ValueError(f"unknown prompt mode {mode!r}")

    # -- images and signals ----------------------------------------------------------------------
    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        """LLaVA-preprocessed ``[N, 3, H, W]``."""
        if not len(images):
            h, w = self.preprocess.size
            return np.zeros((0, 3, h, w), np.float32)
        return np.stack([preprocess_image(_open(im), self.preprocess) for im in images]).astype(np.float32)

    def head_pixels(self, images: Sequence[Any]) -> np.ndarray:
        """The prototype head's preprocessing ``[N, 3, H, W]`` (as its signal export)."""
        return np.stack([preprocess_image(_open(im), self.head.preprocess_cfg) for im in images]).astype(np.float32)

    def scores(self, images: Sequence[Any], keys: Sequence[str] | None = None) -> np.ndarray:
        """Signals ``[N, n_concepts]`` (global concept order; NaN = no score)."""
        if self.signals is not None:
            keys = list(keys) if keys is not None else [image_key(im, i) for i, im in enumerate(images)]
            return np.stack([self._signal_row(k) for k in keys]) if keys else np.zeros((0, self.index.n_concepts))

        if not len(images):
            return np.zeros((0, self.index.n_concepts), np.float32)
        emb = self.head.encoder(self.head_pixels(images))
        ps = self.head.prototypes
        cols = [postprocess(ps.signals(emb, d), self.signal_normalize, self.signal_temperature,
                            self.signal_clip)[:, self._head_order[d]] for d in self.index.dims]
        return np.concatenate(cols, axis=1).astype(np.float32)

    def _signal_row(self, key: str) -> np.ndarray:
        sig = self.signals
        row = _find_row(sig.image_paths, key, self.images_root)
        out = []
        for d, names in zip(self.index.dims, self.index.names):
            if d not in sig.vocabs:
                raise ValueError(f"the signals have no dimension {d!r} (they have {list(sig.vocabs)})")
            order = _reorder(sig.vocabs[d].names, names, f"signals[{d!r}]")
            out.append(np.full(len(names), np.nan, np.float32) if row is None else sig.scores[d][row][order])
        if row is None:
            log.warning("no signals for image %s: no concept is injected", key)
        return np.concatenate(out).astype(np.float32)

    def activation(self, scores: np.ndarray) -> list[dict]:
        """``__meta__["activation"]`` per image: the gating's selection and the ranking per dimension."""
        scores = np.asarray(scores, np.float32)
        if not len(scores):
            return []
        sel = jax.device_get(self._select(jnp.asarray(scores), self.gating))
        out = []
        for b in range(scores.shape[0]):
            act = {}
            chosen = [int(c) for c, v in zip(sel.concept[b], sel.valid[b]) if v]
            for d, names, (a, e) in zip(self.index.dims, self.index.names, self.index.ranges):
                s = scores[b, a:e]
                ok = [k for k in range(e - a) if np.isfinite(s[k])]
                order = sorted(ok, key=lambda k: (-float(s[k]), k))
                picked = [c for c in chosen if a <= c < e]
                act[d] = {"selected_global": picked, "selected_names": [names[c - a] for c in picked],
                          "ranked_global": [[a + k, float(s[k])] for k in order],
                          "ranked_names": [names[k] for k in order]}
            out.append(act)
        return out

    # -- generation ------------------------------------------------------------------------------
    def generate_ids(self, pixels: np.ndarray, prompts: Sequence[str], scores: np.ndarray,
                     use_concepts: bool = True) -> list[np.ndarray]:
        """Generated ids per row (cut after the first EOS, which is kept), in fixed batches."""
        if self._generator is None or self._generator.model is not self.model:
            self._generator = Generator(self.model, layout=self.layout)  # unrolled (CPU): layers laid out once
        n = len(prompts)
        out: list[np.ndarray] = []
        B, L = self.batch_size, self.prompt_length
        for start in range(0, n, B):
            idx = list(range(start, min(n, start + B)))
            idx_full = idx + [idx[0]] * (B - len(idx))
            rows = []
            for i in idx_full:
                ids = self._prompt_row(prompts[i])
                rows.append(text.Row(ids, np.full_like(ids, IGNORE_INDEX), np.zeros_like(ids), np.ones_like(ids)))
            batch = text.pad_rows(rows, L, self.pad_id, side="left")
            rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), start // B)
            put = self._put
            with contextlib.ExitStack() as stack:
                if self.mesh is not None:  # lets the model constrain activations to the batch sharding
                    stack.enter_context(jax.set_mesh(self.mesh))
                ids = self._generator(put(batch["input_ids"]), put(pixels[idx_full]), put(batch["attention_mask"]),
                                      max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                      top_p=self.top_p, eos_token_id=self.eos_id, rng=rng, pad_token_id=self.pad_id,
                                      concept_scores=put(np.asarray(scores[idx_full], np.float32)),
                                      use_concepts=use_concepts)
            ids = multihost.to_host(ids)  # one gather per batch (every process holds the whole answer)
            for k in range(len(idx)):
                row = ids[k]
                if self.eos_id is not None:
                    hits = np.flatnonzero(row == self.eos_id)
                    if hits.size:
                        row = row[: hits[0] + 1]
                out.append(row.astype(np.int32))
        return out

    def _put(self, x: np.ndarray):
        """A host batch (the same on every process) as one array sharded over the mesh's batch axes
        (replicated where the batch does not divide them); as it is without a mesh."""
        if self.mesh is None:
            return x
        x = np.asarray(x)
        spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.rules, self.mesh, x.shape)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda idx: x[idx])

    def _prompt_row(self, prompt: str) -> np.ndarray:
        ids = self._encoded.get(prompt)
        if ids is None:
            ids = self._encoded[prompt] = self.encode(prompt)
        if len(ids) > self.prompt_length:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the prompt length {self.prompt_length}")
        return ids

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True).strip()

    # -- answering -------------------------------------------------------------------------------
    def run(self, images: Sequence[Any], prompt_mode: str | Sequence[str] = "both", *,
            keys: Sequence[str] | None = None, scores: Any = None,
            concepts: bool = True, baseline: bool = False, chunk: int = 0) -> dict[str, Any]:
        """Answer ``images`` (paths or PIL images). Returns ``{"reasoning": {key: entry},
        "baseline": {key: entry} (with ``baseline``), "ids": {(key, mode): generated ids},
        "prompts": {(key, mode): prompt}, "scores": {key: [n_concepts]}}``. ``scores`` overrides
        the signals (``[N, n_concepts]``); the Stage B prompt is chosen from each key; images are
        processed ``chunk`` at a time (default: the batch size)."""
        modes = prompt_modes(prompt_mode)
        images = list(images)
        keys = list(keys) if keys is not None else [image_key(im, i) for i, im in enumerate(images)]
        if len(set(keys)) != len(keys):
            raise ValueError("image keys must be unique")
        out: dict[str, Any] = {"reasoning": {}, "ids": {}, "prompts": {}, "scores": {}}
        if baseline:
            out["baseline"] = {}
        chunk = int(chunk) if chunk and chunk > 0 else self.batch_size
        for c0 in range(0, len(images), chunk):
            ims, ks = images[c0:c0 + chunk], keys[c0:c0 + chunk]
            px = self.pixels(ims)
            sc = (np.asarray(scores[c0:c0 + chunk], np.float32) if scores is not None else self.scores(ims, ks))
            if sc.shape != (len(ims), self.index.n_concepts):
                raise ValueError(f"scores must be [N, {self.index.n_concepts}], got {sc.shape}")
            acts = self.activation(sc)
            for k, a, s in zip(ks, acts, sc):
                out["scores"][k] = s
                if concepts:
                    out["reasoning"][k] = {"__meta__": {"activation": a}}
                if baseline:
                    out["baseline"][k] = {"__meta__": {"activation": {}}}
            for mode in modes:
                prompts = [self.prompt(mode, k) for k in ks]
                for k, p in zip(ks, prompts):
                    out["prompts"][(k, mode)] = p
                runs = ([("reasoning", True)] if concepts else []) + ([("baseline", False)] if baseline else [])
                for name, use in runs:
                    ids = self.generate_ids(px, prompts, sc, use_concepts=use)
                    for k, p, row in zip(ks, prompts, ids):
                        out[name][k][p] = self.decode(row)
                        if use:
                            out["ids"][(k, mode)] = row
        return out

    def answer(self, images: Sequence[Any], prompt_mode: str | Sequence[str] = "both", *, use_concepts: bool = True,
               keys: Sequence[str] | None = None, scores: Any = None) -> list[dict]:
        """One reasoning.json entry per image (``{"__meta__": ..., prompt: answer}``), in order;
        ``use_concepts=False``: the no-concept baseline (``"activation": {}``)."""
        images = list(images)
        keys = list(keys) if keys is not None else [image_key(im, i) for i, im in enumerate(images)]
        res = self.run(images, prompt_mode, keys=keys, scores=scores, concepts=use_concepts,
                       baseline=not use_concepts)
        table = res["reasoning"] if use_concepts else res["baseline"]
        return [table[k] for k in keys]

    # -- saliency --------------------------------------------------------------------------------
    def saliency(self, image: Any, answer_ids: Any = None, prompt: str | None = None, *, grid: int = 8,
                 minibatch: int = 8, source: str = "both", upsample: bool = True, scores: Any = None,
                 key: str | None = None) -> dict[str, np.ndarray]:
        """Occlusion maps of one image (``cgjax.eval.saliency``): ``prototype/<dim>`` for the top
        selected concept of each dimension (the top-ranked one when none is selected; needs the
        head) and ``llava`` for the answer ``answer_ids`` to ``prompt`` (default: the structured
        prompt; generated here when not given), concept tokens on. ``source``: prototype, llava
        or both. Maps are ``H x W`` (``upsample=False``: ``grid x grid``)."""
        if source not in ("prototype", "llava", "both"):
            raise ValueError(f"saliency source must be prototype, llava or both, got {source!r}")
        k = key or image_key(image, 0)
        sc = np.asarray(scores, np.float32) if scores is not None else self.scores([image], [k])[0]
        out: dict[str, np.ndarray] = {}
        if source in ("prototype", "both") and self.head is not None:
            act = self.activation(sc[None])[0]
            concepts = {}
            for d, names in zip(self.index.dims, self.index.names):
                a = act[d]
                top = (a["selected_names"] or a["ranked_names"] or [None])[0]
                if top is not None:
                    concepts[d] = self.head.prototypes.concept_to_idx[d][top]
            maps = sal.prototype_saliency(self.head, self.head_pixels([image])[0], concepts, grid,
                                          normalize=self.signal_normalize, temperature=self.signal_temperature,
                                          clip=self.signal_clip, minibatch=minibatch, upsample=upsample)
            out.update({f"prototype/{d}": m for d, m in maps.items()})
        if source in ("llava", "both"):
            prompt = prompt or structured_prompt(self.dims, self.sentinels)
            px = self.pixels([image])
            if answer_ids is None:
                answer_ids = self.generate_ids(px, [prompt], sc[None])[0]
            out["llava"] = sal.llava_saliency(self.model, self.encode(prompt), answer_ids, px[0], sc, grid,
                                              minibatch=minibatch, length=self.prompt_length + self.max_new_tokens,
                                              pad_id=self.pad_id, upsample=upsample)
        return out


def _find_row(paths: Sequence[str], key: str, images_root: str | None) -> int | None:
    """Row of ``key`` in signal image paths: exact, relative to ``images_root``, else a unique path suffix."""
    index = {p: i for i, p in enumerate(paths)}
    if key in index:
        return index[key]
    if images_root:
        rel = os.path.relpath(os.path.abspath(key), os.path.abspath(images_root)).replace(os.sep, "/")
        rel = normalize_image_path(rel, images_root)
        if rel in index:
            return index[rel]
    parts = key.replace("\\", "/").split("/")
    hits = [i for p, i in index.items()
            if "/".join(parts[-len(p.split("/")):]) == p and len(p.split("/")) <= len(parts)]
    return hits[0] if len(hits) == 1 else None


def read_signals_files(paths: Any, dataset_json: str | None = None, images_root: str | None = None,
                       index: Mapping[str, Any] | None = None):
    """Merge signals files (any format); the original list JSON aligns with ``dataset_json``'s rows
    and is read against its concept index (``index``, else the ``vocab.json`` beside it)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    root = images_root or (os.path.dirname(os.path.abspath(dataset_json)) if dataset_json else None)
    raw = raw_image_paths(dataset_json, root) if dataset_json else None
    merged = None
    for p in paths:
        s = read_signals(p, raw, index=index, images_root=root, index_source="the concept index given (signals_index)")
        merged = s if merged is None else merged.merge(s)
    return merged


def load_head(prototypes: Any, clip_model_name: str | None = None, clip_checkpoint: str | None = None,
              batch_size: int = 32):
    """``(PrototypeHead, export settings)`` from a prototypes work dir or checkpoint(s)."""
    settings: dict[str, Any] = {}
    if isinstance(prototypes, (list, tuple)):
        ps = pio.load_many(prototypes)
    else:
        p = os.fspath(prototypes)
        if os.path.isdir(os.path.join(p, "prototypes")):  # a prototypes work dir
            settings = _export_settings(p)
            ps = pio.load_prototypes(os.path.join(p, "prototypes"))
            marker = os.path.join(p, "clip", "clip.json")  # the demo's generated tower
            if clip_model_name is None and clip_checkpoint is None and os.path.isfile(marker):
                with open(marker) as f:
                    m = json.load(f)
                if m.get("model_name") == ps.clip_model_name or not ps.clip_model_name:
                    clip_checkpoint = m.get("checkpoint")
        else:
            ps = pio.load_prototypes(p)
    name = clip_model_name or ps.clip_model_name
    head = openclip.load_head(name, clip_checkpoint or None, batch_size=batch_size)
    head.load_prototypes(ps)
    return head, settings


# ------------------------------------------------------------------------------------------------
# files


def write_reasoning(path: str, reasoning: Mapping[str, Any]) -> str:
    """The original's ``json.dump(indent=4, sort_keys=True)``, written atomically."""
    persistence.write_text(path, json.dumps(reasoning, indent=4, sort_keys=True))
    return path


def load_saliency(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``saliency.json`` -> ``{image key: {name: float32 map}}`` for ``write_report(saliency=...)``."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    return {k: {n: np.asarray(m, np.float32) for n, m in v.items()} for k, v in obj.get("maps", {}).items()}


def run_inference(config) -> dict[str, str]:
    """Answer the images of ``config.data`` (see ``configs/infer.py``) and write the reasoning files.

    Returns ``{"reasoning": path, "reasoning_baseline": path (if baseline), "saliency": path (if
    saliency)}``.
    """
    c = config
    check_choices(c, INFER_CHOICES)  # before any file is read or model loaded
    prompt_modes(c.prompt.mode)
    check_input_paths(c, INFER_INPUTS)
    out_dir = c.output_dir or os.path.join(c.workdir, "eval")
    ds = read_dataset_json(c.data.dataset_json, c.data.images_root or None,
                           dimensions=tuple(config_paths(c.data.dimensions)) or None,  # () = the records'
                           allow_outside_root=bool(c.data.allow_outside_root))
    dims = ds.dimensions
    ds = SplitPolicy.from_config(c.data).apply(ds)  # records without a split: the split file every stage uses

    split = normalize_split(c.data.split) if c.data.split else ""  # "val" is "validation", as in training
    records = [r for r in ds.records if not split or r.split == split]
    if split and not records:
        have = sorted({str(r.split) for r in ds.records})
        raise ValueError(f"{c.data.dataset_json}: no record of split {split!r} (the splits there: {have})")
    if int(c.data.limit) > 0:
        records = records[: int(c.data.limit)]
    paths = [os.path.abspath(resolve_image(ds.images_root, r.image)) for r in records]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{c.data.dataset_json}: {len(missing)} image(s) not found, e.g. {missing[0]}")

    s = c.saliency
    want_saliency = bool(s.enabled) and int(s.n_images) != 0
    if want_saliency:  # checked before the model is loaded
        if s.source not in ("prototype", "llava", "both"):
            raise ValueError(f"saliency.source {s.source!r}: expected prototype, llava or both")
        if s.source == "llava" and s.prompt_mode not in prompt_modes(c.prompt.mode):
            raise ValueError(f"saliency.prompt_mode {s.prompt_mode!r} is not among the prompt modes "
                             f"{prompt_modes(c.prompt.mode)} (prompt.mode={c.prompt.mode!r})")
    mesh = sharding.make_mesh(sharding.parse_mesh(c.mesh)) if c.get("mesh") else None
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in c.get("sharding_rules",
                                                                                 sharding.DEFAULT_RULES))
    g = {k: c.gating[k] for k in ("threshold", "backoff_delta", "topk_per_dim", "max_concepts", "priority")}
    signals = config_paths(c.signals)
    index_files = config_paths(c.get("signals_index", ""))
    p = c.prototypes
    inf = Inferencer.from_workdirs(
        c.llava_checkpoint, c.stage_workdir, prototypes=(p.workdir or config_paths(p.checkpoint) or None),
        signals=signals or None, signals_index=pio.concept_index(index_files) if index_files else None,
        clip_model_name=p.clip_model_name or None, clip_checkpoint=p.clip_checkpoint or None,
        clip_batch_size=int(p.batch_size), signal_normalize=p.normalize, signal_temperature=float(p.temperature),
        signal_clip=bool(p.clip), gating=g, gating_from_stage=bool(c.gating.from_stage),
        dataset_json=c.data.dataset_json,
        images_root=ds.images_root, dims=dims, step=int(c.step) if int(c.step) >= 0 else None, dtype=c.dtype,
        param_dtype=c.param_dtype or None, preprocess=c.data.preprocess, batch_size=int(c.generation.batch_size),
        max_new_tokens=int(c.generation.max_new_tokens), temperature=float(c.generation.temperature),
        top_p=float(c.generation.top_p), seed=int(c.seed), sentinels=(c.prompt.sentinel_start, c.prompt.sentinel_end),
        prompt_seed=int(c.prompt.stage_b_seed), mesh=mesh, rules=rules, accept_mismatch=bool(c.accept_mismatch),
        quant=QuantConfig.from_config(c), layout=c.generation.layout or None)

    # answers already in reasoning.json under the same inference settings are kept, not recomputed
    fingerprint = inference_fingerprint(c)
    reasoning_path = os.path.join(out_dir, "reasoning.json")
    baseline_path = os.path.join(out_dir, "reasoning_baseline.json")
    reasoning = _answered(reasoning_path, fingerprint, paths)
    baseline = _answered(baseline_path, fingerprint, paths) if c.baseline else {}
    todo = [i for i, k in enumerate(paths) if k not in reasoning or (c.baseline and k not in baseline)]
    log.info("inference on %d images (%s; %d answered before under the same settings), prompts %s, baseline %s",
             len(todo), c.data.split or "all splits", len(paths) - len(todo), c.prompt.mode, bool(c.baseline))
    written: dict[str, str] = {}

    def write_answers():  # process 0 writes; every process computed the same answers
        written["reasoning"] = write_reasoning(reasoning_path, reasoning)
        if c.baseline:
            written["reasoning_baseline"] = write_reasoning(baseline_path, baseline)

    res: dict[str, dict] = {"ids": {}, "prompts": {}, "scores": {}}
    every = max(1, int(c.get("write_every", 0)) or int(c.generation.batch_size))
    for start in range(0, len(todo), every):
        idx = todo[start:start + every]
        part = inf.run([paths[i] for i in idx], c.prompt.mode, keys=[paths[i] for i in idx],
                       baseline=bool(c.baseline))  # no labels: the prompts never depend on them
        for name, into in (("reasoning", reasoning), ("baseline", baseline)):
            for k, entry in part.get(name, {}).items():
                entry["__meta__"]["config_fingerprint"] = fingerprint
                into[k] = entry
        for key in res:
            res[key].update(part[key])
        multihost.on_primary("writing the answers so far", write_answers)  # every `write_every` images
    reasoning = {k: reasoning[k] for k in paths}  # the data set's order
    baseline = {k: baseline[k] for k in paths} if c.baseline else baseline

    if want_saliency:
        n = len(paths) if int(s.n_images) < 0 else min(len(paths), int(s.n_images))
        mode = s.prompt_mode
        maps: dict[str, dict[str, list]] = {}
        sal_path = os.path.join(out_dir, "saliency.json")
        for k in paths[:n]:
            if k not in res["scores"]:
                continue  # answered by an earlier run: its saliency is in that run's saliency.json
            ans = res["ids"].get((k, mode))
            prompt = res["prompts"].get((k, mode))
            src = s.source if ans is not None else "prototype"
            try:
                m = inf.saliency(k, ans, prompt, grid=int(s.grid), minibatch=int(s.minibatch), source=src,
                                 upsample=False, scores=res["scores"][k], key=k)
            except Exception as e:  # noqa: BLE001 - a failed map never costs the answers
                log.warning("saliency of %s failed (%s: %s); the answers are kept", k, type(e).__name__, e)
                reasoning[k]["__meta__"]["saliency_error"] = f"{type(e).__name__}: {e}"
                continue
            maps[k] = {name: v.tolist() for name, v in m.items()}
            meta = reasoning[k]["__meta__"]
            for name, v in m.items():
                if name.startswith("prototype/"):
                    meta.setdefault("saliency", {})[name.split("/", 1)[1]] = {"path": sal_path,
                                                                               "stats": sal.saliency_stats(v)}
                else:
                    meta.setdefault("saliency_llava", {})[mode] = {"path": sal_path, "stats": sal.saliency_stats(v)}
        if maps:
            multihost.on_primary("writing saliency.json", lambda: persistence.write_json(
                sal_path, {"grid": int(s.grid), "maps": maps}, indent=None))
            written["saliency"] = sal_path

    multihost.on_primary("writing the answers", write_answers)
    log.info("wrote %s", written)
    return written


def inference_fingerprint(config) -> str:
    """A hash of the settings that decide the answers (model, values, signals, gating, prompts,
    generation): answers written under the same fingerprint are reused by a rerun."""
    c = config
    generation = {k: v for k, v in c.generation.to_dict().items() if k != "layout"}  # same tokens either way
    keys = {"llava_checkpoint": c.llava_checkpoint, "stage_workdir": c.stage_workdir, "step": int(c.step),
            "dtype": c.dtype, "param_dtype": c.param_dtype, "prototypes": c.prototypes.to_dict(),
            "signals": config_paths(c.signals), "gating": c.gating.to_dict(), "prompt": c.prompt.to_dict(),
            "generation": generation, "seed": int(c.seed), "preprocess": c.data.preprocess}
    if config_paths(c.get("signals_index", "")):  # (absent when unset: earlier fingerprints are unchanged)
        keys["signals_index"] = config_paths(c.signals_index)
    quant = QuantConfig.from_config(c)
    if quant.enabled:  # (absent when off: fingerprints of unquantized runs are unchanged)
        keys["quantize"] = quant.to_json()
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _answered(path: str, fingerprint: str, keys: Sequence[str]) -> dict[str, Any]:
    """The entries of an earlier ``reasoning.json`` for ``keys`` written under ``fingerprint``."""
    if not os.path.exists(path):
        return {}

    old = read_json(path)
    if not isinstance(old, dict):
        return {}
    wanted = set(keys)
    return {k: e for k, e in old.items() if k in wanted and isinstance(e, dict)
            and (e.get("__meta__") or {}).get("config_fingerprint") == fingerprint}
