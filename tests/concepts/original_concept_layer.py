"""A plain-Python / PyTorch statement of the original MultiTokenConceptLayer (for parity tests)."""
import math

import numpy as np


def original_selection(sig, dim_ranges, threshold, backoff, topk, budget, priority, k_max):
    """The original layer's per-sample selection (dict branch), restated in plain Python.

    ``sig``: {global concept idx: s} in ascending index order. Returns [(idx, s, k)] in order.
    """
    dims = list(range(len(dim_ranges)))
    per_dim = {}
    for d in dims:
        a, b = dim_ranges[d]
        act = [(i, s) for i, s in sig.items() if a <= i < b and s >= threshold]
        act.sort(key=lambda t: t[1], reverse=True)
        if not act and backoff > 0:
            cand = [(i, s) for i, s in sig.items() if a <= i < b and s >= max(0.0, threshold - backoff)]
            cand.sort(key=lambda t: t[1], reverse=True)
            act = cand[:1]
        if topk > 0:
            act = act[:topk]
        per_dim[d] = act
    selected = []
    if budget <= 0:
        for d in dims:
            selected += per_dim[d]
    else:
        used = 0
        out = {d: [] for d in dims}
        for d in priority or dims:
            if per_dim[d] and used < budget:
                out[d].append(per_dim[d][0])
                used += 1
        rem = [(d, i, s) for d in dims for (i, s) in per_dim[d][len(out[d]):]]
        rem.sort(key=lambda t: t[2], reverse=True)
        for d, i, s in rem:
            if used >= budget:
                break
            out[d].append((i, s))
            used += 1
        for d in dims:
            selected += out[d]
    res = []
    for i, s in selected:
        g = max(0.0, min(1.0, s))
        k = max(1, int(math.ceil(float(np.float32(g) * np.float32(k_max)))))
        res.append((i, s, k))
    return res


def original_sequence_logits(hf_model, prefix_ids, suffix_ids, pixel_values, sig, values, gcfg):
    """One sample through the original pipeline on an HF LLaVA: image features, appended
    concept tokens (L2-normalised, rescaled to the first image token's norm), spliced at
    ``<image>``, variable length. Returns (logits [T, V] numpy, number of appended tokens)."""
    import torch
    import torch.nn.functional as F

    cfg = hf_model.config
    with torch.no_grad():
        out = hf_model.model.get_image_features(
            pixel_values=torch.as_tensor(pixel_values)[None],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = out.pooler_output[0] if isinstance(out.pooler_output, (list, tuple)) else out.pooler_output[0]
        picked = original_selection(
            sig, gcfg.dim_ranges, gcfg.threshold, gcfg.backoff_delta, gcfg.topk_per_dim,
            gcfg.max_concepts, list(gcfg.priority) if gcfg.priority else None, gcfg.k_max,
        )
        vals = torch.as_tensor(np.asarray(values))
        extra = [F.normalize(vals[i, :k], dim=-1) for i, _, k in picked]
        block = feats
        if extra:
            toks = torch.cat(extra, 0) * feats[0].norm()
            block = torch.cat([feats, toks], 0)
        ids = list(prefix_ids) + [cfg.image_token_id] * block.shape[0] + list(suffix_ids)
        ids_t = torch.tensor([ids])
        emb = hf_model.get_input_embeddings()(ids_t)
        emb[0, len(prefix_ids): len(prefix_ids) + block.shape[0]] = block
        logits = hf_model(inputs_embeds=emb).logits[0].numpy()
    return logits, block.shape[0] - feats.shape[0]
