"""Back to PyTorch: a finished work dir -> files the original (PyTorch / HF) world loads.

``export(workdir, out)`` (``python scripts/export.py --workdir DIR --out OUT``) writes::

    OUT/llava/                         HF LLaVA dir of the base checkpoint the stages used
                                       (``LlavaForConditionalGeneration.from_pretrained`` + tokenizer)
    OUT/clip/open_clip_visual.pt       the prototypes' CLIP image tower as an open_clip state dict
                                       (``visual.*``; ``load_state_dict(sd, strict=False)``)
    OUT/prototypes_<dim>_trained.pt    the original's prototype payload, one file per dimension
    OUT/concepts.pt                    the original's concept checkpoint ``{step: {"values": [N, K, D]}}``
    OUT/concepts.json                  dims, names, ranges, k_max, gating options, source
    OUT/signals/                       the exported signals (original JSON / CSV, keyed JSON)
    OUT/concept_tokens.py              self-contained PyTorch gating + concept tokens + greedy decoding
    OUT/example.py                     how to use it on the exported HF LLaVA

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

from cgjax import infer, persistence, provenance
from cgjax.concepts.gating import GatingConfig
from cgjax.concepts.index import ConceptIndex, gating_config_from_fields
from cgjax.preprocess import llava_preprocess_config
from cgjax.prototypes import io as pio
from converters import hf_llava, openclip
from converters.hf_llava import TOKENIZER_FILES

__all__ = ["export", "find_stage_workdir", "CONCEPT_TOKENS_SOURCE", "EXAMPLE_SOURCE"]


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
                "source": os.path.abspath(tv.directory)}
        with open(os.path.join(tmp, "concepts.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # signals as exported (original JSON / CSV, keyed JSON)
        sig_dir = os.path.join(tmp, "signals")
        os.makedirs(sig_dir)
        for p in sorted(glob.glob(os.path.join(protos_wd, "artifacts", "concept_signals*"))):
            if os.path.isfile(p) and p.endswith((".json", ".csv")):
                shutil.copy2(p, sig_dir)
        with open(os.path.join(tmp, "concept_tokens.py"), "w") as f:
            f.write(CONCEPT_TOKENS_SOURCE)
        with open(os.path.join(tmp, "example.py"), "w") as f:
            f.write(EXAMPLE_SOURCE)
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


CONCEPT_TOKENS_SOURCE = r'''"""Gated concept tokens for a HF ``LlavaForConditionalGeneration`` (exported by cgjax; PyTorch only).

    values = torch.load("concepts.pt", weights_only=True)  # {step: {"values": [N, K_max, D]}}
    meta = json.load(open("concepts.json"))
    ct = ConceptTokens(next(iter(values.values()))["values"], meta)
    ids = generate_with_concepts(hf_model, tokenizer, pixel_values, prompt, scores, 64, concept_tokens=ct)

