"""The demo pipeline on the embedded, procedurally generated data set (no download).

Each step is a function (usable from Colab); ``run`` chains them. Real checkpoints are never
needed: the demo builds tiny random CLIP and LLaVA checkpoints with ``open_clip`` /
``transformers``, saves them to disk, and converts them, the same path a real checkpoint takes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
from PIL import Image

from cgjax import persistence
from cgjax.demo_assets import make_tiny_llava
from cgjax.config import load_config, override
from cgjax.data.demo_domains import get_domain
from cgjax.eval.cli import evaluate_reasoning
from cgjax.infer import run_inference
from cgjax.prototypes.run import train_prototypes as run_stage
from cgjax.quantize import QuantConfig
from cgjax.train import load_trained_model, train_stage
from converters import hf_llava, openclip
from converters.tiny_clip import make_openclip_checkpoint

# Tiny model sizes for the demo: small enough for 2 CPU cores, big enough to learn the task.
CLIP_DEMO = dict(width=128, layers=3, heads=4, patch=8, image_size=64, embed_dim=64, act="gelu")
LLAVA_DEMO = dict(
    vision_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=64, patch_size=16),
    text_overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
)

# Shares of the base pretraining's images asked the structured (JSON) prompt, and given no concept
# token (pretrain_base).
STRUCTURED_SHARE = 0.25
NO_CONCEPT_SHARE = 0.1


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(workdir: str, n_images: int = 240, size: int = 64, seed: int = 0, domain: str = "art") -> dict[str, str]:
    """Generate the demo data set of ``domain`` (``cgjax.data.demo_domains``) into ``workdir/data``."""
    return get_domain(domain).make(os.path.join(workdir, "data"), n_images=n_images, size=size, seed=seed)


def make_clip(workdir: str, seed: int = 0) -> str:
    """A tiny random open_clip model saved in the hub layout; returns its ``local-dir:`` name."""
    out = os.path.join(workdir, "checkpoints", "clip")
    name, _ = make_openclip_checkpoint(out, name="cgjax-demo-clip", seed=seed, **CLIP_DEMO)
    return f"local-dir:{os.path.join(out, name + '-hub')}"


def pretrain_clip(workdir: str, clip_name: str, seed: int = 0, n_images: int = 1536, epochs: int = 10,
                  size: int = 64, domain: str = "art") -> str:
    """Stand-in for a pretrained CLIP: a random tower sees colour, not layout, so genre (composition)
    is invisible to it. Like the base LLaVA, the tiny tower is therefore trained first, in PyTorch
    with open_clip (the demo's ``open_clip`` checkpoint is then converted as a user's would be), to
    name the artist, style and genre of ``n_images`` paintings rendered from a different seed: a
    corpus disjoint from the demo's own train/validation/test images. Writes a ``local-dir:``
    checkpoint under ``workdir/checkpoints/clip-pretrained`` and returns its name; ``epochs=0``
    returns ``clip_name`` unchanged. ``domain``: whose images and dimensions (art: paintings)."""
    if epochs <= 0:
        return clip_name
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1 to pretrain the CLIP tower, got {n_images}")

    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra
    from safetensors.torch import save_file  # optional [torch] extra


    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(clip_name)
    dom = get_domain(domain)
    corpus = [dom.render(i, seed + 10_000, size) for i in range(n_images)]
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image, _ in corpus])
    labels = [torch.tensor([names.index(lab[d]) for _, lab in corpus]) for d, names in zip(dom.dims, dom.classes)]
    dim = model.visual.output_dim
    heads = torch.nn.ModuleList([torch.nn.Linear(dim, len(names)) for names in dom.classes])
    opt = torch.optim.AdamW([*model.visual.parameters(), *heads.parameters()], lr=2e-3, weight_decay=0.1)
    batch = min(64, n_images)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_images)
        for start in range(0, n_images - batch + 1, batch):
            idx = order[start:start + batch]
            x = pixels[idx]
            x = torch.where((torch.rand(batch) < 0.5)[:, None, None, None], x.flip(-1), x)  # keeps the layout
            emb = model.encode_image(x)
            loss = sum(w * torch.nn.functional.cross_entropy(h(emb), y[idx])
                       for w, h, y in zip(dom.clip_loss_weights, heads, labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    src = clip_name.removeprefix("local-dir:")
    out = os.path.join(workdir, "checkpoints", "clip-pretrained", os.path.basename(src))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with persistence.atomic_dir(out) as tmp:
        shutil.copy2(os.path.join(src, "open_clip_config.json"), os.path.join(tmp, "open_clip_config.json"))
        save_file(state, os.path.join(tmp, "open_clip_model.safetensors"))
    _log(f"CLIP tower pretrained ({epochs} epochs on {n_images} {dom.noun}, last loss {loss.item():.3f})")
    return f"local-dir:{out}"


def make_llava(workdir: str, targets_csv: str, vocab_size: int = 1024, seed: int = 0) -> str:
    """A tiny random HF LLaVA with a locally trained tokenizer, saved with ``save_pretrained``."""
    return make_tiny_llava(os.path.join(workdir, "checkpoints", "llava-base"), targets_csv, vocab_size, seed,
                           **LLAVA_DEMO)


def check_conversion(clip_name: str, llava_dir: str) -> dict[str, float]:
    """Convert both checkpoints to cgjax and report the largest difference from PyTorch."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra
    import transformers  # optional [torch] extra


    clip = openclip.load(clip_name)
    torch_clip = open_clip.create_model(clip_name).eval()  # loads the weights of the local-dir folder
    x = np.random.default_rng(0).normal(size=(2, 3, *clip.model.config.image_size)).astype(np.float32)
    with torch.no_grad():
        want = torch_clip.encode_image(torch.tensor(x)).numpy()
    got = np.asarray(clip.model.encode_image(x))
    llava = hf_llava.load(llava_dir)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    cfg = llava.config
    ids = np.asarray([[1] + [cfg.image_token_id] * cfg.num_image_tokens + [5, 6, 7]], np.int64)
    px = np.random.default_rng(1).normal(size=(1, 3, *cfg.vision_config.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
    ours = np.asarray(llava(ids, px))
    return {"clip_max_abs_diff": float(np.abs(got - want).max()), "llava_max_abs_diff": float(np.abs(ours - ref).max())}


def train_prototypes(workdir: str, clip_name: str, paths: dict[str, str]) -> dict[str, Any]:
    """Prototype head on the demo set (configs/prototypes.py, preset demo) + signal export."""
    config = load_config("prototypes.py:preset=demo")
    config.preset = "custom"  # the data and the tower are given: nothing to generate
    config.clip.model_name = clip_name
    config.data.dataset_json = paths["dataset_json"]
    config.data.images_root = paths["images_root"]
    return run_stage(config, os.path.join(workdir, "prototypes"))


def stage_config(stage: str, llava_dir: str, paths: dict[str, str], signals: str, **overrides):
    """``configs/stage{A,B}.py:preset=demo`` pointed at the demo's own data, signals and checkpoint;
    ``overrides`` are dotted field names (``**{"optim.lr": 1e-3}``)."""
    config = load_config(f"stage{stage}.py:preset=demo")
    config.demo.generate_missing = False
    config.llava_checkpoint = llava_dir
    config.data.dataset_json = paths["dataset_json"]
    config.data.images_root = paths["images_root"]
    config.data.targets_csv = paths["targets_csv"]
    config.data.signals = (signals,)
    config.log.progress_bar = False
    return override(config, **overrides)


def pretrain_base(workdir: str, llava_dir: str, paths: dict[str, str], signals: str, steps: int,
                  structured_share: float = STRUCTURED_SHARE, no_concept_share: float = NO_CONCEPT_SHARE) -> str:
    """Stand-in for a pretrained VLM: a random LLaVA cannot follow prompts, so the demo first
    trains the whole tiny model (and throw-away concept values) on the Stage B targets with BLANK
    images. It learns the answer format, the label vocabulary and to read concept tokens, but
    nothing about the images themselves: the no-concept baseline stays at chance, and what the
    concept stages add is measurable. A pretrained VLM also follows the structured (JSON) inference
    prompt, which the original's stages never train on (they only train concept values on the
    Stage A/B prompts): so ``structured_share`` of the images are asked that prompt here and answer
    with the JSON of their keys and reason. And it answers without concept tokens, as the
    no-concept baseline asks it to: ``no_concept_share`` of the images get none (with blank images,
    it can only learn the answer format and a prior). Returns the pretrained HF checkpoint directory."""
    run_dir = os.path.join(workdir, "pretrain")
    config = stage_config("B", llava_dir, paths, signals, **{
        "trainable": (".*",), "num_steps": steps, "grad_accum": 1, "batch_size": 8, "optim.lr": 3e-3,
        "optim.weight_decay": 0.0, "optim.clip_norm": 1.0, "optim.schedule": "warmup_cosine",
        "optim.warmup_updates": 20, "data.blank_images": True, "loss.reg_lambda": 0.0, "loss.w_reason": 0.5,
        "gating.threshold": 0.0, "gating.backoff_delta": 0.0, "val.at_end": False, "val.every_steps": 0,
        "checkpoint.every_steps": steps, "checkpoint.keep_best": 0, "init_from": "", "export.pt": False,
        "text.structured_share": structured_share, "data.no_concept_share": no_concept_share,
    })
    train_stage(config, run_dir)
    out = os.path.join(workdir, "checkpoints", "llava-pretrained")
    hf_llava.save(load_trained_model(config, run_dir).llava, out, tokenizer_from=llava_dir)
    return out


def train_concepts(workdir: str, llava_dir: str, paths: dict[str, str], signals: str, steps: int,
                   quant: QuantConfig = QuantConfig()) -> dict[str, Any]:
    """Stage A (keys) then Stage B (keys + reason, from Stage A's final checkpoint): values only,
    on the base quantized as ``quant`` says."""
    stage_a = os.path.join(workdir, "stageA")
    q = {"quantize": quant.mode, "quantize_group_size": quant.group_size, "quantize_activations": quant.activations}
    a = train_stage(stage_config("A", llava_dir, paths, signals, num_steps=steps,
                                 **{"val.no_concept_baseline": True}, **q), stage_a)
    b = train_stage(stage_config("B", llava_dir, paths, signals, num_steps=steps, init_from=stage_a,
                                 **{"val.no_concept_baseline": True}, **q), os.path.join(workdir, "stageB"))
    pick = lambda r: {k: round(float(v), 4) for k, v in r.items() if k.startswith("val_") and "acc" in k}  # noqa: E731
    return {"stageA": pick(a), "stageB": pick(b), "stageB_pt": b.get("pt")}


def evaluate(workdir: str, llava_dir: str, paths: dict[str, str], n_images: int = 0,
             quant: QuantConfig = QuantConfig()) -> dict[str, Any]:
    """Inference on the test split (concept model and no-concept baseline, with saliency), then
    metrics and the HTML report in ``workdir/eval``."""
    config = load_config("infer.py:preset=demo")
    config.quantize, config.quantize_group_size = quant.mode, quant.group_size
    config.quantize_activations = quant.activations
    config.workdir = workdir  # the preset's paths follow the demo layout under workdir
    config.llava_checkpoint = llava_dir
    config.prompt.mode = "stageB,structured"
    config.data.limit = n_images
    out = run_inference(config)
    eval_dir = os.path.join(workdir, "eval")
    metrics = evaluate_reasoning(out["reasoning"], paths["dataset_json"], os.path.join(eval_dir, "metrics.json"),
                                 baseline_json=out["reasoning_baseline"], targets_csv=paths["targets_csv"],
                                 report_dir=eval_dir, saliency_json=out.get("saliency") or None)
    keys = metrics.get("keys", {})
    return {"report": os.path.join(eval_dir, "report.html"), "keys_macro_f1": keys.get("macro_f1"),
            "comparison": metrics.get("comparison", {}).get("keys", {}).get("macro_f1"),
            "structured_json_parse_rate": metrics.get("structured", {}).get("json_parse_rate")}


def run(workdir: str, n_images: int = 240, image_size: int = 64, seed: int = 0, pretrain_steps: int = 300,
        stage_steps: int = 64, eval_images: int = 0, clip_pretrain_epochs: int = 10,
        clip_pretrain_images: int = 1536, quant: QuantConfig = QuantConfig(), domain: str = "art") -> dict[str, Any]:
    """The whole demo: data -> checkpoints -> (the stages available in this build). ``quant``: Stage
    A/B and inference on the pretrained base quantized (the pretraining itself is full precision).
    ``domain``: the concept domain (``art`` or ``birds``, ``cgjax.data.demo_domains``)."""
    noun = get_domain(domain).noun
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "domain": domain}
    _log("generating the demo data set")
    paths = make_data(workdir, n_images=n_images, size=image_size, seed=seed, domain=domain)
    summary["data"] = paths
    _log(f"data: {paths['dataset_json']}")
    _log("building tiny CLIP and LLaVA checkpoints with open_clip / transformers")
    clip_name = make_clip(workdir, seed=seed)
    if clip_pretrain_epochs > 0:
        _log(f"pretraining the tiny CLIP tower ({clip_pretrain_epochs} epochs on {clip_pretrain_images} other "
             f"{noun}: a stand-in for a pretrained CLIP)")
    clip_name = pretrain_clip(workdir, clip_name, seed=seed, n_images=clip_pretrain_images,
                              epochs=clip_pretrain_epochs, size=image_size, domain=domain)
    llava_dir = make_llava(workdir, paths["targets_csv"], seed=seed)
    summary["clip_model"], summary["llava_checkpoint"] = clip_name, llava_dir
    _log("converting them to cgjax and checking against PyTorch")
    summary["conversion"] = check_conversion(clip_name, llava_dir)
    _log(f"conversion: {summary['conversion']}")
    _log("training concept prototypes and exporting signals")
    protos = train_prototypes(workdir, clip_name, paths)
    summary["prototypes"] = {"val": protos.get("val"), "artifacts": protos.get("artifacts")}
    _log(f"prototype validation accuracy: {json.dumps(protos.get('val'))}")
    signals = protos["artifacts"]["signals"]["keyed"]
    _log(f"pretraining the tiny base LLaVA ({pretrain_steps} steps, blank images: a stand-in for a pretrained VLM)")
    base = pretrain_base(workdir, llava_dir, paths, signals, pretrain_steps)
    _log(f"Stage A then Stage B ({stage_steps} steps each; only the concept values train)")
    summary["quantize"] = quant.to_json()
    summary["stages"] = train_concepts(workdir, base, paths, signals, stage_steps, quant)
    _log(f"validation: {json.dumps(summary['stages'])}")
    _log("inference on the test split (concept model and no-concept baseline), metrics and report")
    summary["eval"] = evaluate(workdir, base, paths, n_images=eval_images, quant=quant)
    _log(f"report: {summary['eval']['report']}; keys macro-F1: {json.dumps(summary['eval']['keys_macro_f1'])}; "
         f"structured answers parsed as JSON: {summary['eval']['structured_json_parse_rate']}")
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _log(f"done in {summary['seconds']} s; summary in {os.path.join(workdir, 'demo_summary.json')}")
    return summary
