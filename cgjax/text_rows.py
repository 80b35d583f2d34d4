"""Training rows: one record -> token ids, labels, segment ids and signals of fixed length
(``TextRows``, a grain map), and the batch collation (``Collate``)."""
from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from cgjax import text
from cgjax.data.schema import UNKNOWN
from cgjax.losses import IGNORE_INDEX

__all__ = ["parse_key_lines", "structured_target", "in_share", "TextRows", "Collate", "HOST_KEYS"]

_TOKENIZER_LOCK = threading.Lock()  # HF fast tokenizers are not safe to share across grain threads


def parse_key_lines(s: str, dims: Sequence[str]) -> dict[str, str]:
    """``name: value`` lines -> ``{dim: value}`` (first line per dimension, case-insensitive name)."""
    out: dict[str, str] = {}
    lower = {d.lower(): d for d in dims}
    for line in str(s).replace("\r\n", "\n").split("\n"):
        key, sep, value = line.partition(":")
        d = lower.get(key.strip().lower())
        if sep and d is not None and d not in out:
            out[d] = value.strip()
    return out


def structured_target(values: Mapping[str, str], dims: Sequence[str], reason: str,
                      sentinels: tuple[str, str] = ("<BEGIN_JSON>", "<END_JSON>")) -> tuple[str, str]:
    """The answer to the structured prompt as ``(keys part, evidence part)``: joined by ``\n`` (as
    ``text.encode`` joins keys and reason) they are ``<BEGIN_JSON>{"artist": ..., ...,\n"evidence":
    ...}<END_JSON>``, one JSON object; a missing value is ``Unknown``."""
    start, end = sentinels
    keys = ", ".join(f"{json.dumps(d)}: {json.dumps(values.get(d) or 'Unknown', ensure_ascii=False)}" for d in dims)
    return f"{start}{{{keys},", f'"evidence": {json.dumps(reason, ensure_ascii=False)}}}{end}'


def in_share(image_path: str, seed: int, share: float, what: str) -> bool:
    """Whether an image is in the ``share`` picked for ``what`` (``structured``, ``no_concepts``):
    ``md5("path|seed|what")`` mapped to [0, 1) is below ``share`` (independent draws per ``what``)."""
    return share > 0 and text.md5_unit(f"{image_path}|{seed}|{what}") < share


