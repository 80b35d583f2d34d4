"""The global concept index: dimensions in order, each a contiguous range of concept ids, and
the gating configuration built on it (shared by training, inference, export and the planner)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging

from cgjax.concepts import gating

__all__ = ["ConceptIndex", "concept_index_from_vocabs", "gating_config"]


@dataclasses.dataclass(frozen=True)
class ConceptIndex:
    """The global concept indexing: dimension after dimension, each a contiguous range."""

    dims: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    k_max: int

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return gating.dim_ranges_from_sizes([len(n) for n in self.names])

    @property
    def n_concepts(self) -> int:
        return sum(len(n) for n in self.names)

    def to_json(self) -> dict:
        return {"dims": list(self.dims), "names": {d: list(n) for d, n in zip(self.dims, self.names)},
                "dim_ranges": {d: list(r) for d, r in zip(self.dims, self.ranges)}, "k_max": self.k_max,
                "n_concepts": self.n_concepts}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ConceptIndex":
        dims = tuple(obj["dims"])
        return cls(dims, tuple(tuple(obj["names"][d]) for d in dims), int(obj["k_max"]))


def concept_index_from_vocabs(signal_vocabs: Mapping[str, Any], dimensions: Sequence[str], k_max: int) -> ConceptIndex:
    """Dimensions in ``dimensions`` order (then any other signal dimension), names from the vocabularies."""
    if not signal_vocabs:
        raise ValueError("the data set has no concept signals (config.data.signals): nothing to gate on")
    dims = [d for d in dimensions if d in signal_vocabs] + [d for d in signal_vocabs if d not in dimensions]
    empty = [d for d in dims if len(signal_vocabs[d]) == 0]
    if empty:
        raise ValueError(f"signals of dimension(s) {empty} have no concepts")
    return ConceptIndex(tuple(dims), tuple(tuple(signal_vocabs[d].names) for d in dims), int(k_max))


def gating_config(config, index: ConceptIndex) -> gating.GatingConfig:
    g = config.gating
    pri = [p.strip() for p in str(g.priority or "").split(",") if p.strip()]
    unknown = [p for p in pri if p not in index.dims]
    if unknown and ",".join(pri) != DEFAULT_GATING["priority"]:  # the art default on other dims: their order
        logging.warning("gating.priority names %s, not dimensions of the signals %s; ignored", unknown, index.dims)
    order = tuple(index.dims.index(p) for p in pri if p in index.dims)
    if pri and not order:  # names none of the data's dimensions (the art default on birds): their own order
        order = tuple(range(len(index.dims)))
    return gating.GatingConfig(dim_ranges=index.ranges, k_max=int(g.k_max), threshold=float(g.threshold),
                               backoff_delta=float(g.backoff_delta), topk_per_dim=int(g.topk_per_dim),
                               max_concepts=int(g.max_concepts), priority=order or None)


DEFAULT_GATING = {"threshold": 0.75, "backoff_delta": 0.05, "topk_per_dim": 2, "max_concepts": 3,
                  "priority": "artist,style,genre"}


def gating_config_from_fields(index: ConceptIndex, gating_fields: Mapping[str, Any]) -> gating.GatingConfig:
    """The gating of trained values from the fields saved with them (``concepts_stage*.json``'s
    ``gating``), :data:`DEFAULT_GATING` for the missing ones; ``k_max`` must be the index's."""
    g = dict(DEFAULT_GATING)
    g.update({k: v for k, v in dict(gating_fields).items() if v is not None})
    pri = g["priority"]
    g["priority"] = ",".join(pri) if isinstance(pri, (list, tuple)) else str(pri or "")
    if int(g.get("k_max", index.k_max)) != index.k_max:
        raise ValueError(f"gating.k_max={g['k_max']} but the trained values have K_max {index.k_max}")
    g["k_max"] = index.k_max
    cfg = ml_collections.ConfigDict({"gating": {k: g[k] for k in ("k_max", "threshold", "backoff_delta",
                                                                   "topk_per_dim", "max_concepts", "priority")}})
    return gating_config(cfg, index)
