"""Model FLOPs accounting (the standard ``2·N·tokens`` per matmul pass) and a matmul-peak probe.

Used by the trainer's step line (TFLOP/s), the launch planner (``cgjax.plan``) and the
benchmarks' MFU column (``scripts/bench.py all``). These count the model's useful work, not what a
particular implementation executes: a step that skips work (the trainer's no-gradient prefix)
is credited with the same FLOPs as one that does it all, so MFU compares implementations fairly.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgjax.quantize import SCALE_SUFFIX

__all__ = ["param_counts", "step_flops", "attention_flops", "generate_flops", "encode_flops", "feature_blocks",
           "matmul_peak"]


def param_counts(state: Any) -> dict[str, int]:
    """Parameter counts of a LLaVA / ConceptLlava state by part: ``vision``, ``projector``,
    ``lm`` (decoder layers + final norm + lm_head), ``embed`` (token embedding) and
    ``concepts`` (everything else). A quantized weight's scale (:mod:`cgjax.quantize`) is not a
    parameter and is not counted."""
    counts = {"vision": 0, "projector": 0, "lm": 0, "embed": 0, "concepts": 0}
    for path, v in nnx.to_flat_state(state):
        p = "/".join(map(str, path))
        if p.endswith(SCALE_SUFFIX):
            continue
        n = int(np.prod(np.shape(v.get_value() if isinstance(v, nnx.Variable) else v)))
        if "vision_tower" in p:
            counts["vision"] += n
        elif "multi_modal_projector" in p:
            counts["projector"] += n
        elif "embed_tokens" in p:
            counts["embed"] += n
        elif "language_model" in p:
            counts["lm"] += n
        else:
            counts["concepts"] += n
    return counts


def step_flops(param_counts: Mapping[str, int], batch: int, seq_len: int, n_image_tokens: int,
               n_patches: int, n_trainable_dense: int = 0, *, head_params: int = 0, diff_len: int | None = None,
               logit_positions: int | None = None) -> float:
    """Model FLOPs of one train step with a frozen LLaVA.

    forward: ``2·N_vision·B·(patches+1) + 2·N_projector·B·n_img + 2·N_LM·B·T`` (N_LM: decoder
    layers + final norm + lm_head; embedding lookups are not matmuls); backward: ``2·N_LM·B·T``
    for the activation gradients that reach the concept tokens (frozen weights get no weight
    gradients, the vision tower no backward at all) plus ``2·N_trainable·B·T`` for trainable
    dense weights (0 when only the values train). So ``4·N_LM·T`` per sequence instead of the
    ``6·N·T`` of full training. Attention's ``T²`` terms are not counted.

    What the step needs when only the values train: activation gradients only for the
    ``diff_len`` positions from the first concept slot on (nothing before it depends on the
    values), and the ``lm_head`` (``head_params`` of N_LM) only at the ``logit_positions``
    supervised positions of a row. Defaults: every position (the plain count above).
    """
    n_vis, n_proj, n_lm = param_counts["vision"], param_counts["projector"], param_counts["lm"]
    body = n_lm - head_params
    diff = seq_len if diff_len is None else diff_len
    logits = seq_len if logit_positions is None else logit_positions
    fwd = (2 * n_vis * batch * (n_patches + 1) + 2 * n_proj * batch * n_image_tokens
           + 2 * body * batch * seq_len + 2 * head_params * batch * logits)
    bwd = 2 * body * batch * diff + 2 * head_params * batch * logits + 2 * n_trainable_dense * batch * seq_len
    return float(fwd + bwd)


def attention_flops(llava_cfg: Any, batch: int, seq_len: int, diff_len: int) -> dict[str, float]:
    """Attention score and value matmuls (``QK^T`` and ``PV``: ``4·T·S·H·hd`` per layer and
    sequence, computed over the full masked ``T x S`` square as the model does). Backward: twice the
    forward for the ``diff_len`` differentiated query rows (dQ, dK from dS; dP, dV)."""
    t, v = llava_cfg.text_config, llava_cfg.vision_config
    hd_h = t.num_attention_heads * t.head_dim
    lm_fwd = 4.0 * batch * seq_len * seq_len * hd_h * t.num_hidden_layers
    lm_bwd = 8.0 * batch * diff_len * seq_len * hd_h * t.num_hidden_layers
    n_tok = v.grid[0] * v.grid[1] + 1
    vis = 4.0 * batch * n_tok * n_tok * v.width * v.layers
    return {"lm_forward": lm_fwd, "lm_backward": lm_bwd, "vision_forward": vis, "total": lm_fwd + lm_bwd + vis}


def encode_flops(vision_cfg: Any, batch: int, blocks: int | None = None, project: bool = True) -> float:
    """Forward FLOPs of a CLIP ViT over ``batch`` images: the patch embedding, ``blocks``
    transformer blocks (default: all; LLaVA stops at its feature layer) of ``2·(4·w² + 2·w·mlp)``
    per token plus attention ``4·n_tok²·w``, and (``project``) the output projection of the pooled
    token."""
    v = vision_cfg
    (ph, pw), (gh, gw) = v.patch_size, v.grid
    n_tok, w = gh * gw + 1, v.width
    blocks = v.layers if blocks is None else blocks
    patch = 2.0 * gh * gw * 3 * ph * pw * w
    block = 2.0 * n_tok * (4 * w * w + 2 * w * v.mlp_dim) + 4.0 * n_tok * n_tok * w
    proj = 2.0 * w * v.output_dim if v.output_dim and project else 0.0
    return float(batch * (patch + blocks * block + proj))


def feature_blocks(llava_cfg: Any) -> int:
    """How many vision blocks LLaVA runs to reach ``vision_feature_layer`` (hidden state 0 is the
    embedding output, so layer ``k >= 0`` needs ``k`` blocks and ``-1`` all of them)."""
    n = llava_cfg.vision_config.layers
    k = llava_cfg.vision_feature_layer
    return k if k >= 0 else n + 1 + k


def generate_flops(llava_cfg: Any, param_counts: Mapping[str, int], batch: int, prompt_len: int,
                   new_tokens: int) -> float:
    """Model FLOPs of one greedy ``generate`` call: vision tower + projector on the image, the
    decoder over the ``prompt_len`` prompt (logits of its last position only), then
    ``new_tokens - 1`` single-token steps (decoder + lm_head), attention over the valid keys."""
    t, v = llava_cfg.text_config, llava_cfg.vision_config
    head = t.hidden_size * t.vocab_size
    body = param_counts["lm"] - (0 if t.tie_word_embeddings else head)
    hd_h = t.num_attention_heads * t.head_dim
    vision = encode_flops(v, batch, feature_blocks(llava_cfg), project=False)
    projector = 2.0 * param_counts["projector"] * batch * llava_cfg.num_image_tokens
    prefill = 2.0 * body * batch * prompt_len + 2.0 * head * batch + 4.0 * batch * prompt_len ** 2 * hd_h * t.num_hidden_layers
    steps = np.arange(1, new_tokens)  # step i attends over prompt_len + i keys
    decode = float(np.sum(2.0 * (body + head) * batch + 4.0 * batch * (prompt_len + steps) * hd_h * t.num_hidden_layers))
    return float(vision + projector + prefill + decode)


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """This machine's measured fp32 matmul throughput (FLOP/s): the best of ``repeats`` timed
    ``n x n @ n x n`` products in JAX (default device) and in PyTorch (if installed). ``peak`` is
    the higher of the two: the denominator of the benchmarks' MFU."""
    rs = np.random.default_rng(0)
    a_np = rs.standard_normal((n, n), dtype=np.float32)
    b_np = rs.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3

    def best(fn) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return flops / min(ts)

    mm = jax.jit(jnp.matmul)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    out = {"jax": best(lambda: mm(a, b).block_until_ready())}
    try:
        import torch  # optional [torch] extra
    except ImportError:
        pass
    else:
        ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
        out["torch"] = best(lambda: ta @ tb)
    out["peak"] = max(out.values())
    out["n"] = float(n)
    return out
