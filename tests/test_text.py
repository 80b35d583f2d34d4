"""Prompts and tokenisation of training rows."""
import hashlib
import re

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


def test_truncate_reason_counts_the_bos_as_the_original_and_padding(tok):
    ids = tok(REASON).input_ids
    assert ids[0] == tok.bos_token_id
    short = text.truncate_tokens(tok, REASON, 4)
    # the original: tokenizer_image_token(reason) (BOS included) cut to max_r ids, decoded without specials
    assert short == tok.decode(ids[:4], skip_special_tokens=True)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) == 3 and REASON.startswith(short)
    assert text.truncate_tokens(tok, REASON, len(ids)) == REASON  # exactly max_r ids: kept whole
    assert text.truncate_tokens(tok, REASON, len(ids) - 1) != REASON
    rows = [text.encode(tok, "hi", 2, 4, KEYS), text.encode(tok, "hello there", 2, 4, KEYS)]
    n = max(len(r.input_ids) for r in rows)
    left = text.pad_rows(rows, n + 2, tok.pad_token_id, side="left")
    assert left["attention_mask"][:, :2].sum() == 0 and left["labels"][0, 0] == IGNORE_INDEX
    with pytest.raises(ValueError, match="row 1"):
        text.pad_rows(rows, len(rows[0].input_ids), tok.pad_token_id)


# the original's prompt strings, copied from its source (inference_prompt_templates.py, trainer.py)
ORIGINAL_STRUCTURED = (
    "Between <BEGIN_JSON> and <END_JSON>, return only a compact JSON with keys artist, style, genre, evidence. "
    "Use 'Unknown' if uncertain. In 'evidence', write 2\u20133 concise sentences explaining your reasoning. "
    "Do not include any text outside the JSON.")
ORIGINAL_NATURAL = ("Describe this painting in one cohesive paragraph. Naturally mention the artist, style, and genre "
                    "in the prose (no JSON, no key-value lines). Then briefly justify your identification by referring "
                    "to brushwork, palette, and composition.")
ORIGINAL_STAGE_A = ("You are an art expert. Output exactly three lines: 'artist: ...', 'style: ...', 'genre: ...'. "
                    "No additional text. If uncertain, use 'Unknown'.")
ORIGINAL_STAGE_B = (
    "Identify the artist, style, and genre. First give three lines 'artist: ...', 'style: ...', 'genre: ...'. "
    "Then write 2-3 short sentences explaining the attribution.",
    "Return three key-value lines for artist, style, genre, followed by 2-3 brief sentences of visual reasoning "
    "about brushwork, color, and composition.",
    "Give the keys (artist/style/genre) as three lines, then add 2-3 concise sentences describing evidence for the "
    "attribution and style.")


def test_prompts_are_the_originals_bytes():
    """The prompt strings are keys of reasoning.json: every byte counts (the structured one has an en dash)."""
    from cgjax import infer

    assert infer.structured_prompt().encode() == ORIGINAL_STRUCTURED.encode()
    assert b"2\xe2\x80\x933 concise" in infer.structured_prompt().encode()
    assert infer.natural_prompt() == ORIGINAL_NATURAL
    assert text.STAGE_A_PROMPT == ORIGINAL_STAGE_A and text.STAGE_B_PROMPTS == ORIGINAL_STAGE_B
    assert text.SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the human's questions.")  # llava_v1


def _original_stage_b_choice(artist, style, genre, seed):
    """The original's ``_prompt_builder_b``, restated: md5 of the CSV's literal label strings."""
    key = f"{artist}|{style}|{genre}|{seed}"
    u = (int(hashlib.md5(key.encode()).hexdigest(), 16) % 10**8) / float(10**8)
    cum, acc = [], 0.0
    for w in (0.5, 0.3, 0.2):
        acc += w
        cum.append(acc)
    return ORIGINAL_STAGE_B[next((i for i, c in enumerate(cum) if u <= c), 0)]


