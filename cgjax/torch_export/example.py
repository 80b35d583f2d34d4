"""Answer images with the exported LLaVA + gated concept tokens (PyTorch / HF only).

    python example.py IMAGE [IMAGE ...] [--scores scores.json] [--prompt "..."] [--load-in 8bit|4bit]

Scores: a JSON ``{image_path: [s_0, ..., s_{N-1}]}`` in concepts.json's global concept order (for
example from the prototype head: CLIP tower + prototypes_<dim>_trained.pt); default: no concepts
selected except those you give.

``--load-in 8bit`` / ``4bit`` loads the (unquantized, exported) base in 8 or 4 bits with
``bitsandbytes`` (not required otherwise; a CUDA GPU for bitsandbytes' kernels), the way the
original project ran LLaVA-7B on one GPU. concepts.json's ``trained_on_quantize`` says how cgjax held
the base while the values trained.
"""
import argparse
import importlib.util
import json
import os

import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor,
                          LlavaForConditionalGeneration)

if __package__:  # imported from cgjax (cgjax.torch_export.example)
    from .concept_tokens import ConceptTokens, generate_with_concepts
else:  # the export folder: python example.py, concept_tokens.py beside it
    from concept_tokens import ConceptTokens, generate_with_concepts

HERE = os.path.dirname(os.path.abspath(__file__))


def quantization_kwargs(load_in):
    """``from_pretrained`` keyword arguments that load the base in 8 or 4 bits (bitsandbytes)."""
    if load_in is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit(f"--load-in {load_in} needs bitsandbytes: pip install bitsandbytes")

    if load_in == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "auto"}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16),
            "device_map": "auto"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("images", nargs="+")
    p.add_argument("--scores", default=None)
    p.add_argument("--prompt", default="You are an art expert. Output exactly three lines: 'artist: ...', "
                   "'style: ...', 'genre: ...'. No additional text. If uncertain, use 'Unknown'.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--load-in", choices=("8bit", "4bit"), default=None,
                   help="load the base quantized with bitsandbytes (pip install bitsandbytes)")
    a = p.parse_args()
    llava_dir = os.path.join(HERE, "llava")
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, **quantization_kwargs(a.load_in)).eval()
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
