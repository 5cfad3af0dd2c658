"""Matrix products of a decoding step on the CPU: which kernel, and packed copies.

The products (`F.linear`, i.e. MKL's sgemm/sgemv on a CPU build of torch) are the step's
cost, and how fast they run depends on the machine: on an AMD EPYC, MKL's fp32 products
over this model's weights read 12 GB/s where a plain sum reads 36, and oneDNN's
(`torch.ops.mkldnn._linear_pointwise`, on the same plain weights, no copy) ran the same
products 1.5-2.3x as fast at 1 to 64 rows; on copies of the weights reordered into
oneDNN's blocked layout (`pack`, made for 8 rows; any count works) they ran 1.2x (1 row)
to 1.5x (8 rows) faster again, and the engine decoded 1.25-1.6x as many tokens/s at batch
1 to 32. The packed copies are copies anyway, so the step makes them fused
(`lean_decode._fused`): q/k/v as one product and gate/up as one (211 -> 121 products a
step): a batch-1 step took 20-25 % less time (fp32, best of 6: 25.8 -> 20.8 ms and 31.9 ->
24.8 ms in two runs; bf16 16.1 -> 14.2 ms), 8 and 32 rows about the same. So the decoder
times the kernels on the model's own weights when it is made (`choose_products`, about a
second) and keeps the fastest; the choice is logged. The packed copies double the weights'
memory (prefill and training keep the plain weights), so they are only made where they take
at most a quarter of the memory available.

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
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PRODUCT_KERNELS = ("auto", "mkl", "onednn", "onednn-packed")
TIMED_ROWS = (1, 8)  # the batch sizes `choose_products` times the kernels at
TIMING_ROUNDS = 3  # each kernel's best of this many passes over the weights
TIMED_LAYERS = 8  # the layers whose products are timed (a sample: the layers are alike)
TIMED_WEIGHTS = 1 + 7 * TIMED_LAYERS  # the output product and 8 layers' (all of a smaller one's)
ONEDNN_MARGIN = 0.9  # oneDNN is kept when it takes at most this share of F.linear's time
# Packed copies (oneDNN's blocked layout, made for this many rows; a hint, any count works)
# are kept when they take at most PACKED_MARGIN of the better plain kernel's time, and when the
# copies take at most PACKED_MEMORY_SHARE of the memory available (they double the
# weights' memory: prefill and training keep the plain ones).
PACKED_ROWS = 8
PACKED_MARGIN = 0.9
PACKED_MEMORY_SHARE = 0.25


def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
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
        return bool(torch.allclose(onednn_linear(probe, probe).float(), expected))
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout, for `onednn_linear` (a copy)."""
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
            packed = onednn_linear(inputs, pack(weight)).float()
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


def _timed(
    kernels: dict[str, tuple[Linear, Sequence[torch.Tensor]]],
) -> dict[str, list[float]]:
    """Each kernel's milliseconds over its operands at each of TIMED_ROWS."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for rows in TIMED_ROWS:
        for linear, operands in kernels.values():  # warm each up
            _pass_ms(linear, operands[:8], rows)
        for name, (linear, operands) in kernels.items():
            times[name].append(_pass_ms(linear, operands, rows))
    return times


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
        return kernel, onednn_linear
    # A big model's weights are timed in part: the layers are alike, and the sample still
    # reads more than a cache holds (the first weight is the wide output product).
    sample = list(weights[:TIMED_WEIGHTS])
    kernels: dict[str, tuple[Linear, Sequence[torch.Tensor]]] = {
        "mkl": (F.linear, sample),
        "onednn": (onednn_linear, sample),
    }
    fits = _packing_fits(weights)
    if fits and packing_available(dtype):
        copies = packed or PackedCopies()
        to_pack = sample if packed_sample is None else packed_sample
        kernels["onednn-packed"] = (onednn_linear, [copies(w) for w in to_pack])
    times = _timed(kernels)
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
    return chosen, (F.linear if chosen == "mkl" else onednn_linear)


def route_products(model: Any, kernel: str) -> int:
    """Make the model's own projections (prefill and `generate` go through transformers'
    forward) use `kernel`, the one the lean step chose, when that is oneDNN: it was as much faster
    at prefill sizes (1.7x at 32 to 512 rows here). Where autograd is on (training), they
    keep F.linear, which it can differentiate. Returns how many layers were routed."""
    if not kernel.startswith("onednn"):
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
        return onednn_linear(inputs, self.weight)
