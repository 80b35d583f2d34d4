"""The PyTorch files ``cgjax.export`` ships beside the exported model (plain PyTorch / HF, no cgjax).

- ``concept_tokens``: the gating rule, the concept tokens and greedy decoding on a HF
  ``LlavaForConditionalGeneration`` (``ConceptTokens``, ``generate_with_concepts``).
- ``example``: a command line answering images with the exported folder.

They import torch (and transformers) at their top and nothing of cgjax: this package's
``__init__`` imports neither, so listing or reading them needs no PyTorch. ``export()`` copies them
as they are (``FILES``; ``source(name)`` reads one).
"""
from __future__ import annotations

import importlib.resources

FILES = ("concept_tokens.py", "example.py")


def source(name: str) -> bytes:
    """The bytes of one of ``FILES`` as installed with cgjax."""
    if name not in FILES:
        raise ValueError(f"{name!r} is not one of the exported PyTorch files {FILES}")
    return importlib.resources.files(__name__).joinpath(name).read_bytes()


__all__ = ["FILES", "source"]
