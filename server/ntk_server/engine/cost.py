"""Cost model: flops, seconds and peak memory of a kernel request for each method.

The unit the model reasons about is the per-range factor: for each row or column range of the
block grid, what the method computes once and caches (structured: layer inputs and signals;
jacobian_contraction: the Jacobian), and then, for each block, the contraction of two ranges'
factors. AUTO (`choose_method`) takes the method with the fewest estimated seconds among those
whose peak memory fits; the scheduler's memory estimate (`estimate_memory_bytes`) is the same
model's peak.

The numbers are estimates for ranking, deterministic for a given request: no timing, no device
query. Seconds are flops over a nominal rate, divided by an efficiency per kind of work, plus a
fixed overhead per block for the Python and dispatch work that dominates tiny requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ntk_server.engine import structured
from ntk_server.engine.network import Network

AUTO = "auto"
ENGINE_METHODS = ("structured", "jacobian_contraction", "ntk_vector_products")
# A nominal matmul rate; it scales every method's seconds alike, so it only affects the
# reason line, not the choice.
NOMINAL_FLOPS_PER_S = 100e9
# Fraction of the nominal rate each kind of work reaches: large matmuls (Grams, contractions)
# run near it; vmapped per-example autograd (jacrev, jvp) runs well below it.
MATMUL_EFFICIENCY = 1.0
VMAP_AUTOGRAD_EFFICIENCY = 0.3
# Python and dispatch work per layer per block, and per output per block for NTK-vector
# products (one vjp and one vmapped jvp per output).
OVERHEAD_PER_LAYER_BLOCK_S = 50e-6
OVERHEAD_PER_OUTPUT_BLOCK_S = 2e-3
# Copies of the saved activations a vmapped autograd pass holds, and temporaries of the size
# of the output block while a block is contracted (one layer's part and its Gram).
AUTOGRAD_SAVED_COPIES = 3
BLOCK_TEMPORARY_COPIES = 3
DEFAULT_BLOCK_EXAMPLES = 1024


@dataclass(frozen=True)
class MethodCost:
    """Estimated cost of a whole request with one method."""

    method: str
    flops: float
    seconds: float
    peak_bytes: int


def _ranges(n: int, size: int) -> list[int]:
    size = max(1, min(size or DEFAULT_BLOCK_EXAMPLES, n))
    return [min(size, n - s) for s in range(0, n, size)]


def _forward_flops(plans) -> float:
    """Multiply-adds x 2 of one forward pass, per example."""
    total = 0.0
    for p in plans:
        if p.rule == structured.RULE_FALLBACK:
            total += 2 * p.param_count
        else:
            total += 2 * p.positions * p.fan_in * p.channels
    return total


def _activation_values(plans) -> int:
    """Values per example held by the forward pass (inputs and outputs of parametrised layers)."""
    return sum(math.prod(p.input_shape) + math.prod(p.output_shape) for p in plans)


def _out_values(layout: str, o: int) -> int:
    return {"full": o * o, "trace": 1, "diagonal": o}[layout]


def _tile_fraction(n: int, layout: str, o: int) -> float:
    """Share of a Gram's tiles computed for a range against itself (on or above the diagonal)."""
    t = math.ceil(n / structured.symmetric_tile_examples(layout, o))
    return (t * (t + 1) / 2) / (t * t)


# Structured ------------------------------------------------------------------------------


def _structured_range(plans, n: int, o: int, layout: str):
    """(flops, seconds, factor values, transient values) of one range's factors.

    The transient is the peak of the forward and batched backward passes beyond the factors:
    saved activations, the requested signals, and two signals in flight between layers.
    """
    fwd = _forward_flops(plans)
    first = plans[0]
    # The batched backward runs every layer's input gradient except the first layer's.
    bwd = o * (fwd - 2 * first.positions * first.fan_in * first.channels)
    # Per-position signals come from a forward pass on O copies (structured.py, NOTE
    # (batched backward)).
    copies = o if any(p.rule == structured.RULE_LAYER_JACOBIAN for p in plans) else 1
    flops = n * (copies * fwd + bwd)
    seconds = flops / NOMINAL_FLOPS_PER_S / MATMUL_EFFICIENCY
    values = requested = 0
    widest = max(math.prod(p.output_shape) for p in plans)
    for p in plans:
        signal = n * o * p.positions * p.channels
        if p.rule == structured.RULE_GRAM:
            values += n * (p.fan_in + o * p.channels)
            requested += signal
        elif p.rule == structured.RULE_READOUT:
            values += n * (p.fan_in + p.channels)
        elif p.rule == structured.RULE_LAYER_JACOBIAN:
            values += n * o * p.channels * (p.fan_in + 1)
            requested += signal
            extra = 2 * n * o * p.positions * p.channels * p.fan_in
            flops += extra
            seconds += extra / NOMINAL_FLOPS_PER_S / MATMUL_EFFICIENCY
        else:
            values += n * o * p.param_count
            extra = n * (2 * fwd + o * 2 * fwd)
            flops += extra
            seconds += extra / NOMINAL_FLOPS_PER_S / VMAP_AUTOGRAD_EFFICIENCY
    transient = copies * n * _activation_values(plans) + requested + 2 * n * o * widest
    return flops, seconds, values, transient


