"""Back to PyTorch: a finished work dir -> files the original (PyTorch / HF) world loads.

``export(workdir, out)`` (``python scripts/export.py --workdir DIR --out OUT``) writes::

    OUT/llava/                         HF LLaVA dir of the base checkpoint the stages used
                                       (``LlavaForConditionalGeneration.from_pretrained`` + tokenizer)
    OUT/clip/open_clip_visual.pt       the prototypes' CLIP image tower as an open_clip state dict
                                       (``visual.*``; ``load_state_dict(sd, strict=False)``)
    OUT/prototypes_<dim>_trained.pt    the original's prototype payload, one file per dimension
    OUT/concepts.pt                    the original's concept checkpoint ``{step: {"values": [N, K, D]}}``
    OUT/concepts.json                  dims, names, ranges, k_max, gating options, source
    OUT/signals/                       the exported signals (original JSON / CSV, keyed JSON) and the
                                       vocab.json naming the list files' concepts
    OUT/concept_tokens.py              self-contained PyTorch gating + concept tokens + greedy decoding
    OUT/example.py                     how to use it on the exported HF LLaVA
                                       (both copied from ``cgjax/torch_export/``)

Work dir layout (``scripts/demo.py``): ``stageB/`` (else ``stageA/``) with the trained values,
``prototypes/`` with ``artifacts/`` and the ``prototypes/`` checkpoint. Everything is written to a
temporary folder beside ``OUT`` and renamed into place.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from cgjax import infer, persistence, provenance, torch_export
from cgjax.concepts.gating import GatingConfig
from cgjax.concepts.index import ConceptIndex, gating_config_from_fields
from cgjax.data.signals import SIGNALS_INDEX_FILE
from cgjax.preprocess import llava_preprocess_config
from cgjax.prototypes import io as pio
from cgjax.quantize import QuantConfig
from converters import hf_llava, openclip
from converters.hf_llava import TOKENIZER_FILES

__all__ = ["export", "find_stage_workdir"]


def find_stage_workdir(workdir: str) -> str:
    """``workdir/stageB`` if it holds checkpoints, else ``workdir/stageA``, else ``workdir`` itself."""
    for name in ("stageB", "stageA"):
        d = os.path.join(workdir, name)
        if os.path.isdir(os.path.join(d, "checkpoints")):
            return d
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return workdir
    raise FileNotFoundError(f"{workdir}: no stageB/ or stageA/ work dir with checkpoints/")


def _load_prototypes(protos_wd: str):
    pts = sorted(glob.glob(os.path.join(protos_wd, "artifacts", "prototypes_*_trained.pt")))
    if pts:
        return pio.load_many(pts)
    ck = os.path.join(protos_wd, "prototypes")
    if os.path.isdir(ck):
        return pio.load_checkpoint(ck)
    raise FileNotFoundError(f"{protos_wd}: neither artifacts/prototypes_*_trained.pt nor a prototypes/ checkpoint")


def _gating_json(gcfg, dims) -> dict[str, Any]:
    pri = gcfg.priority if gcfg.priority is not None else range(len(dims))
    return {"threshold": float(gcfg.threshold), "backoff_delta": float(gcfg.backoff_delta),
            "topk_per_dim": int(gcfg.topk_per_dim), "max_concepts": int(gcfg.max_concepts),
            "priority": [dims[i] for i in pri], "k_max": int(gcfg.k_max)}


def export(workdir: str, out: str, *, stage_workdir: str | None = None, prototypes_workdir: str | None = None,
           llava_checkpoint: str | None = None, step: int | None = None, overwrite: bool = False,
           accept_mismatch: bool = False) -> dict[str, str]:
    """Write the PyTorch export of ``workdir`` to ``out`` (replaced whole when cgjax wrote it, or with
    ``overwrite``; never when it holds an input); returns the written paths."""
    import torch  # optional [torch] extra

    workdir = os.path.abspath(workdir)
    persistence.check_output_dir(out, overwrite=overwrite,
                                 inputs=(workdir, stage_workdir, prototypes_workdir, llava_checkpoint))
    stage_wd = stage_workdir or find_stage_workdir(workdir)
    protos_wd = prototypes_workdir or os.path.join(workdir, "prototypes")
    tv = infer.load_trained_values(stage_wd, step=step)
    ckpt = llava_checkpoint or (tv.export_meta or {}).get("llava_checkpoint")
    if not ckpt:
        raise ValueError(f"{stage_wd}: its concepts_stage*.json names no llava_checkpoint; pass llava_checkpoint")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise FileNotFoundError(f"LLaVA checkpoint {ckpt} (from {stage_wd}) has no config.json")
    if os.path.exists(os.path.join(ckpt, hf_llava.QUANTIZATION_FILE)):
        raise ValueError(f"LLaVA checkpoint {ckpt} (from {stage_wd}) is a quantized copy of the base: the export ships "
                         "the original, unquantized base; pass llava_checkpoint=<the HF checkpoint it was made from>")

    mine = {"base": {"checkpoint": ckpt, "fingerprint": provenance.base_fingerprint(ckpt)}}
    provenance.check(provenance.read(stage_wd), mine, f"the values of {stage_wd}", keys=("base",),
                     accept=accept_mismatch)
    gcfg = gating_config_from_fields(tv.index, (tv.export_meta or {}).get("gating") or {})
    ps = _load_prototypes(protos_wd)

    out = os.path.abspath(out)
    with persistence.atomic_dir(out, overwrite=overwrite, inputs=(workdir, stage_wd, protos_wd, ckpt)) as tmp:
        # the LLaVA: the frozen base is exported as it is. An HF directory's files are hard-linked (or
        # copied) and checked by hash; a params-only orbax checkpoint is converted back to HF.
        llava_dir = os.path.join(tmp, "llava")
        if hf_llava.is_orbax_dir(ckpt) or not glob.glob(os.path.join(ckpt, "*.safetensors")):
            llava = hf_llava.load_any(ckpt)
            hf_llava.save(llava, llava_dir, tokenizer_from=ckpt)
            image_size = llava.config.vision_config.image_size
            del llava
        else:
            copy_hf_checkpoint(ckpt, llava_dir)
            with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
                image_size = int(json.load(f)["vision_config"]["image_size"])
        # the image preprocessing cgjax trained with, as the HF image processor example.py loads
        pp = llava_preprocess_config(ckpt, image_size)
        pp_path = os.path.join(llava_dir, "preprocessor_config.json")
        if os.path.exists(pp_path):
            os.unlink(pp_path)  # a fresh file: never write through a link into the source
        with open(pp_path, "w") as f:
            json.dump(pp.to_hf_image_processor(), f, indent=2)
        # the CLIP tower of the prototypes
        os.makedirs(os.path.join(tmp, "clip"))
        clip = openclip.load(ps.clip_model_name)
        openclip.save(clip.model, os.path.join(tmp, "clip", "open_clip_visual.pt"))
        with open(os.path.join(tmp, "clip", "clip.json"), "w") as f:
            json.dump({"clip_model_name": ps.clip_model_name, "keys": "visual.* (load_state_dict(sd, strict=False))"},
                      f, indent=2)
        # prototypes, one original-format file per dimension

        for d in ps.dimensions:
            pio.save_pt(ps, os.path.join(tmp, f"prototypes_{d}_trained.pt"), [d])
        # concept values + metadata
        torch.save({int(tv.step): {"values": torch.from_numpy(np.array(tv.values, np.float32, copy=True))}},
                   os.path.join(tmp, "concepts.pt"))
        idx = tv.index
        meta = {"format": "cgjax.concept_values", "stage": tv.stage, "step": int(tv.step), "dims": list(idx.dims),
                "names": {d: list(n) for d, n in zip(idx.dims, idx.names)},
                "dim_ranges": {d: list(r) for d, r in zip(idx.dims, idx.ranges)},
                "k_max": int(idx.k_max), "n_concepts": int(idx.n_concepts), "embed_dim": int(tv.values.shape[-1]),
                "gating": _gating_json(gcfg, list(idx.dims)), "llava_checkpoint": os.path.abspath(ckpt),
                "source": os.path.abspath(tv.directory),
                # the values were trained on this quantization of the base (example.py --load-in matches it)
                "trained_on_quantize": (tv.export_meta or {}).get("quantize", QuantConfig().to_json())}
        with open(os.path.join(tmp, "concepts.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # signals as exported (original JSON / CSV, keyed JSON)
        sig_dir = os.path.join(tmp, "signals")
        os.makedirs(sig_dir)
        index = os.path.join(protos_wd, "artifacts", SIGNALS_INDEX_FILE)  # the list files' concept index
        for p in sorted(glob.glob(os.path.join(protos_wd, "artifacts", "concept_signals*"))) + [index]:
            if os.path.isfile(p) and p.endswith((".json", ".csv")):
                shutil.copy2(p, sig_dir)
        for name in torch_export.FILES:  # concept_tokens.py, example.py: cgjax/torch_export/ as installed
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(torch_export.source(name))
    written = {"llava": os.path.join(out, "llava"), "clip": os.path.join(out, "clip", "open_clip_visual.pt"),
               "concepts": os.path.join(out, "concepts.pt"), "concepts_json": os.path.join(out, "concepts.json"),
               "signals": os.path.join(out, "signals"), "concept_tokens": os.path.join(out, "concept_tokens.py"),
               "example": os.path.join(out, "example.py")}
    written.update({f"prototypes_{d}": os.path.join(out, f"prototypes_{d}_trained.pt") for d in ps.dimensions})
    return written


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def copy_hf_checkpoint(src: str, dst: str) -> dict[str, str]:
    """The frozen HF base as it is: weight files hard-linked where ``dst`` is on the same file system
    (else copied and checked against the source's SHA-256), small files copied. Writes
    ``dst/SHA256SUMS`` (the weights' hashes, as ``sha256sum -c`` reads them); returns it as a dict."""
    os.makedirs(dst, exist_ok=True)
    sums = {}
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        name = os.path.basename(path)
        target = os.path.join(dst, name)
        want = _sha256(path)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
            if _sha256(target) != want:
                raise OSError(f"copy of {path} to {target} does not match the source's SHA-256")
        sums[name] = want
    for name in ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES):
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "SHA256SUMS"), "w", encoding="utf-8") as f:
        f.writelines(f"{h}  {n}\n" for n, h in sums.items())
    return sums


