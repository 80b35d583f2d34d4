"""Random LLaVA checkpoints built locally with ``transformers`` (tests and benchmarks).

``make_llava_checkpoint(out_dir, size="tiny")`` writes what ``save_pretrained`` writes
(``config.json``, ``model.safetensors``, ``generation_config.json``) for a random
``LlavaForConditionalGeneration``. Sizes:

* ``tiny`` (tests): CLIP 32 wide / 2 layers / 32 px / patch 8 / 4 heads; LLaMA 64 wide /
  2 layers / 4 heads / 2 KV heads (GQA) / FFN 128 / vocab 128; image token id 127.
* ``small`` (benchmarks): CLIP 256 wide / 4 layers / 224 px / patch 16 / 4 heads; LLaMA
  512 wide / 6 layers / 8 heads / FFN 1376 / vocab 32064; image token id 32000.
"""
from __future__ import annotations

import argparse
import os

from cgjax import persistence

SIZES = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
        image_token_id=127,
    ),
    "small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=224, patch_size=16),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064),
        image_token_id=32000,
    ),
}


def make_llava_model(size: str = "tiny", seed: int = 0, *, vocab_size: int | None = None,
                     image_size: int | None = None, image_token_id: int | None = None,
                     tie_word_embeddings: bool = False, vision_feature_layer: int = -2,
                     vision_feature_select_strategy: str = "default", text_overrides: dict | None = None,
                     vision_overrides: dict | None = None, dtype=None):
    """A random ``LlavaForConditionalGeneration`` (eval mode); see the module docstring."""
    import torch  # optional [torch] extra
    import transformers  # optional [torch] extra

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    vision = dict(spec["vision"], **(vision_overrides or {}))
    text = dict(spec["text"], **(text_overrides or {}))
    if image_size is not None:
        vision["image_size"] = image_size
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    tok = image_token_id if image_token_id is not None else min(spec["image_token_id"], text["vocab_size"] - 1)
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision),
        text_config=transformers.LlamaConfig(tie_word_embeddings=tie_word_embeddings, pad_token_id=0, **text),
        image_token_id=tok,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=n_patches if vision_feature_select_strategy == "default" else n_patches + 1,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 / biases at 0: perturb so tests can fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model


def make_llava_checkpoint(out_dir: str, size: str = "tiny", seed: int = 0, *, vocab_size: int | None = None,
                          image_size: int | None = None, max_shard_size: str | None = None, **kwargs) -> str:
    """Build a random LLaVA (see :func:`make_llava_model`) and ``save_pretrained`` it to
    ``out_dir`` (written to a temporary folder and renamed). Returns ``out_dir``."""
    model = make_llava_model(size, seed, vocab_size=vocab_size, image_size=image_size, **kwargs)

    out_dir = os.path.abspath(out_dir)
    with persistence.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    return out_dir


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_llava_checkpoint(a.out_dir, a.size, a.seed))