def test_stage_b_training_prompt_hashes_unknown_genre_as_a_class(tok, tmp_path):
    """A record whose genre is WikiArt's ``Unknown Genre`` gets the prompt the original picked from
    the literal string (it is a class, not a missing label); a missing genre hashes ``Unknown``."""
    import json

    from cgjax.data.records import read_dataset_json
    from cgjax.text_rows import TextRows

    triples = [(a, s, "Unknown Genre") for a in ("vincent-van-gogh", "claude-monet", "pablo-picasso", "rembrandt",
                                                  "leonardo-da-vinci")
               for s in ("Post_Impressionism", "Impressionism", "Cubism", "Baroque", "High_Renaissance")]
    records = [{"image": f"{i}.jpg", "concepts": {"artist": a, "style": s, "genre": g}}
               for i, (a, s, g) in enumerate(triples)]
    records.append({"image": "nogenre.jpg", "concepts": {"artist": "rembrandt", "style": "Baroque"}})
    (tmp_path / "d.json").write_text(json.dumps(records))
    ds = read_dataset_json(tmp_path / "d.json")
    assert ds.records[0].labels["genre"] == "Unknown Genre" and ds.records[-1].labels["genre"] is None
    vocabs = ds.vocabularies()
    assert "Unknown Genre" in vocabs["genre"]
    dims = ("artist", "style", "genre")
    img = tok.convert_tokens_to_ids("<image>")
    rows = TextRows(tokenizer=tok, stage="B", n_image_block=2, image_token_id=img, length=200,
                    concept_dims=("genre",), label_dims=dims, label_names=tuple(tuple(vocabs[d].names) for d in dims),
                    prompt_seed=42, max_reason_tokens=0, add_eos=True)
    wants = [_original_stage_b_choice(*t, 42) for t in triples] + [
        _original_stage_b_choice("rembrandt", "Baroque", "Unknown", 42)]
    # the check can fail: cgjax's earlier rule (Unknown Genre missing, hashed as "") picks differently
    assert sum(w != _original_stage_b_choice(a, s, "", 42) for w, (a, s, _) in zip(wants, triples)) >= 5
    for r, want in zip(ds.records, wants):
        ex = {"labels": {d: vocabs[d].index(r.labels[d]) for d in dims}, "target_keys": "", "target_reason": "",
              "has_target": 0, "image_path": r.image, "pixel_values": np.zeros((3, 4, 4), np.float32),
              "signals": {"genre": np.zeros(len(vocabs["genre"]), np.float32)}}
        out = rows(ex)
        keys = "\n".join(f"{d}: {r.labels[d] or 'Unknown'}" for d in dims)
        expect = text.encode(tok, want, 2, img, keys, "", add_eos=True).input_ids
        np.testing.assert_array_equal(out["input_ids"][out["attention_mask"] > 0], expect)


def test_prompts_are_templates_over_the_dimensions():
    """Other dimensions: every prompt names them (and only them), with neutral words; the art dims keep the
    original's bytes (test_prompts_are_the_originals_bytes); the md5 choice picks the same variant index."""
    from cgjax import infer
    from cgjax.eval.parser import prompt_mode

    birds = ("species", "habitat", "season")
    prompts = [text.stage_a_prompt(birds), *text.stage_b_prompts(birds), infer.natural_prompt(birds),
               infer.structured_prompt(birds)]
    art_words = re.compile(r"\b(artist|style|genre|art|painting|artwork|brushwork|attribution)\b", re.I)
    for p in prompts:
        assert not art_words.search(p), p
        assert all(d in p for d in birds), p
    assert "'species: ...', 'habitat: ...', 'season: ...'" in text.stage_a_prompt(birds)
    assert "(species/habitat/season) as three lines" in text.stage_b_prompts(birds)[2]
    assert "keys species, habitat, season, evidence." in infer.structured_prompt(birds)
    assert "mention the species, habitat, and season" in infer.natural_prompt(birds)
    four = ("species", "habitat", "season", "sex")
    assert "exactly four lines" in text.stage_a_prompt(four) and "'sex: ...'" in text.stage_a_prompt(four)
    assert all(prompt_mode(p) == "keys" for p in [text.stage_a_prompt(four), *text.stage_b_prompts(four),
                                                  *text.stage_b_prompts(birds)])
    assert text.stage_a_prompt(("artist", "style", "genre")) == ORIGINAL_STAGE_A
    for i in range(20):
        labels = [f"a{i}", "s", "g"]
        k = text.STAGE_B_PROMPTS.index(text.stage_b_prompt(labels, 3))
        assert text.stage_b_prompt(labels, 3, dims=birds) == text.stage_b_prompts(birds)[k]
