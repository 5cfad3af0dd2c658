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

The products (`F.linear`, i.e. MKL's sgemm/sgemv on a CPU build of torch) are the step's
cost, and how fast they run depends on the machine: on an AMD EPYC, MKL's fp32 products
over this model's weights read 12 GB/s where a plain sum reads 36, and oneDNN's
(`torch.ops.mkldnn._linear_pointwise`, on the same plain weights, no copy) ran the same
products 1.5-2.3x as fast at 1 to 64 rows; on copies of the weights reordered into
oneDNN's blocked layout (`pack`, made for 8 rows; any count works) they ran 1.2x (1 row)
to 1.5x (8 rows) faster again, and the engine decoded 1.25-1.6x as many tokens/s at batch
1 to 32. The packed copies are copies anyway, so they are made fused: q/k/v as one product
and gate/up as one (211 -> 121 products a step): a batch-1 step took 20-25 % less time
(fp32, best of 6: 25.8 -> 20.8 ms and 31.9 -> 24.8 ms in two runs; bf16 16.1 -> 14.2 ms),
8 and 32 rows about the same. So the decoder times the kernels on the model's own weights
when it is made (`choose_products`, about a second) and keeps the fastest; the choice is
logged. The packed copies double the weights' memory (prefill and training keep the plain
weights), so they are only made where they take at most a quarter of the memory available.

Tried and left out: at 4-16 rows MKL's sgemm is slow on an Intel Xeon too (8 rows cost 2x
one row). On that Xeon an earlier benchmark saw every engine step slow down once packed
copies existed (batch 1 26.7 -> 17.8 tok/s), but that benchmark loaded the model on one
thread and decoded on another (the 30-50 % slowdown `bench/decode.py` now avoids), so it
may not hold; the timing at load decides on each machine. Packed for 1 row, the copies
were no faster here. MKL's packed sgemm (`mkl._mkl_linear`) helps only at the exact row
count it was packed for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from core.generation.kv_cache import cache_layers

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PRODUCT_KERNELS = ("auto", "mkl", "onednn", "onednn-packed")
TIMED_ROWS = (1, 8)  # the batch sizes `choose_products` times the kernels at
TIMING_ROUNDS = 3  # each kernel's best of this many passes over the weights
TIMED_LAYERS = 8
TIMED_WEIGHTS = 1 + 7 * TIMED_LAYERS  # the output product and 8 layers' (all of a smaller one's)
ONEDNN_MARGIN = 0.9  # oneDNN is kept when it takes at most this share of F.linear's time
# Packed copies (oneDNN's blocked layout, made for this many rows; a hint, any count works)
# are kept when they take at most PACKED_MARGIN of the plain weights' time, and when the
# copies take at most PACKED_MEMORY_SHARE of the memory available (they double the
# weights' memory: prefill and training keep the plain ones).
PACKED_ROWS = 8
PACKED_MARGIN = 0.9
PACKED_MEMORY_SHARE = 0.25


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(inputs, weight, None, "none", [], "")
    return result


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has oneDNN's fused linear and it runs for `dtype` (a CPU build
    with mkldnn; oneDNN has no fp16 product on many CPUs)."""
    try:
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return False
        probe = torch.ones(2, 4, dtype=dtype)
        expected = F.linear(probe, probe).float()
        return bool(torch.allclose(_onednn_linear(probe, probe).float(), expected))
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout, for `_onednn_linear` (a copy)."""
    with torch.inference_mode():
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS)
    return packed


class PackedCopies:
    """Packed copies (`pack`) by weight, each made once: the ones `choose_products` made to
    time them are the step's own when it keeps them (~0.2 s of the bundled model's load)."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, weight: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """`keep=False` for a weight made only to be packed (a fused one): not kept here,
        so it is freed once packed."""
        made = self._made.get(id(weight))
        if made is None and not keep:
            return pack(weight)
        if made is None:  # the weight is kept with its copy: its id stays its own
            made = self._made[id(weight)] = (weight, pack(weight))
        return made[1]


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's packed weights work here for `dtype` (products checked)."""
    if not onednn_available(dtype):
        return False
    try:
        weight, inputs = torch.randn(16, 8).to(dtype), torch.randn(3, 8).to(dtype)
        with torch.inference_mode():
            packed = _onednn_linear(inputs, pack(weight)).float()
            return bool(torch.allclose(packed, F.linear(inputs, weight).float(), atol=1e-2))
    except (AttributeError, RuntimeError):
        return False


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _packing_fits(weights: Sequence[torch.Tensor]) -> bool:
    available = available_memory_bytes()
    size = sum(w.numel() * w.element_size() for w in weights)
    return available is not None and size <= PACKED_MEMORY_SHARE * available