def _structured_block(plans, n1: int, n2: int, o: int, layout: str, same: bool) -> float:
    """Flops of one block from two ranges' factors."""
    flops = 0.0
    outer = o * o if layout == "full" else o
    for p in plans:
        if p.rule == structured.RULE_GRAM:
            flops += 2 * n1 * n2 * (p.fan_in + outer * p.channels)
        elif p.rule == structured.RULE_READOUT:
            flops += 2 * n1 * n2 * (p.fan_in + p.channels)
        elif p.rule == structured.RULE_LAYER_JACOBIAN:
            flops += 2 * n1 * n2 * outer * p.channels * (p.fan_in + 1)
        else:
            flops += 2 * n1 * n2 * outer * p.param_count
    return flops * (_tile_fraction(n1, layout, o) if same else 1.0)


# Whole requests ---------------------------------------------------------------------------


def method_costs(
    net: Network,
    n1: int,
    n2: int | None,
    layout: str,
    dtype_itemsize: int,
    block_rows: int = 0,
    block_cols: int = 0,
    batch_diagonal: bool = False,
    cache_bytes: int | None = None,
) -> dict[str, MethodCost]:
    """Estimated cost of K(x1, x2) for every engine method; n2 None means the Gram of x1.

    Assumes blocks walked as in blocks.plan_kernel and a factor cache of `cache_bytes`
    (None: large enough to keep every range's factors for the whole request).
    """
    plans = structured.plan_layers(net, layout)
    o, p_total = net.output_size, net.parameter_count
    symmetric = n2 is None and not batch_diagonal
    rows = _ranges(n1, block_rows)
    cols = (
        rows if symmetric or batch_diagonal else _ranges(n2 if n2 is not None else n1, block_cols)
    )
    pairs = [
        (i, j, a, b)
        for i, a in enumerate(rows)
        for j, b in enumerate(cols)
        if not batch_diagonal and (not symmetric or j >= i)
    ]
    if batch_diagonal:
        pairs = [(i, i, a, a) for i, a in enumerate(rows)]
    out_block = max(a * (1 if batch_diagonal else b) for _, _, a, b in pairs) * _out_values(
        layout, o
    )
    fwd = _forward_flops(plans)
    item = dtype_itemsize
    range_sets = [rows] if symmetric or batch_diagonal else [rows, cols]
    costs = {}

    # structured: factors once per range, a Gram contraction per block.
    flops = seconds = 0.0
    factor_values = []
    transient = 0
    for ranges in range_sets:
        for n in ranges:
            f, s, v, t = _structured_range(plans, n, o, layout)
            flops, seconds = flops + f, seconds + s
            factor_values.append(v)
            transient = max(transient, t)
    for _, _, a, b in pairs:
        if batch_diagonal:
            block = _structured_block(plans, a, 1, o, layout, False)
        else:
            block = _structured_block(plans, a, b, o, layout, symmetric and a == b)
        flops += block
        seconds += block / NOMINAL_FLOPS_PER_S / MATMUL_EFFICIENCY
        seconds += OVERHEAD_PER_LAYER_BLOCK_S * len(plans)
    costs["structured"] = _finish(
        "structured", flops, seconds, factor_values, transient, out_block, item, cache_bytes,
        # A Gram of one range is contracted tile by tile straight into the output block.
        0 if symmetric else BLOCK_TEMPORARY_COPIES,
    )  # fmt: skip

    # jacobian_contraction: per-range Jacobians by vmap(jacrev), contracted per block.
    flops = seconds = 0.0
    factor_values, transient = [], 0
    for ranges in range_sets:
        for n in ranges:
            f = n * (fwd + o * 2 * fwd)
            flops, seconds = flops + f, seconds + f / NOMINAL_FLOPS_PER_S / VMAP_AUTOGRAD_EFFICIENCY
            factor_values.append(n * o * p_total)
            transient = max(transient, 2 * n * o * p_total + n * o * _activation_values(plans))
    outer = o * o if layout == "full" else o
    for _, _, a, b in pairs:
        block = 2 * a * (1 if batch_diagonal else b) * outer * p_total
        flops += block
        seconds += block / NOMINAL_FLOPS_PER_S / MATMUL_EFFICIENCY
        seconds += OVERHEAD_PER_LAYER_BLOCK_S * len(net.param_shapes)
    costs["jacobian_contraction"] = _finish(
        "jacobian_contraction", flops, seconds, factor_values, transient, out_block, item,
        cache_bytes, BLOCK_TEMPORARY_COPIES,
    )  # fmt: skip

    # ntk_vector_products: per block and output, vjps over x2 then jvps through f(x1).
    flops = seconds = 0.0
    transient = 0
    for _, _, a, b in pairs:
        pairs_ab = a if batch_diagonal else a * b
        f = o * (3 * fwd * b + 3 * fwd * pairs_ab)
        flops += f
        seconds += f / NOMINAL_FLOPS_PER_S / VMAP_AUTOGRAD_EFFICIENCY
        seconds += OVERHEAD_PER_OUTPUT_BLOCK_S * o
        transient = max(
            transient,
            b * p_total + pairs_ab * _activation_values(plans) * AUTOGRAD_SAVED_COPIES,
        )
    costs["ntk_vector_products"] = _finish(
        "ntk_vector_products", flops, seconds, [], transient, out_block * o, item, cache_bytes,
        BLOCK_TEMPORARY_COPIES,
    )  # fmt: skip
    return costs