@dataclasses.dataclass(frozen=True)
class TextRows:
    """grain ``element_fn``: a decoded element -> fixed-length token row + concept scores."""

    tokenizer: Any
    stage: str
    n_image_block: int
    image_token_id: int
    length: int
    concept_dims: tuple[str, ...]
    label_dims: tuple[str, ...]
    label_names: tuple[tuple[str, ...], ...]
    prompt_seed: int
    max_reason_tokens: int
    add_eos: bool
    with_prompt: bool = False  # also the left-padded inference prompt (validation)
    n_head: int = -1  # expected position of the first image token (checked when >= 0)
    max_targets: int = 0  # > 0: at most this many supervised tokens per row (checked)
    blank_images: bool = False  # zero pixels: the image carries no information (demo base pretraining)
    # this share of the images (in_share) is asked ``structured_prompt`` instead and answers
    # with ``structured_target`` (the demo's base pretraining: a base that follows the JSON prompt)
    structured_share: float = 0.0
    structured_prompt: str = ""
    sentinels: tuple[str, str] = ("<BEGIN_JSON>", "<END_JSON>")
    # this share of the images gets no concept token (scores -1: no gating threshold passes), as the
    # no-concept baseline answers (the demo's base pretraining)
    no_concept_share: float = 0.0

    def _labels(self, ex) -> list[str]:
        """The label strings the original hashed for the Stage B prompt (its targets CSV columns,
        ``Unknown Genre`` included); a missing label is ``Unknown``, as cgjax writes that column."""
        out = []
        for d, names in zip(self.label_dims, self.label_names):
            i = int(ex["labels"].get(d, -1))
            out.append(names[i] if 0 <= i < len(names) else UNKNOWN)
        return out

    def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
        labels = self._labels(ex)
        keys = ex["target_keys"] if int(ex["has_target"]) else ""
        if not keys.strip():  # no CSV row: the original's target builder
            keys = "\n".join(f"{d}: {n}" for d, n in zip(self.label_dims, labels))
        dims = self.label_dims
        stage_prompt = (text.stage_a_prompt(dims) if self.stage == "A"
                        else text.stage_b_prompt(labels, self.prompt_seed, dims=dims))
        prompt = stage_prompt
        structured = in_share(ex["image_path"], self.prompt_seed, self.structured_share, "structured")
        if structured and not self.structured_prompt:
            raise ValueError("structured_share > 0 needs the structured_prompt text")
        with _TOKENIZER_LOCK:
            reason = ""
            if self.stage == "B":
                reason = text.truncate_tokens(self.tokenizer, ex["target_reason"].strip(), self.max_reason_tokens)
            target = (keys, reason)
            if structured:  # gold_keys stay the key lines (validation asks the Stage A/B prompt)
                prompt = self.structured_prompt
                target = structured_target(parse_key_lines(keys, self.label_dims), self.label_dims, reason,
                                           self.sentinels)
            row = text.encode(self.tokenizer, prompt, self.n_image_block, self.image_token_id, *target,
                              add_eos=self.add_eos)
            # the generation prompt never depends on the labels (Stage B: chosen from the image path)
            ask = stage_prompt if self.stage == "A" else text.stage_b_prompt_for_image(ex["image_path"], self.prompt_seed,
                                                                                       dims=dims)
            prompt_row = (text.encode(self.tokenizer, ask, self.n_image_block, self.image_token_id)
                          if self.with_prompt else None)
        if len(row.input_ids) > self.length:
            raise ValueError(f"image {ex['image_path']!r}: its row has {len(row.input_ids) - self.n_image_block} text "
                             f"tokens, more than config.text.max_text_tokens="
                             f"{self.length - self.n_image_block}; raise it")
        n_targets = int(np.sum(row.labels != IGNORE_INDEX))
        if 0 < self.max_targets < n_targets:
            raise ValueError(f"image {ex['image_path']!r}: its target has {n_targets} tokens, more than "
                             f"config.text.max_target_tokens={self.max_targets}; raise it")
        if self.n_head >= 0 and (len(row.input_ids) <= self.n_head or row.input_ids[self.n_head] != self.image_token_id
                                 or (self.n_head and row.input_ids[self.n_head - 1] == self.image_token_id)):
            raise ValueError(f"image {ex['image_path']!r}: the prompt head before <image> is not {self.n_head} tokens")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {k: v[0] for k, v in text.pad_rows([row], self.length, pad, side="right").items()}
        out["skipped"] = np.int32(ex.get("skipped", 0))
        if out["skipped"]:  # an image that did not decode (data.skip_undecodable): no loss from it
            out["labels"] = np.full_like(out["labels"], IGNORE_INDEX)
        out["pixel_values"] = np.zeros_like(ex["pixel_values"]) if self.blank_images else ex["pixel_values"]
        out["scores"] = np.concatenate([np.asarray(ex["signals"][d], np.float32) for d in self.concept_dims])
        if in_share(ex["image_path"], self.prompt_seed, self.no_concept_share, "no_concepts"):
            out["scores"] = np.full_like(out["scores"], -1.0)
        out["gold_keys"] = keys
        if prompt_row is not None:
            p = text.pad_rows([prompt_row], self.length, pad, side="left")
            out["prompt_ids"], out["prompt_mask"] = p["input_ids"][0], p["attention_mask"][0]
        return out


HOST_KEYS = ("gold_keys",)


@dataclasses.dataclass(frozen=True)
class Collate:
    """grain ``collate_fn``: stacks rows; a short last batch is padded (``valid`` = 0) to ``batch_size``;
    a skipped image's row is not valid either."""

    batch_size: int

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        n = len(rows)
        rows = list(rows) + [rows[0]] * (self.batch_size - n)
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in HOST_KEYS}
        out["valid"] = (np.arange(self.batch_size) < n).astype(np.int32)
        if "skipped" in out:  # undecodable images (data.skip_undecodable) are not validated either
            out["valid"] *= 1 - out["skipped"]
        for k in HOST_KEYS:
            out[k] = [r[k] for r in rows]
        return out
