"""cgjax: concept-grounded vision-language models in JAX / Flax NNX.

``cgjax.generate(model, ...)`` and ``cgjax.Generator(model)`` are the generation entry points:
``cgjax.generate`` is the submodule, made callable (see :mod:`cgjax.generate`).
"""
from cgjax import generate
from cgjax.generate import Generator

__version__ = "0.1.0"
SCHEMA_VERSION = 1

__all__ = ["Generator", "generate", "SCHEMA_VERSION", "__version__"]
