"""A small LLaMA-style tokenizer trained locally (no hub): BPE over Metaspace pieces.

For the demo and the tests: it behaves like LLaMA's SentencePiece tokenizer where cgjax
cares (``<s>`` BOS added, ``</s>`` EOS, ``\u2581`` word boundaries, byte fallback-free), and it
saves as a ``PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained`` loads.
"""
from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (ids 0..4 are the special tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # optional [torch] extra
    from transformers import PreTrainedTokenizerFast  # optional [torch] extra

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    chars = sorted({c for t in ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"!?-_()/{}[]<>|\n"] for c in t})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=chars + ["\u2581"], show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"], padding_side="left",
    )


def save_tokenizer(tokenizer, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