def _finish(
    method, flops, seconds, factor_values, transient, out_block, item, cache_bytes, temporaries
):
    """Peak bytes of the worst block: the larger of its factor phase and its contraction phase.

    Factor phase: the other range's factors held while one range's transient is live.
    Contraction phase: both ranges' factors, the output block and its temporaries. Factors
    of further ranges that the cache keeps add to both.
    """
    largest = sorted(factor_values, reverse=True)[:2]
    working = sum(largest)
    cached = sum(factor_values) - working
    if cache_bytes is not None:
        cached = min(cached, cache_bytes // item)
    factor_phase = working - (largest[0] if largest else 0) + transient
    contraction_phase = working + out_block * (1 + temporaries)
    peak = (cached + max(factor_phase, contraction_phase)) * item
    return MethodCost(method, float(flops), float(seconds), int(peak))


def choose_method(
    net: Network,
    n1: int,
    n2: int | None,
    layout: str,
    dtype_itemsize: int,
    block_rows: int = 0,
    block_cols: int = 0,
    batch_diagonal: bool = False,
    memory_limit_bytes: int | None = None,
) -> tuple[str, str]:
    """(method, one-line reason): the fastest estimate whose peak memory fits the limit.

    Deterministic for a given request. If no method fits, the one with the smallest peak.
    """
    costs = method_costs(
        net, n1, n2, layout, dtype_itemsize, block_rows, block_cols, batch_diagonal
    )
    ranked = sorted(costs.values(), key=lambda c: (c.seconds, ENGINE_METHODS.index(c.method)))
    fits = [c for c in ranked if memory_limit_bytes is None or c.peak_bytes <= memory_limit_bytes]
    best = fits[0] if fits else min(ranked, key=lambda c: c.peak_bytes)
    others = ", ".join(f"{c.method} {_gflop(c.flops)}" for c in ranked if c.method != best.method)
    note = "" if fits else f"; no method fits {memory_limit_bytes >> 20} MiB, took the smallest"
    reason = (
        f"auto: {best.method} est. {_gflop(best.flops)}, {best.seconds:.3g} s, peak "
        f"{best.peak_bytes / 2**20:.0f} MiB (vs {others}){note}"
    )
    return best.method, reason


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:.3g} GFLOP"


def estimate_flops(net: Network, method: str, n1: int, n2: int | None, layout: str, **kw) -> float:
    """Estimated flops of a whole request with one method (the bench's GFLOP/s numerator)."""
    return method_costs(net, n1, n2, layout, kw.pop("dtype_itemsize", 4), **kw)[method].flops


def estimate_memory_bytes(
    net: Network,
    method: str,
    n1: int,
    n2: int | None,
    layout: str,
    dtype_itemsize: int,
    block_rows: int = 0,
    block_cols: int = 0,
    batch_diagonal: bool = False,
    cache_bytes: int | None = None,
) -> int:
    """Estimated peak bytes of a request with `method` ("auto" resolved first) on its device.

    n2 None means the Gram of x1.
    """
    if method == AUTO:
        method, _ = choose_method(
            net, n1, n2, layout, dtype_itemsize, block_rows, block_cols, batch_diagonal
        )
    costs = method_costs(
        net, n1, n2, layout, dtype_itemsize, block_rows, block_cols, batch_diagonal, cache_bytes
    )
    return costs[method].peak_bytes
