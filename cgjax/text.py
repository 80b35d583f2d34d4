"""Prompts, the ``llava_v1`` conversation, and tokenisation into fixed-length training rows.

A training row is ``<system> USER: <image>\\n{prompt} ASSISTANT: {keys}\\n{reason}</s>``:
the image block (image tokens, then the concept-token slots) sits at ``<image>``; everything
before the target is label -100; target tokens carry a segment id (keys or reason) that selects
their loss weight. Tokenisation follows the original's ``tokenizer_image_token``: the text on
each side of ``<image>`` is tokenised on its own, the second part without its BOS.

Prompts are templates over the data's dimension names (:func:`stage_a_prompt`,
:func:`stage_b_prompts`): the names are joined into the sentence ("artist, style, and genre",
"artist/style/genre", "three lines"). The rule for the wording: when every dimension is one of the
original's ``artist, style, genre`` (:func:`is_art_domain`), the original's art-specific words stay
("art expert", "brushwork", "attribution"), so those prompts are byte-identical to the original's
(``STAGE_A_PROMPT``, ``STAGE_B_PROMPTS``); any other domain gets neutral words ("expert", "shape",
"identification", "image").
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import numpy as np

from cgjax.losses import IGNORE_INDEX, SEGMENT_KEYS, SEGMENT_NONE, SEGMENT_REASON

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ART_DIMENSIONS = ("artist", "style", "genre")
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
STAGE_B_WEIGHTS = (0.5, 0.3, 0.2)


def is_art_domain(dims: Sequence[str]) -> bool:
    """True when every dimension is one of the original's artist/style/genre (its art wording applies)."""
    return bool(dims) and all(d in ART_DIMENSIONS for d in dims)


def join_names(names: Sequence[str], sep: str = ", ", last: str = ", and ") -> str:
    """``a, b, and c`` (two: ``a and b``)."""
    names = [str(n) for n in names]
    if len(names) <= 2:
        return " and ".join(names)
    return sep.join(names[:-1]) + last + names[-1]


def _count(dims: Sequence[str]) -> str:
    return _NUMBERS[len(dims)] if len(dims) < len(_NUMBERS) else str(len(dims))


def _line(dims: Sequence[str]) -> str:
    return "line" if len(dims) == 1 else "lines"


def stage_a_prompt(dims: Sequence[str] = ART_DIMENSIONS) -> str:
    """The Stage A prompt over ``dims`` (artist/style/genre: the original's, byte for byte)."""
    dims = list(dims)
    expert = "an art expert" if is_art_domain(dims) else "an expert"
    keys = ", ".join(f"'{d}: ...'" for d in dims)
    return (f"You are {expert}. Output exactly {_count(dims)} {_line(dims)}: {keys}. "
            "No additional text. If uncertain, use 'Unknown'.")


def stage_b_prompts(dims: Sequence[str] = ART_DIMENSIONS) -> tuple[str, str, str]:
    """The three Stage B variants over ``dims`` (artist/style/genre: the original's, byte for byte)."""
    dims = list(dims)
    art = is_art_domain(dims)
    n, lines = _count(dims), _line(dims)
    what = "the attribution" if art else "the identification"
    cues = "brushwork, color, and composition" if art else "shape, color, and composition"
    evidence = "the attribution and style" if art else "the identification"
    keys = ", ".join(f"'{d}: ...'" for d in dims)
    return (
        f"Identify the {join_names(dims)}. First give {n} {lines} {keys}. Then write 2-3 short sentences "
        f"explaining {what}.",
        f"Return {n} key-value {lines} for {', '.join(dims)}, followed by 2-3 brief sentences of visual "
        f"reasoning about {cues}.",
        f"Give the keys ({'/'.join(dims)}) as {n} {lines}, then add 2-3 concise sentences describing "
        f"evidence for {evidence}.",
    )


STAGE_A_PROMPT = stage_a_prompt(ART_DIMENSIONS)
STAGE_B_PROMPTS = stage_b_prompts(ART_DIMENSIONS)


def md5_unit(key: str) -> float:
    """The original's deterministic draw in [0, 1): ``md5(key)`` as an integer, mod 1e8, / 1e8."""
    return (int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 10**8) / 10**8


