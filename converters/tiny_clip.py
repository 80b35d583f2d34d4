"""Tiny random open_clip models saved as real checkpoints (tests, demo, benchmarks)."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

from cgjax import persistence



def tiny_model_cfg(width: int = 64, layers: int = 2, heads: int = 4, patch: int = 8, image_size: int = 32,
                   embed_dim: int = 32, act: str = "quick_gelu", **vision_extra) -> dict:
    """An open_clip ``model_cfg`` for a tiny ViT CLIP (text tower tiny as well)."""
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {act!r}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": width // heads,
                       "patch_size": patch, **vision_extra},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def make_openclip_checkpoint(out_dir: str, width: int = 64, layers: int = 2, heads: int = 4, patch: int = 8,
                             image_size: int = 32, embed_dim: int = 32, act: str = "quick_gelu", seed: int = 0,
                             name: str | None = None, **vision_extra) -> tuple[str, str]:
    """Register a tiny config with open_clip (``add_model_config``), build a random model and
    save it. Writes into ``out_dir``:

    * ``<name>.json`` (the registered config), ``<name>.pt`` (full CLIP state dict, returned);
    * ``<name>-hub/`` with ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
      ``open_clip_model.safetensors``: load it as ``local-dir:<out_dir>/<name>-hub``.

    Parameters that open_clip initialises to constants (LayerNorm, biases) are randomised too,
    so a parity test cannot pass by accident. Returns ``(model_name, checkpoint_path)``."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra
    from safetensors.torch import save_file  # optional [torch] extra

    name = name or f"tiny-clip-w{width}-l{layers}-h{heads}-p{patch}-i{image_size}-e{embed_dim}-{act}-s{seed}"
    cfg = tiny_model_cfg(width, layers, heads, patch, image_size, embed_dim, act, **vision_extra)
    os.makedirs(out_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(cfg_path)

    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.visual.named_parameters():
            if p.ndim == 1 or pname.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    ckpt = os.path.join(out_dir, f"{name}.pt")
    torch.save(sd, ckpt)


    pp = dict(model.visual.preprocess_cfg)
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    with persistence.atomic_dir(os.path.join(out_dir, f"{name}-hub")) as tmp:
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": pp}, f, indent=2)
        save_file(sd, os.path.join(tmp, "open_clip_model.safetensors"))
    return name, ckpt


_CACHE_DIR: list[str] = []
_CACHED: dict[tuple, tuple[str, str]] = {}


def cached_openclip_checkpoint(**kwargs) -> tuple[str, str]:
    """:func:`make_openclip_checkpoint` once per process and argument set (session fixtures of
    several test modules share it), in a temporary directory removed at exit."""
    key = tuple(sorted(kwargs.items()))
    if key not in _CACHED:
        if not _CACHE_DIR:
            d = tempfile.mkdtemp(prefix="cgjax-tiny-clip-")
            atexit.register(shutil.rmtree, d, True)
            _CACHE_DIR.append(d)
        _CACHED[key] = make_openclip_checkpoint(_CACHE_DIR[0], **kwargs)
    return _CACHED[key]


if __name__ == "__main__":
    print(make_openclip_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "tiny_clip"))
