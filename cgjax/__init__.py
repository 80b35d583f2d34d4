"""cgjax: concept-grounded vision-language models in JAX / Flax NNX."""
from cgjax.generate import Generator, generate


__version__ = "0.1.0"
SCHEMA_VERSION = 1


def __getattr__(name):  # lazy exports: `import cgjax` stays light
    if name == "generate":  # cgjax.generate(...) (the submodule is callable too, see cgjax/generate.py)

        return generate
    if name == "Generator":
        return Generator
    raise AttributeError(f"module 'cgjax' has no attribute {name!r}")
