"""The lean decoding step (core/generation/lean_decode.py) computes what transformers'
forward computes: the same logits and the same KV cache, step after step, on a left-padded
batch of prompts of different lengths; on the tiny random-weight Llama and on the bundled
SmolLM2. Models it does not know get transformers' forward."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import core.generation.products as products_module
from core.generation.engine import GenerationRequest
from core.generation.kv_cache import cache_layers, new_cache
from core.generation.lean_decode import lean_decoder
from core.generation.products import (
    OneDnnLinear,
    choose_products,
    onednn_available,
    pack,
    packing_available,
    route_products,
)
from core.generation.transformers_engine import TransformersEngine

PROMPTS = [[5, 17, 300, 42, 9, 1000, 77], [88, 12], [400, 401, 402, 403]]


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def prefill(model: Any, prompts: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    cache = new_cache(model.config)
    with torch.inference_mode():
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **cache_argument(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return cache, mask, output.logits[:, -1].argmax(-1)


def transformers_step(model: Any, tokens: Any, mask: Any, cache: Any) -> Any:
    with torch.inference_mode():
        output = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=mask[:, :-1].sum(-1, keepdim=True),
            **cache_argument(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return output.logits[:, -1]


def small_llama(layers: int, **change: Any) -> Any:
    """A random-weight Llama of a few dimensions (`change`: config fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        **change,
    )
    return LlamaForCausalLM(config)


