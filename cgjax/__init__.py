"""cgjax: concept-grounded vision-language models in JAX / Flax NNX."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