def write_values_pt(workdir: str, stage: str, step: int, values: np.ndarray, index: ConceptIndex,
                    gating: GatingConfig, llava_checkpoint: str, quant: QuantConfig | None = None) -> tuple[str, str]:
    """``concepts_stage{A,B}.pt`` in ``workdir`` (the original's ``{step: {"values": Tensor}}``,
    ``torch.load(weights_only=True)``) and ``concepts_stage{A,B}.json``, its metadata (dimensions,
    concept names, ranges, K_max, gating, base and how the base was quantized while they trained);
    both written atomically. Returns the two paths."""
    import torch  # optional [torch] extra

    base = persistence.join(workdir, f"concepts_stage{stage}")
    persistence.write_file(base + ".pt", lambda p: torch.save({int(step): {"values": torch.from_numpy(values)}}, p))
    meta = {"format": "cgjax.concept_values", "stage": stage, "step": int(step),
            **index.to_json(), "embed_dim": int(values.shape[-1]), "dtype": str(values.dtype),
            "gating": {"threshold": gating.threshold, "backoff_delta": gating.backoff_delta,
                       "topk_per_dim": gating.topk_per_dim, "max_concepts": gating.max_concepts,
                       "priority": [index.dims[i] for i in (gating.priority or ())]},
            "llava_checkpoint": persistence.resolve(llava_checkpoint),
            "quantize": (quant or QuantConfig()).to_json()}
    persistence.write_text(base + ".json", json.dumps(meta, indent=2))
    return base + ".pt", base + ".json"
