"""Answer images with the exported LLaVA + gated concept tokens (PyTorch / HF only).

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

if __package__:  # imported from cgjax (cgjax.torch_export.example)
    from .concept_tokens import ConceptTokens, generate_with_concepts
else:  # the export folder: python example.py, concept_tokens.py beside it
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