def stage_b_prompt(labels: Sequence[str], seed: int, weights: Sequence[float] = STAGE_B_WEIGHTS,
                   dims: Sequence[str] = ART_DIMENSIONS) -> str:
    """The original's deterministic choice: ``md5("a|s|g|seed")`` against the cumulative weights,
    among :func:`stage_b_prompts` of ``dims``."""
    u = md5_unit("|".join(list(labels) + [str(seed)]))
    w = np.asarray(weights, np.float64)
    cum = np.cumsum(w / w.sum())
    prompts = stage_b_prompts(dims)
    return prompts[int(min(np.searchsorted(cum, u, side="left"), len(prompts) - 1))]


def stage_b_prompt_for_image(image_path: str, seed: int, weights: Sequence[float] = STAGE_B_WEIGHTS,
                             dims: Sequence[str] = ART_DIMENSIONS) -> str:
    """The Stage B prompt for answering an image (inference, validation generation): the
    original's md5 choice over the image's path instead of its labels, so the question never
    carries the answer. Training rows keep :func:`stage_b_prompt` (the original's targets)."""
    return stage_b_prompt([str(image_path)], seed, weights, dims)


def conversation(prompt: str) -> tuple[str, str]:
    """Text before and after ``<image>`` of the ``llava_v1`` prompt (ends with ``ASSISTANT:``)."""
    return f"{SYSTEM} USER: ", f"\n{prompt} ASSISTANT:"


def truncate_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut as the original cut a reason: tokenised alone with its special tokens (LLaMA:
    the BOS), kept whole when that is at most ``max_tokens`` ids, else the first ``max_tokens``
    ids decoded without special tokens, so ``max_reason_tokens=64`` leaves 63 text tokens."""
    if max_tokens <= 0 or not text:
        return text
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


@dataclasses.dataclass
class Row:
    """One tokenised example (1-D int32 arrays of equal length)."""

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    attention_mask: np.ndarray


def _tokens(tokenizer: Any, text: str, *, bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if ids and ids[0] == tokenizer.bos_token_id and not bos:
        ids, offsets = ids[1:], offsets[1:]
    if ids and ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
        ids, offsets = ids[:-1], offsets[:-1]  # tokenizers that append EOS themselves
    return ids, offsets


def encode(
    tokenizer: Any,
    prompt: str,
    n_image_tokens: int,
    image_token_id: int,
    target_keys: str | None = None,
    target_reason: str = "",
    add_eos: bool = True,
) -> Row:
    """Tokenise one conversation. Without ``target_keys`` it is an inference prompt."""
    before, after = conversation(prompt)
    ids_before, _ = _tokens(tokenizer, before, bos=True)
    target = None
    if target_keys is not None:
        target = target_keys + (f"\n{target_reason}" if target_reason else "")
        after = after + " " + target
    ids_after, offsets = _tokens(tokenizer, after, bos=False)
    seg_after = np.full(len(ids_after), SEGMENT_NONE, np.int32)
    if target is not None:
        t0 = len(after) - len(target)
        keys_end = t0 + len(target_keys)
        ends = np.asarray([e for _, e in offsets], np.int64)
        starts = np.asarray([s for s, _ in offsets], np.int64)
        in_target = ends > t0
        seg_after = np.where(in_target, np.where(starts < keys_end, SEGMENT_KEYS, SEGMENT_REASON), SEGMENT_NONE)
        if add_eos:
            ids_after.append(tokenizer.eos_token_id)
            seg_after = np.append(seg_after, seg_after[-1] if len(seg_after) else SEGMENT_KEYS)
    input_ids = np.asarray(ids_before + [image_token_id] * n_image_tokens + ids_after, np.int32)
    segment_ids = np.concatenate(
        [np.zeros(len(ids_before) + n_image_tokens, np.int32), seg_after.astype(np.int32)]
    )
    labels = np.where(segment_ids != SEGMENT_NONE, input_ids, IGNORE_INDEX).astype(np.int32)
    return Row(input_ids, labels, segment_ids, np.ones_like(input_ids))


def pad_rows(rows: Sequence[Row], length: int, pad_id: int, side: str = "right") -> dict[str, np.ndarray]:
    """Stack rows into ``[B, length]`` arrays, padding on ``side``; too-long rows are an error."""
    out = {k: np.zeros((len(rows), length), np.int32) for k in ("input_ids", "labels", "segment_ids", "attention_mask")}
    out["input_ids"][:] = pad_id
    out["labels"][:] = IGNORE_INDEX
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the configured length {length}")
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        for k in out:
            out[k][i, sl] = getattr(r, k)
    return out
