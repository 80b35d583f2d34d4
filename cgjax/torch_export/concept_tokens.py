"""Gated concept tokens for a HF ``LlavaForConditionalGeneration`` (exported by cgjax; PyTorch only).

    values = torch.load("concepts.pt", weights_only=True)  # {step: {"values": [N, K_max, D]}}
    meta = json.load(open("concepts.json"))
    ct = ConceptTokens(next(iter(values.values()))["values"], meta)
    ids = generate_with_concepts(hf_model, tokenizer, pixel_values, prompt, scores, 64, concept_tokens=ct)

Gating (per sample, ``scores [n_concepts]`` = the ``s`` of each concept): per dimension keep the
concepts with ``s >= threshold`` by score (ties: lower index first); if none, back off to the best
one if ``s >= threshold - backoff_delta``; cut to ``topk_per_dim``. With ``max_concepts > 0`` the
dimensions in ``priority`` order each get their top-1 while the budget lasts, the remaining
candidates fill it by score. Each selected concept adds ``k = max(1, ceil(clip(s, 0, 1) * K_max))``
value tokens, each L2-normalised and rescaled to the norm of the first image token. The image block
at ``<image>`` is ``[image features | concept tokens]`` in dimension order, best first.
"""
import inspect
import math

import torch

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class ConceptTokens(torch.nn.Module):
    """``values [n_concepts, K_max, D]`` + the gating options of ``concepts.json``."""

    def __init__(self, values, gating):
        super().__init__()
        self.register_buffer("values", torch.as_tensor(values, dtype=torch.float32))
        g = dict(gating.get("gating", gating))
        dims = list(gating.get("dims", g.get("dims", [])))
        ranges = gating.get("dim_ranges", g.get("dim_ranges"))
        if isinstance(ranges, dict):
            ranges = [ranges[d] for d in dims]
        self.dim_ranges = [(int(a), int(b)) for a, b in ranges]
        if not dims:
            dims = [str(i) for i in range(len(self.dim_ranges))]
        self.dims = dims
        self.k_max = int(g.get("k_max", gating.get("k_max", self.values.shape[1])))
        self.threshold = float(g.get("threshold", 0.75))
        self.backoff_delta = float(g.get("backoff_delta", 0.05))
        self.topk_per_dim = int(g.get("topk_per_dim", 2))
        self.max_concepts = int(g.get("max_concepts", 3))
        pri = g.get("priority") or dims
        if isinstance(pri, str):
            pri = [p.strip() for p in pri.split(",") if p.strip()]
        self.priority = [dims.index(p) if isinstance(p, str) else int(p) for p in pri if not isinstance(p, str) or p in dims]

    def select(self, scores):
        """``scores [n_concepts]`` -> ``[(global concept index, s, k), ...]`` in block order."""
        s = [float(x) for x in torch.as_tensor(scores, dtype=torch.float32).tolist()]
        per_dim = []
        for a, b in self.dim_ranges:
            order = sorted(range(a, b), key=lambda i: (-s[i], i))
            cand = [i for i in order if s[i] >= self.threshold]
            if not cand and self.backoff_delta > 0 and s[order[0]] >= max(0.0, self.threshold - self.backoff_delta):
                cand = [order[0]]
            if self.topk_per_dim > 0:
                cand = cand[: self.topk_per_dim]
            per_dim.append(cand)
        if self.max_concepts > 0:
            chosen = [[] for _ in per_dim]
            used = 0
            for d in self.priority:
                if per_dim[d] and used < self.max_concepts:
                    chosen[d].append(per_dim[d][0])
                    used += 1
            pool = [(i, d) for d, cand in enumerate(per_dim) for i in cand if i not in chosen[d]]
            pool.sort(key=lambda t: -s[t[0]])  # stable: dimension order, then rank, on ties
            for i, d in pool[: max(0, self.max_concepts - used)]:
                chosen[d].append(i)
            per_dim = [[i for i in cand if i in ch] for cand, ch in zip(per_dim, chosen)]
        out = []
        for cand in per_dim:
            for i in cand:
                g = min(1.0, max(0.0, s[i]))
                k = max(1, int(math.ceil(float(torch.tensor(g, dtype=torch.float32) * self.k_max))))
                out.append((i, s[i], k))
        return out

    def forward(self, scores, image_features):
        """Concept tokens ``[n, D]`` of one sample (``image_features [T_img, D]``)."""
        sel = self.select(scores)
        if not sel:
            return image_features.new_zeros((0, image_features.shape[-1]))
        tok = torch.cat([self.values[i, :k] for i, _, k in sel], dim=0)
        tok = tok / tok.norm(dim=-1, keepdim=True)
        ref = image_features[0].float().norm()
        return (tok * ref).to(image_features.dtype)


def prompt_ids(tokenizer, prompt):
    """Token ids before and after ``<image>`` of the llava_v1 conversation (as the original)."""
    def ids(text, bos):
        out = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if out and out[0] == tokenizer.bos_token_id and not bos:
            out = out[1:]
        if out and out[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
            out = out[:-1]
        return out
    return ids(f"{SYSTEM} USER: ", True), ids(f"\n{prompt} ASSISTANT:", False)


def image_features(hf_model, pixel_values):
    """Projected image features ``[B, T_img, D]`` of a HF LLaVA."""
    cfg = hf_model.config
    out = hf_model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                      vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


def _cache_kwargs(hf_model, out):
    """The KV cache of ``out`` under the keyword this transformers version takes (cache / past_key_values)."""
    params = inspect.signature(hf_model.forward).parameters
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


@torch.no_grad()
def generate_with_concepts(hf_model, tokenizer, pixel_values, prompt, scores, max_new_tokens=64, *,
                           concept_tokens=None, use_concepts=True):
    """Greedy answer token ids per image (a list of lists, stopping after EOS).

    ``pixel_values [B, 3, H, W]``, ``scores [B, n_concepts]``; ``concept_tokens``: a :class:`ConceptTokens`.
    Each sample runs on its own (no padding): embeddings of the prompt with ``[image features |
    concept tokens]`` at ``<image>``, then KV-cached greedy decoding with the HF model."""
    hf_model.eval()
    before, after = prompt_ids(tokenizer, prompt)
    emb = hf_model.get_input_embeddings()
    feats = image_features(hf_model, pixel_values)
    eos = tokenizer.eos_token_id
    answers = []
    for b in range(feats.shape[0]):
        block = feats[b]
        if use_concepts and concept_tokens is not None:
            block = torch.cat([block, concept_tokens(scores[b], feats[b])], dim=0)
        x = torch.cat([emb(torch.tensor([before])), block[None].to(emb.weight.dtype), emb(torch.tensor([after]))], 1)
        out = hf_model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), use_cache=True)
        n, ids = x.shape[1], []
        while True:
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos or len(ids) >= max_new_tokens:
                break
            n += 1
            out = hf_model(input_ids=torch.tensor([[nxt]]), attention_mask=torch.ones((1, n), dtype=torch.long),
                           use_cache=True, **_cache_kwargs(hf_model, out))
        answers.append(ids)
    return answers