def assert_same_steps(model: Any, steps: int, tolerance: float, products: str = "auto") -> None:
    lean = lean_decoder(model, products)
    assert lean is not None
    theirs, mask, tokens = prefill(model, PROMPTS, pad_id=0)
    ours, _mask, _tokens = prefill(model, PROMPTS, pad_id=0)
    for _ in range(steps):
        mask = F.pad(mask, (0, 1), value=1)
        expected = transformers_step(model, tokens, mask, theirs)
        got = lean(tokens, mask, ours)
        assert got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        tokens = expected.argmax(-1)
    for mine, reference in zip(cache_layers(ours), cache_layers(theirs), strict=True):
        assert mine.keys.shape == reference.keys.shape
        torch.testing.assert_close(mine.keys, reference.keys, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(mine.values, reference.values, atol=tolerance, rtol=tolerance)


def skip_unless_available(products: str) -> None:
    if products == "onednn" and not onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    if products == "onednn-packed" and not packing_available():
        pytest.skip("this torch cannot pack weights for oneDNN")


@pytest.mark.parametrize("products", ["auto", "mkl", "onednn", "onednn-packed"])
def test_the_lean_step_matches_transformers_on_a_left_padded_batch(
    tiny_engine: TransformersEngine, products: str
) -> None:
    """With every product kernel (the one the decoder would choose by timing, MKL through
    F.linear, oneDNN's fused linear on the plain weights and on packed copies)."""
    skip_unless_available(products)
    assert_same_steps(tiny_engine.model, steps=12, tolerance=1e-5, products=products)


def test_packed_copies_are_the_lean_steps_own_and_compute_every_row_count() -> None:
    """The packed copies replace the step's operands, not the model's weights (prefill and
    training use those), and give F.linear's product at any number of rows, not only the
    8 they were packed for."""
    skip_unless_available("onednn-packed")
    model = small_llama(layers=2)
    lean = lean_decoder(model, "onednn-packed")
    assert lean is not None and lean.products == "onednn-packed"
    layer = model.model.layers[0]
    fused = lean.layers[0].qkv  # q, k and v in one product
    assert fused is not None and fused.is_mkldnn and lean.layers[0].gate_up is not None
    assert not layer.self_attn.q_proj.weight.is_mkldnn
    assert lean.layers[0].o is not layer.self_attn.o_proj.weight and lean.layers[0].o.is_mkldnn
    weight = torch.randn(48, 16)
    packed = pack(weight)
    with torch.inference_mode():
        for rows in (1, 3, 8, 13, 64):
            inputs = torch.randn(rows, 16)
            torch.testing.assert_close(
                products_module.onednn_linear(inputs, packed), F.linear(inputs, weight)
            )


def test_no_packed_copies_where_they_would_crowd_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timing decides ("auto"), but the plain weights are kept when copies of them would
    take over a quarter of the memory available (or when that cannot be read), however
    much faster they are."""
    skip_unless_available("onednn-packed")
    weights = [torch.randn(256, 128) for _ in range(4)]
    size = sum(w.numel() * w.element_size() for w in weights)

    def timed(linear: Any, operands: Any, rows: int) -> float:
        if operands[0].is_mkldnn:
            return 1.0  # packed copies: ten times as fast as the plain weights
        return 20.0 if linear is F.linear else 10.0

    monkeypatch.setattr(products_module, "_pass_ms", timed)
    monkeypatch.setattr(products_module, "available_memory_bytes", lambda: 100 * size)
    assert choose_products(weights, "auto")[0] == "onednn-packed"
    monkeypatch.setattr(products_module, "available_memory_bytes", lambda: 3 * size)
    assert choose_products(weights, "auto")[0] == "onednn"
    monkeypatch.setattr(products_module, "available_memory_bytes", lambda: None)
    assert choose_products(weights, "auto")[0] == "onednn"


def test_packed_copies_are_chosen_when_the_plain_kernels_are_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN on the plain weights no faster than MKL (as in bf16 on an EPYC) does not rule
    out the packed copies: they are weighed against the better plain kernel."""
    skip_unless_available("onednn-packed")
    weights = [torch.randn(256, 128) for _ in range(4)]

    def timed(linear: Any, operands: Any, rows: int) -> float:
        return 5.5 if operands[0].is_mkldnn else 10.0

    monkeypatch.setattr(products_module, "_pass_ms", timed)
    monkeypatch.setattr(products_module, "available_memory_bytes", lambda: 1 << 40)
    assert choose_products(weights, "auto")[0] == "onednn-packed"


def test_the_engine_prefills_with_the_kernel_its_lean_step_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the lean step keeps oneDNN, the batcher routes the model's own projections
    (prefill, `generate`) to it too."""
    if not onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    import core.generation.batcher as batcher_module
    from core.generation.batcher import ContinuousBatcher

    monkeypatch.setattr(batcher_module, "lean_decoder", lambda m: lean_decoder(m, "onednn"))
    model = small_llama(layers=2)
    ContinuousBatcher(
        model,
        executor=None,  # type: ignore[arg-type]  # not run: only made
        pad_id=0,
        stop_ids=[],
        decode=str,
        max_batch_size=2,
        repetition_penalty=1.0,
    )
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDnnLinear for m in linears)


def test_the_product_kernel_is_one_it_knows() -> None:
    weights = [torch.ones(8, 4), torch.ones(4, 8)]
    assert choose_products(weights, "mkl")[0] == "mkl"
    assert choose_products(weights, "auto")[0] in ("mkl", "onednn")
    with pytest.raises(ValueError, match="product kernel 'cublas'"):
        choose_products(weights, "cublas")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["auto", "onednn", "onednn-packed"])
def test_the_chosen_kernel_computes_the_product_in_every_dtype(
    dtype: torch.dtype, kernel: str
) -> None:
    """oneDNN has no fp16 product on many CPUs: asked for it there, the decoder keeps MKL
    instead of failing to load."""
    weight, inputs = torch.randn(16, 8).to(dtype), torch.randn(3, 8).to(dtype)
    name, linear = choose_products([weight], kernel)
    operand = pack(weight) if name == "onednn-packed" else weight
    with torch.inference_mode():
        torch.testing.assert_close(linear(inputs, operand), F.linear(inputs, weight))


async def test_the_engine_decodes_through_the_lean_step(tiny_engine: TransformersEngine) -> None:
    """Every decoding step of a reply goes through the lean step, not only exists."""
    engine = TransformersEngine(
        tiny_engine.model, tiny_engine.tokenizer, context_tokens=512, max_batch_size=4
    )
    lean = engine.batcher.lean
    assert lean is not None
    calls = 0

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return lean(*args)

    engine.batcher.lean = counting  # type: ignore[assignment]
    turns: list[Any] = [{"role": "user", "content": "where is my parcel"}]
    reply = await engine.stream(GenerationRequest("lean", turns, 12), lambda _t: None)
    assert reply.new_tokens > 1
    assert calls == engine.batcher.decode_steps > 0


@pytest.mark.slow
@pytest.mark.parametrize("products", ["mkl", "onednn", "onednn-packed"])
def test_the_lean_step_matches_transformers_on_the_bundled_model(
    bundled_engine: TransformersEngine, products: str
) -> None:
    skip_unless_available(products)
    assert bundled_engine.batcher.lean is not None
    assert_same_steps(bundled_engine.model, steps=8, tolerance=1e-4, products=products)


@pytest.mark.parametrize(
    "change",
    [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}, {"pretraining_tp": 2}],
)
def test_models_it_does_not_know_keep_transformers_forward(change: dict[str, Any]) -> None:
    assert lean_decoder(small_llama(layers=1, **change)) is None


def test_a_model_of_another_family_keeps_transformers_forward() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert lean_decoder(model) is None


def test_projections_routed_to_onednn_compute_the_same_and_still_train() -> None:
    """Prefill goes through the model's own Linear layers: routed to oneDNN they give what
    F.linear gives, and where autograd is on (training) they stay differentiable."""
    if not onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    model = small_llama(layers=2)
    ids = torch.tensor([[3, 9, 27, 5, 40]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    decoder = lean_decoder(model, "onednn")
    assert decoder is not None
    assert route_products(model, decoder.products) == 2 * 7 + 1  # 7 projections a layer, lm_head
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    mkl = lean_decoder(small_llama(layers=2), "mkl")
    assert mkl is not None and route_products(model, mkl.products) == 0
    assert lean_decoder(model, "mkl") is not None  # routed layers are still known ones


def test_the_copies_timed_at_load_are_the_ones_the_step_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each weight is packed once: the copies made to time the packed kernel are the step's
    own when it keeps them (packing them again cost ~0.2 s of the bundled model's load)."""
    skip_unless_available("onednn-packed")
    made: list[torch.Tensor] = []
    packing = products_module.pack

    def counted(weight: torch.Tensor) -> torch.Tensor:
        made.append(weight)
        return packing(weight)

    def timed(linear: Any, operands: Any, rows: int) -> float:
        if operands[0].is_mkldnn:
            return 1.0
        return 20.0 if linear is F.linear else 10.0

    monkeypatch.setattr(products_module, "pack", counted)
    monkeypatch.setattr(products_module, "_pass_ms", timed)
    monkeypatch.setattr(products_module, "available_memory_bytes", lambda: 1 << 40)
    model = small_llama(layers=2)  # 15 products: all of them in the timed sample
    lean = lean_decoder(model, "auto")
    assert lean is not None and lean.products == "onednn-packed"
    # Each of the step's products packed once: the output one (tied to the embedding), and
    # per layer q/k/v fused, o, gate/up fused and down (packing_available's probe aside).
    config = model.config
    packed_weights = [  # packing_available's probe (8 columns) aside
        w for w in made if w.shape[1] in (config.hidden_size, config.intermediate_size)
    ]
    assert len(packed_weights) == 1 + 4 * 2
    assert len({id(w) for w in packed_weights}) == len(packed_weights)  # once each
    assert any(w is model.lm_head.weight for w in packed_weights)
    assert lean.layers[1].down.is_mkldnn and lean.lm_head.is_mkldnn
