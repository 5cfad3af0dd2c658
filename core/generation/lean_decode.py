"""One decoding step of a Llama-family model, without transformers' generic forward.

At batch 1 on a CPU a decoding step is a sequence of small matrix-vector products over
weights that must be read from memory once per step: the reads are the floor. transformers'
forward adds, per step, mask construction, output dataclasses, hooks and per-layer dispatch
on top (at batch 1 on the bundled model, fp32, 2 cores: ~40 ms a step where the products
alone take ~23 ms). This step makes the same computation with the same weights and the same
KV cache, and nothing else: an RMS norm, the q/k/v products, RoPE (the model's own rotary
module, so its scaling variants hold), the new keys and values appended to the cache,
grouped-query attention in one `scaled_dot_product_attention` call (the query heads that
share a key head are laid out as that head's queries), the output product, the SiLU MLP,
and the logits of the one new position. Prefill (many tokens at once, where the products
dominate) still goes through transformers' forward; both write the same cache.

It is used only where it is known to compute what transformers computes: a `llama` model
with no biases, SiLU, no tensor-parallel slicing, on the CPU (the GPU path was measured with
transformers' forward; nothing here has been measured there). Anything else returns None
from `lean_decoder` and the batcher keeps transformers' forward. `tests/test_lean_decode.py`
checks the logits against transformers' on a left-padded batch of the bundled model.

The product kernel and its packed, fused copies are chosen in `core/generation/products.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from core.generation.kv_cache import cache_layers
from core.generation.products import (
    TIMED_LAYERS,
    OneDnnLinear,
    PackedCopies,
    choose_products,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Layer:
    norm_in: torch.Tensor
    norm_out: torch.Tensor
    eps_in: float
    eps_out: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    # With packed copies (which are copies anyway), the q/k/v products as one and the
    # gate/up products as one: fewer, larger products (`_fused`).
    qkv: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None


class LeanDecoder:
    """`decoder(tokens, mask, cache) -> logits`: one step for every row of a batch.

    `tokens` [rows]: the token each row feeds; `mask` [rows, T+1]: 1 where a row has a real
    token, the new one included (rows are left padded); `cache`: the batch's KV cache
    (`core.generation.kv_cache`), grown by one position. Returns the logits [rows, vocab].
    """

    def __init__(self, model: Any, products: str = "auto") -> None:
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.final_eps = float(inner.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.scale = float(inner.layers[0].self_attn.scaling)
        self.layers = [
            _Layer(
                norm_in=layer.input_layernorm.weight,
                norm_out=layer.post_attention_layernorm.weight,
                eps_in=float(layer.input_layernorm.variance_epsilon),
                eps_out=float(layer.post_attention_layernorm.variance_epsilon),
                q=layer.self_attn.q_proj.weight,
                k=layer.self_attn.k_proj.weight,
                v=layer.self_attn.v_proj.weight,
                o=layer.self_attn.o_proj.weight,
                gate=layer.mlp.gate_proj.weight,
                up=layer.mlp.up_proj.weight,
                down=layer.mlp.down_proj.weight,
            )
            for layer in inner.layers
        ]
        weights = [self.lm_head]
        for layer in self.layers:
            weights += [layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down]
        # The packed copies are timed as the step would use them: fused (`_fused`).
        may_pack = products in ("auto", "onednn-packed")
        timed_layers = [_fused(layer) for layer in self.layers[:TIMED_LAYERS]] if may_pack else []
        packed_sample = [self.lm_head]
        for fused in timed_layers:
            packed_sample += [fused.qkv, fused.o, fused.gate_up, fused.down]
        copies = PackedCopies()
        self.products, self._linear = choose_products(weights, products, copies, packed_sample)
        if self.products == "onednn-packed":  # this step's own copies; prefill keeps the plain
            self.lm_head = copies(self.lm_head)
            self.layers = [
                _packed(timed_layers[i] if i < len(timed_layers) else _fused(layer), copies)
                for i, layer in enumerate(self.layers)
            ]

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        rows = tokens.shape[0]
        linear = self._linear
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        positions = mask.sum(-1, keepdim=True) - 1  # the new token's position in each row
        hidden = self.embed(tokens)  # [rows, hidden]
        cos, sin = self.rotary(hidden[:, None, :], positions)  # [rows, 1, dim]
        # Left padding: masked out for every head; a batch with none needs no mask at all.
        padding = None
        if not bool(mask.all()):
            padding = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
            padding = padding.masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        half = dim // 2
        for weights, layer in zip(self.layers, cache_layers(cache), strict=True):
            normed = _rms_norm(hidden, weights.norm_in, weights.eps_in)
            if weights.qkv is not None:
                projected = linear(normed, weights.qkv).view(rows, heads + 2 * kv_heads, dim)
                both = projected[:, : heads + kv_heads]
                value = projected[:, heads + kv_heads :, None, :]
            else:
                query = linear(normed, weights.q).view(rows, heads, dim)
                key = linear(normed, weights.k).view(rows, kv_heads, dim)
                value = linear(normed, weights.v).view(rows, kv_heads, 1, dim)
                both = torch.cat([query, key], 1)
            # RoPE on queries and keys together (rotate_half, as transformers' Llama does).
            turned = torch.cat([-both[..., half:], both[..., :half]], -1)
            both = both * cos + turned * sin
            keys, values = layer.update(both[:, heads:, None, :], value)
            # The `group` query heads that share a key head are that head's `group` queries.
            attended = F.scaled_dot_product_attention(
                both[:, :heads].reshape(rows, kv_heads, group, dim),
                keys,
                values,
                attn_mask=padding,
                scale=self.scale,
            )
            hidden = hidden + linear(attended.reshape(rows, heads * dim), weights.o)
            normed = _rms_norm(hidden, weights.norm_out, weights.eps_out)
            if weights.gate_up is not None:
                gate, up = linear(normed, weights.gate_up).chunk(2, -1)
                gated = F.silu(gate) * up
            else:
                gated = F.silu(linear(normed, weights.gate)) * linear(normed, weights.up)
            hidden = hidden + linear(gated, weights.down)
        hidden = _rms_norm(hidden, self.final_norm, self.final_eps)
        return linear(hidden, self.lm_head)


def _fused(layer: _Layer) -> _Layer:
    """`layer` with its q/k/v weights concatenated into one (so are gate/up): one product
    each instead of three and two, 211 -> 121 products a step for the bundled model (the
    products' count, not only their bytes, costs at batch 1). The separate ones stay for
    the plain kernels, which would need a copy to fuse."""
    with torch.inference_mode():
        qkv = torch.cat([layer.q, layer.k, layer.v])
        gate_up = torch.cat([layer.gate, layer.up])
    return replace(layer, qkv=qkv, gate_up=gate_up)


def _packed(layer: _Layer, copies: PackedCopies) -> _Layer:
    """The fused layer (`_fused`) with packed copies of its products' weights."""
    assert layer.qkv is not None and layer.gate_up is not None
    return replace(
        layer,
        qkv=copies(layer.qkv, keep=False),
        o=copies(layer.o),
        gate_up=copies(layer.gate_up, keep=False),
        down=copies(layer.down),
    )


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the model's dtype."""
    if hidden.dtype == torch.float32:
        return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), None, eps)
    return weight * normed.to(hidden.dtype)


def lean_decoder(model: Any, products: str = "auto") -> LeanDecoder | None:
    """The lean step for `model`, or None (with the reason logged) where it does not apply;
    `products`: see `choose_products`."""
    reason = _unsupported(model)
    if reason:
        log.info("decoding through transformers' forward: %s", reason)
        return None
    return LeanDecoder(model, products)


def _unsupported(model: Any) -> str:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} is not 'llama'"
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "the model has no parameters"
    if device.type != "cpu":
        return f"the lean step is used on the CPU only (the model is on {device.type})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model has biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not SiLU"
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "the model slices its products (pretraining_tp)"
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "rotary_emb"):
        return "the model's modules are not laid out as transformers' Llama"
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
        projections += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(getattr(p, "bias", None) is not None for p in projections):
            return "the model has biases"
        if not all(type(p) in (torch.nn.Linear, OneDnnLinear) for p in projections):
            return "the model's products are not plain Linear layers (adapters or quantisation)"
    return ""