Gating (per sample, ``scores [n_concepts]`` = the ``s`` of each concept): per dimension keep the
concepts with ``s >= threshold`` by score (ties: lower index first); if none, back off to the best
one if ``s >= threshold - backoff_delta``; cut to ``topk_per_dim``. With ``max_concepts > 0`` the
dimensions in ``priority`` order each get their top-1 while the budget lasts, the remaining
candidates fill it by score. Each selected concept adds ``k = max(1, ceil(clip(s, 0, 1) * K_max))``
value tokens, each L2-normalised and rescaled to the norm of the first image token. The image block
at ``<image>`` is ``[image features | concept tokens]`` in dimension order, best first.
"""
import inspect
import math

import torch

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class ConceptTokens(torch.nn.Module):
    """``values [n_concepts, K_max, D]`` + the gating options of ``concepts.json``."""

    def __init__(self, values, gating):
        super().__init__()
        self.register_buffer("values", torch.as_tensor(values, dtype=torch.float32))
        g = dict(gating.get("gating", gating))
        dims = list(gating.get("dims", g.get("dims", [])))
        ranges = gating.get("dim_ranges", g.get("dim_ranges"))
        if isinstance(ranges, dict):
            ranges = [ranges[d] for d in dims]
        self.dim_ranges = [(int(a), int(b)) for a, b in ranges]
        if not dims:
            dims = [str(i) for i in range(len(self.dim_ranges))]
        self.dims = dims
        self.k_max = int(g.get("k_max", gating.get("k_max", self.values.shape[1])))
        self.threshold = float(g.get("threshold", 0.75))
        self.backoff_delta = float(g.get("backoff_delta", 0.05))
        self.topk_per_dim = int(g.get("topk_per_dim", 2))
        self.max_concepts = int(g.get("max_concepts", 3))
        pri = g.get("priority") or dims
        if isinstance(pri, str):
            pri = [p.strip() for p in pri.split(",") if p.strip()]
        self.priority = [dims.index(p) if isinstance(p, str) else int(p) for p in pri if not isinstance(p, str) or p in dims]

    def select(self, scores):
        """``scores [n_concepts]`` -> ``[(global concept index, s, k), ...]`` in block order."""
        s = [float(x) for x in torch.as_tensor(scores, dtype=torch.float32).tolist()]
        per_dim = []
        for a, b in self.dim_ranges:
            order = sorted(range(a, b), key=lambda i: (-s[i], i))
            cand = [i for i in order if s[i] >= self.threshold]
            if not cand and self.backoff_delta > 0 and s[order[0]] >= max(0.0, self.threshold - self.backoff_delta):
                cand = [order[0]]
            if self.topk_per_dim > 0:
                cand = cand[: self.topk_per_dim]
            per_dim.append(cand)
        if self.max_concepts > 0:
            chosen = [[] for _ in per_dim]
            used = 0
            for d in self.priority:
                if per_dim[d] and used < self.max_concepts:
                    chosen[d].append(per_dim[d][0])
                    used += 1
            pool = [(i, d) for d, cand in enumerate(per_dim) for i in cand if i not in chosen[d]]
            pool.sort(key=lambda t: -s[t[0]])  # stable: dimension order, then rank, on ties
            for i, d in pool[: max(0, self.max_concepts - used)]:
                chosen[d].append(i)
            per_dim = [[i for i in cand if i in ch] for cand, ch in zip(per_dim, chosen)]
        out = []
        for cand in per_dim:
            for i in cand:
                g = min(1.0, max(0.0, s[i]))
                k = max(1, int(math.ceil(float(torch.tensor(g, dtype=torch.float32) * self.k_max))))
                out.append((i, s[i], k))
        return out

    def forward(self, scores, image_features):
        """Concept tokens ``[n, D]`` of one sample (``image_features [T_img, D]``)."""
        sel = self.select(scores)
        if not sel:
            return image_features.new_zeros((0, image_features.shape[-1]))
        tok = torch.cat([self.values[i, :k] for i, _, k in sel], dim=0)
        tok = tok / tok.norm(dim=-1, keepdim=True)
        ref = image_features[0].float().norm()
        return (tok * ref).to(image_features.dtype)


def prompt_ids(tokenizer, prompt):
    """Token ids before and after ``<image>`` of the llava_v1 conversation (as the original)."""
    def ids(text, bos):
        out = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if out and out[0] == tokenizer.bos_token_id and not bos:
            out = out[1:]
        if out and out[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
            out = out[:-1]
        return out
    return ids(f"{SYSTEM} USER: ", True), ids(f"\n{prompt} ASSISTANT:", False)


def image_features(hf_model, pixel_values):
    """Projected image features ``[B, T_img, D]`` of a HF LLaVA."""
    cfg = hf_model.config
    out = hf_model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                      vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


def _cache_kwargs(hf_model, out):
    """The KV cache of ``out`` under the keyword this transformers version takes (cache / past_key_values)."""
    params = inspect.signature(hf_model.forward).parameters
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


@torch.no_grad()
def generate_with_concepts(hf_model, tokenizer, pixel_values, prompt, scores, max_new_tokens=64, *,
                           concept_tokens=None, use_concepts=True):
    """Greedy answer token ids per image (a list of lists, stopping after EOS).

    ``pixel_values [B, 3, H, W]``, ``scores [B, n_concepts]``; ``concept_tokens``: a :class:`ConceptTokens`.
    Each sample runs on its own (no padding): embeddings of the prompt with ``[image features |
    concept tokens]`` at ``<image>``, then KV-cached greedy decoding with the HF model."""
    hf_model.eval()
    before, after = prompt_ids(tokenizer, prompt)
    emb = hf_model.get_input_embeddings()
    feats = image_features(hf_model, pixel_values)
    eos = tokenizer.eos_token_id
    answers = []
    for b in range(feats.shape[0]):
        block = feats[b]
        if use_concepts and concept_tokens is not None:
            block = torch.cat([block, concept_tokens(scores[b], feats[b])], dim=0)
        x = torch.cat([emb(torch.tensor([before])), block[None].to(emb.weight.dtype), emb(torch.tensor([after]))], 1)
        out = hf_model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), use_cache=True)
        n, ids = x.shape[1], []
        while True:
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos or len(ids) >= max_new_tokens:
                break
            n += 1
            out = hf_model(input_ids=torch.tensor([[nxt]]), attention_mask=torch.ones((1, n), dtype=torch.long),
                           use_cache=True, **_cache_kwargs(hf_model, out))
        answers.append(ids)
    return answers
'''


EXAMPLE_SOURCE = r'''"""Answer images with the exported LLaVA + gated concept tokens (PyTorch / HF only).

    python example.py IMAGE [IMAGE ...] [--scores scores.json] [--prompt "..."]