def _pass_ms(linear: Linear, weights: Sequence[torch.Tensor], rows: int) -> float:
    """Milliseconds of one product per weight at `rows` rows, the best of TIMING_ROUNDS."""
    inputs = {w.shape[1]: torch.ones(rows, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(TIMING_ROUNDS):
            started = time.perf_counter()
            for weight in weights:
                linear(inputs[weight.shape[1]], weight)
            best = min(best, time.perf_counter() - started)
    return best * 1000


def choose_products(
    weights: Sequence[torch.Tensor],
    kernel: str = "auto",
    packed: PackedCopies | None = None,
    packed_sample: Sequence[torch.Tensor] | None = None,
) -> tuple[str, Linear]:
    """The product kernel for `weights` (on the CPU): `kernel` "mkl" (`F.linear`), "onednn"
    (on the plain weights), "onednn-packed" (on copies of them in oneDNN's blocked layout,
    `pack`: the caller makes them, `packed` keeps those made here), or "auto": all timed on
    these weights at TIMED_ROWS rows (the packed copies on `packed_sample` where given: the
    sampled products' weights as the packed step has them), oneDNN kept where it is clearly
    faster than MKL and the packed copies where they are clearly faster than the plain
    weights and fit in memory (the module's docstring)."""
    if kernel not in PRODUCT_KERNELS:
        raise ValueError(f"product kernel {kernel!r} is not one of {', '.join(PRODUCT_KERNELS)}")
    if kernel == "mkl" or not weights:
        return "mkl", F.linear
    dtype = weights[0].dtype
    if not onednn_available(dtype):
        if kernel != "auto":
            log.warning("oneDNN has no %s product here: decoding products go through MKL", dtype)
        return "mkl", F.linear
    if kernel == "onednn-packed" and not packing_available(dtype):
        log.warning("oneDNN cannot pack %s weights here: its products use them as they are", dtype)
        kernel = "onednn"
    if kernel != "auto":
        return kernel, _onednn_linear
    # A big model's weights are timed in part: the layers are alike, and the sample still
    # reads more than a cache holds (the first weight is the wide output product).
    sample = list(weights[:TIMED_WEIGHTS])
    kernels: dict[str, tuple[Linear, Sequence[torch.Tensor]]] = {
        "mkl": (F.linear, sample),
        "onednn": (_onednn_linear, sample),
    }
    fits = _packing_fits(weights)
    if fits and packing_available(dtype):
        copies = packed or PackedCopies()
        to_pack = sample if packed_sample is None else packed_sample
        kernels["onednn-packed"] = (_onednn_linear, [copies(w) for w in to_pack])
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for rows in TIMED_ROWS:
        for linear, operands in kernels.values():  # warm each up
            _pass_ms(linear, operands[:8], rows)
        for name, (linear, operands) in kernels.items():
            times[name].append(_pass_ms(linear, operands, rows))
    total = {name: sum(t) for name, t in times.items()}
    chosen = "onednn" if total["onednn"] <= ONEDNN_MARGIN * total["mkl"] else "mkl"
    # Packed copies against the better plain kernel: in bf16 here oneDNN on the plain
    # weights was no faster than MKL while the packed copies took 0.55x MKL's time.
    if total.get("onednn-packed", float("inf")) <= PACKED_MARGIN * total[chosen]:
        chosen = "onednn-packed"
    log.info(
        "decoding products: %s (%d of a step's products, ms at %s rows: %s%s)",
        chosen,
        len(sample),
        "/".join(str(r) for r in TIMED_ROWS),
        ", ".join(f"{name} {'/'.join(f'{t:.1f}' for t in ts)}" for name, ts in times.items()),
        ""
        if fits
        else "; no packed copies: they would take over a quarter of the free memory, or it "
        "cannot be read",
    )
    return chosen, (F.linear if chosen == "mkl" else _onednn_linear)


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


def route_products(model: Any, decoder: LeanDecoder) -> int:
    """Make the model's own projections (prefill and `generate` go through transformers'
    forward) use the kernel `decoder` chose, when that is oneDNN: it was as much faster
    at prefill sizes (1.7x at 32 to 512 rows here). Where autograd is on (training), they
    keep F.linear, which it can differentiate. Returns how many layers were routed."""
    if not decoder.products.startswith("onednn"):
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.bias is None:
            module.__class__ = OneDnnLinear  # its class, not a bound method: no cycle
            routed += 1
    return routed


class OneDnnLinear(torch.nn.Linear):
    """A Linear layer without bias whose product goes through oneDNN (`route_products`)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (inputs.requires_grad or self.weight.requires_grad):
            return F.linear(inputs, self.weight)
        return _onednn_linear(inputs, self.weight)


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
