"""LLaMA 4's traced forms (families/llama4.py says why): each replacement computes what transformers' does."""

from __future__ import annotations

import contextlib

import torch

from llama_export.families.routed_experts import routed_experts


def _rotary_forward(self, x, position_ids):
    """(cos, sin) of each position's angles, stacked on a last axis, where transformers returns them as complex."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles[:, :, None, :, 0], angles[:, :, None, :, 1]
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


def _apply_rotary_emb(xq, xk, angles):
    return _rotate_pairs(xq, angles), _rotate_pairs(xk, angles)


def _moe_forward(self, hidden_states):
    """transformers' Llama4TextMoe with the experts routed: the top-1 expert's sigmoid score scales the token
    (where transformers scales every expert's copy, zero for the unchosen), then only that expert runs. The shared
    expert reads the hidden states as they come (a MatMul like any layer's, packed and quantized as theirs); the
    router reads them flat (a Gemm, which INT4 leaves in float: a 4-bit router would move tokens between experts)."""
    shared = self.shared_expert(hidden_states).reshape(-1, self.hidden_dim)
    flat = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(flat, self.router.weight, self.router.bias)
    top_logit = router_logits.max(dim=-1, keepdim=True).values
    scaled = flat * torch.sigmoid(top_logit.float()).to(flat.dtype)
    routed = routed_experts(scaled, router_logits, self.experts.gate_up_proj, self.experts.down_proj)
    return shared + routed, router_logits


def _chunked_mask(config, inputs_embeds, attention_mask, cache, position_ids=None, **_):
    """The chunked-attention mask [batch, 1, query, key] as booleans: causal, within the chunk of the query's
    position counted from the first unpadded token, and not on padding (transformers' rule, in plain tensor ops)."""
    query = inputs_embeds.shape[1]
    total = attention_mask.shape[1]
    past = total - query
    padding = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)  # left padding per row [batch, 1]
    keys = torch.arange(total, device=attention_mask.device)[None, None, :]
    queries = (torch.arange(query, device=attention_mask.device) + past)[None, :, None]
    chunk = config.attention_chunk_size
    same_chunk = (keys - padding[:, :, None]) // chunk == (queries - padding[:, :, None]) // chunk
    allowed = (keys <= queries) & same_chunk & attention_mask.bool()[:, None, :]
    return allowed[:, None, :, :]


@contextlib.contextmanager
def patched(module, experts_class: str):
    replacements = [(module, "apply_rotary_emb", _apply_rotary_emb),
                    (module.Llama4TextRotaryEmbedding, "forward", _rotary_forward),
                    (getattr(module, experts_class), "forward", _moe_forward),
                    (module, "create_chunked_causal_mask", _chunked_mask)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