Scores: a JSON ``{image_path: [s_0, ..., s_{N-1}]}`` in concepts.json's global concept order (for
example from the prototype head: CLIP tower + prototypes_<dim>_trained.pt); default: no concepts
selected except those you give.
"""
import argparse
import json
import os

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

from concept_tokens import ConceptTokens, generate_with_concepts

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("images", nargs="+")
    p.add_argument("--scores", default=None)
    p.add_argument("--prompt", default="You are an art expert. Output exactly three lines: 'artist: ...', "
                   "'style: ...', 'genre: ...'. No additional text. If uncertain, use 'Unknown'.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    llava_dir = os.path.join(HERE, "llava")
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    tok = AutoTokenizer.from_pretrained(llava_dir)
    try:
        proc = AutoImageProcessor.from_pretrained(llava_dir)
    except Exception:  # no preprocessor_config.json: CLIP preprocessing at the tower size
        size = model.config.vision_config.image_size
        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    meta = json.load(open(os.path.join(HERE, "concepts.json")))
    ckpt = torch.load(os.path.join(HERE, "concepts.pt"), weights_only=True)
    ct = ConceptTokens(ckpt[max(ckpt)]["values"], meta)
    given = json.load(open(a.scores)) if a.scores else {}
    scores = torch.tensor([given.get(path, [0.0] * meta["n_concepts"]) for path in a.images], dtype=torch.float32)
    px = proc(images=[Image.open(x).convert("RGB") for x in a.images], return_tensors="pt")["pixel_values"]
    for path, s, ids in zip(a.images, scores, generate_with_concepts(model, tok, px, a.prompt, scores,
                                                                      a.max_new_tokens, concept_tokens=ct)):
        names = [n for d in meta["dims"] for n in meta["names"][d]]
        print(path, [names[i] for i, _, _ in ct.select(s)])
        print(tok.decode(ids, skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
'''


def write_values_pt(workdir: str, stage: str, step: int, values: np.ndarray, index: ConceptIndex,
                    gating: GatingConfig, llava_checkpoint: str) -> tuple[str, str]:
    """``concepts_stage{A,B}.pt`` in ``workdir`` (the original's ``{step: {"values": Tensor}}``,
    ``torch.load(weights_only=True)``) and ``concepts_stage{A,B}.json``, its metadata (dimensions,
    concept names, ranges, K_max, gating, base); both written atomically. Returns the two paths."""
    import torch  # optional [torch] extra

    base = persistence.join(workdir, f"concepts_stage{stage}")
    persistence.write_file(base + ".pt", lambda p: torch.save({int(step): {"values": torch.from_numpy(values)}}, p))
    meta = {"format": "cgjax.concept_values", "stage": stage, "step": int(step),
            **index.to_json(), "embed_dim": int(values.shape[-1]), "dtype": str(values.dtype),
            "gating": {"threshold": gating.threshold, "backoff_delta": gating.backoff_delta,
                       "topk_per_dim": gating.topk_per_dim, "max_concepts": gating.max_concepts,
                       "priority": [index.dims[i] for i in (gating.priority or ())]},
            "llava_checkpoint": persistence.resolve(llava_checkpoint)}
    persistence.write_text(base + ".json", json.dumps(meta, indent=2))
    return base + ".pt", base + ".json"
