"""Helpers that build small, real artefacts for tests and examples (no training, no download)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from cgjax import checkpoints, train
from cgjax.demo_assets import tokenizer_corpus
from converters.tiny_llava import make_llava_checkpoint
from converters.tiny_tokenizer import train_tokenizer


def tiny_llava_with_tokenizer(out_dir: str, targets_csv: str, extra_texts: Sequence[str] = (), vocab_size: int = 1000,
                              seed: int = 0) -> tuple[str, Any]:
    """A tiny random HF LLaVA saved in ``out_dir`` with a tokenizer trained on the data set's
    prompts, keys and reasons (plus ``extra_texts``). Returns ``(checkpoint_dir, tokenizer)``."""
    tok = train_tokenizer(tokenizer_corpus(targets_csv) + list(extra_texts), vocab_size=vocab_size)
    ckpt = make_llava_checkpoint(out_dir, "tiny", seed=seed, vocab_size=len(tok),
                                 image_token_id=tok.convert_tokens_to_ids("<image>"))
    tok.save_pretrained(ckpt)
    return ckpt, tok


def fake_trained_stage(config: Any, stage_workdir: str, step: int, seed: int = 7, scale: float = 0.5):
    """A Stage A/B work dir written by the trainer's own checkpoint code, without a train-step
    compile: the initial state with its concept values moved by noise, saved at ``step``.
    Returns ``(trainer, state)``."""
    tr = train.Trainer(config, stage_workdir)
    state = tr.init_state()
    v = state["params"]["concepts"]["values"]
    state["params"]["concepts"]["values"] = v + scale * jax.random.normal(jax.random.PRNGKey(seed), v.shape)
    mngr = checkpoints.manager(os.path.join(stage_workdir, "checkpoints"), config)
    checkpoints.save(mngr, step, state, {"step": step, "stage": tr.stage, "data_iter": {},
                                    "concept_index": tr.index.to_json(), "val": {},
                                    "trainable": tr.trainable_paths})
    mngr.wait_until_finished()
    mngr.close()
    return tr, state


def param_arrays(model: Any) -> dict:
    """``{"path.to.param": np.ndarray}`` of an NNX model's parameters."""
    return {".".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a: Any, b: Any) -> None:
    """Two NNX models hold the same parameter paths with bitwise-equal values."""
    pa, pb = param_arrays(a), param_arrays(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
