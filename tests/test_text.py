"""Prompts and tokenisation of training rows."""
import hashlib

import numpy as np
import pytest

from cgjax import text
from cgjax.losses import IGNORE_INDEX, SEGMENT_KEYS, SEGMENT_REASON
from converters.tiny_tokenizer import train_tokenizer

KEYS = "artist: claude-monet\nstyle: Impressionism\ngenre: landscape"
REASON = "The warm palette and short dabs point to Monet."


@pytest.fixture(scope="module")
def tok():
    corpus = [text.SYSTEM, text.STAGE_A_PROMPT, *text.STAGE_B_PROMPTS, KEYS, REASON] * 2
    return train_tokenizer(corpus, vocab_size=300)


def original_tokenizer_image_token(prompt, tokenizer, image_token_index):
    """The original LLaVA ``tokenizer_image_token``, restated."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [image_token_index] * (offset + 1)
    for x in [e for sub in zip(chunks, [seps] * len(chunks)) for e in sub][:-1]:
        ids.extend(x[offset:])
    return ids


def test_encode_matches_original_chunked_tokenisation(tok):
    img = tok.convert_tokens_to_ids("<image>")
    row = text.encode(tok, text.STAGE_A_PROMPT, 1, img, KEYS, "", add_eos=False)
    full = f"{text.SYSTEM} USER: <image>\n{text.STAGE_A_PROMPT} ASSISTANT: {KEYS}"
    assert row.input_ids.tolist() == original_tokenizer_image_token(full, tok, img)


def test_segments_cover_exactly_the_target(tok):
    img = tok.convert_tokens_to_ids("<image>")
    row = text.encode(tok, text.STAGE_A_PROMPT, 5, img, KEYS, REASON)
    assert (row.input_ids == img).sum() == 5
    assert tok.decode(row.input_ids[row.segment_ids == SEGMENT_KEYS]).strip() == KEYS
    reason = tok.decode(row.input_ids[row.segment_ids == SEGMENT_REASON], skip_special_tokens=True)
    assert reason.strip() == REASON
    assert row.input_ids[-1] == tok.eos_token_id and row.segment_ids[-1] == SEGMENT_REASON
    np.testing.assert_array_equal(row.labels == IGNORE_INDEX, row.segment_ids == 0)
    # the prompt itself is never supervised
    first_target = int(np.argmax(row.segment_ids > 0))
    assert "ASSISTANT" in tok.decode(row.input_ids[:first_target])


def test_inference_prompt_has_no_labels(tok):
    row = text.encode(tok, text.STAGE_A_PROMPT, 3, 4)
    assert np.all(row.labels == IGNORE_INDEX)
    assert tok.decode(row.input_ids, skip_special_tokens=True).rstrip().endswith("ASSISTANT:")


def test_stage_b_prompt_choice_is_the_original_hash():
    labels = ["vincent-van-gogh", "Post_Impressionism", "still_life"]
    u = (int(hashlib.md5("vincent-van-gogh|Post_Impressionism|still_life|42".encode()).hexdigest(), 16) % 10**8) / 10**8
    want = text.STAGE_B_PROMPTS[0 if u <= 0.5 else 1 if u <= 0.8 else 2]
    assert text.stage_b_prompt(labels, 42) == want
    picks = [text.stage_b_prompt([f"a{i}", "s", "g"], 0) for i in range(3000)]
    freq = [picks.count(p) / len(picks) for p in text.STAGE_B_PROMPTS]
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)


def test_truncate_reason_and_padding(tok):
    short = text.truncate_tokens(tok, REASON, 4)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) <= 4 and REASON.startswith(short.strip()[:3])
    rows = [text.encode(tok, "hi", 2, 4, KEYS), text.encode(tok, "hello there", 2, 4, KEYS)]
    n = max(len(r.input_ids) for r in rows)
    left = text.pad_rows(rows, n + 2, tok.pad_token_id, side="left")
    assert left["attention_mask"][:, :2].sum() == 0 and left["labels"][0, 0] == IGNORE_INDEX
    with pytest.raises(ValueError, match="row 1"):
        text.pad_rows(rows, len(rows[0].input_ids), tok.pad_token_id)
