"""STRUCTURED kernels against the autograd reference: every layer type, stacks, layouts, dtypes."""

from __future__ import annotations

import functools

import pytest
import torch
from ntk_server.engine import KernelComputer, Network, compute_kernel, plan_kernel
from ntk_server.engine import structured as st
from reference import assert_kernel_close, reference_kernel
from torch import nn

LAYOUTS = ("trace", "diagonal", "full")
DTYPES = (torch.float32, torch.float64)
MODES = ("cross", "gram", "batch_diagonal")
N1, N2 = 5, 3  # ragged on purpose: neither divides the other or the tile sizes below

DENSE = {"type": "dense", "width": 6}
CONV2D = {"type": "conv2d", "channels": 3, "kernel_size": [3, 3], "padding": [1, 1]}
SPECS = {
    # One supported layer type each, with as little around it as a vector output needs.
    "dense": {"input_shape": [4], "layers": [{"type": "dense", "width": 3}]},
    "dense_no_bias": {"input_shape": [4], "layers": [{"type": "dense", "width": 3, "bias": False}]},
    "dense_positions": {
        "input_shape": [3, 4],
        "layers": [{"type": "dense", "width": 5}, {"type": "tanh"}, {"type": "flatten"}],
    },
    "conv2d": {"input_shape": [2, 5, 4], "layers": [CONV2D, {"type": "flatten"}]},
    "conv2d_strided": {
        "input_shape": [2, 6, 5],
        "layers": [
            {"type": "conv2d", "channels": 2, "kernel_size": [3, 2], "stride": [2, 1]},
            {"type": "flatten"},
        ],
    },
    "conv1d": {
        "input_shape": [2, 7],
        "layers": [
            {"type": "conv1d", "channels": 3, "kernel_size": [3], "stride": [2], "padding": [1]},
            {"type": "flatten"},
        ],
    },
    "avg_pool": {
        "input_shape": [2, 6, 6],
        "layers": [CONV2D, {"type": "avg_pool", "window": [2, 3]}, {"type": "flatten"}],
    },
    "global_avg_pool": {
        "input_shape": [2, 5, 5],
        "layers": [CONV2D, {"type": "erf"}, {"type": "global_avg_pool"}],
    },
    "layer_norm": {
        "input_shape": [4],
        "layers": [DENSE, {"type": "layer_norm"}, {"type": "dense", "width": 3}],
    },
    "residual": {
        "input_shape": [4],
        "layers": [
            DENSE,
            {"type": "residual", "layers": [{"type": "dense", "width": 6}, {"type": "gelu"}]},
            {"type": "dense", "width": 3},
        ],
    },
    # Stacks: the readout rule (MLP), every layer type together, ntk parameterization.
    "mlp": {
        "input_shape": [4],
        "layers": [
            DENSE,
            {"type": "relu"},
            DENSE,
            {"type": "softplus"},
            {"type": "dense", "width": 3},
        ],
        "init": {"sigma_b": 0.5},
    },
    "mlp_ntk": {
        "input_shape": [4],
        "layers": [
            DENSE,
            {"type": "sigmoid"},
            DENSE,
            {"type": "tanh"},
            {"type": "dense", "width": 3},
        ],
        "parameterization": "ntk",
        "init": {"sigma_w": 1.5, "sigma_b": 0.3},
    },
    "convnet": {
        "input_shape": [1, 6, 6],
        "layers": [
            CONV2D,
            {"type": "relu"},
            {"type": "conv2d", "channels": 2, "kernel_size": [3, 3]},
            {"type": "leaky_relu", "negative_slope": 0.1},
            {"type": "avg_pool", "window": [2, 2]},
            {"type": "layer_norm"},
            {
                "type": "residual",
                "layers": [{"type": "conv2d", "channels": 2, "kernel_size": [1, 1]}],
            },
            {"type": "flatten"},
            {"type": "dense", "width": 5},
            {"type": "relu"},
            {"type": "dense", "width": 3},
        ],
        "init": {"sigma_b": 0.2},
    },
}


class Gain(nn.Module):
    """A parametrised layer with no structured rule: y = x * gain, elementwise."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.empty(width, device="meta"))

    def forward(self, x):
        return x * self.gain


def _with_unsupported_layer() -> tuple[Network, dict]:
    """An MLP whose second layer is swapped for `Gain`, which only the fallback handles."""
    spec = {
        "input_shape": [4],
        "layers": [DENSE, {"type": "identity"}, {"type": "tanh"}, {"type": "dense", "width": 3}],
        "init": {"sigma_b": 0.4},
    }
    net = Network(spec)
    net.module[1] = Gain(6)
    net.param_shapes["1.gain"] = (6,)
    params = net.init_params()
    params["1.gain"] = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    return net, params


@functools.cache
def _case(name: str):
    if name == "unsupported":
        net, params = _with_unsupported_layer()
    else:
        net = Network(SPECS[name])
        params = net.init_params(seed=3)
    gen = torch.Generator().manual_seed(7)
    x1 = torch.randn(N1, *net.input_shape, generator=gen, dtype=torch.float64)
    x2 = torch.randn(N2, *net.input_shape, generator=gen, dtype=torch.float64)
    return net, params, x1, x2


@functools.cache
def _reference(name: str, layout: str, mode: str) -> torch.Tensor:
    net, params, x1, x2 = _case(name)
    x2 = x2 if mode == "cross" else None
    return reference_kernel(net, params, x1, x2, layout, batch_diagonal=mode == "batch_diagonal")


def _cast(params, x1, x2, dtype):
    return {k: v.to(dtype) for k, v in params.items()}, x1.to(dtype), x2.to(dtype)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # Tiles of 2 examples make the Gram path cut N1 = 5 into ragged tiles and mirror them.
    monkeypatch.setattr(st, "SYMMETRIC_TILE_ROWS", 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", [*SPECS, "unsupported"])
def test_structured_equals_reference(name, layout, dtype, mode):
    net, params, x1, x2 = _case(name)
    params, x1, x2 = _cast(params, x1, x2, dtype)
    got = compute_kernel(
        net,
        params,
        x1,
        x2 if mode == "cross" else None,
        layout=layout,
        method="structured",
        batch_diagonal=mode == "batch_diagonal",
    )
    assert got.dtype == dtype
    assert_kernel_close(got, _reference(name, layout, mode), dtype)


def test_rules_cover_the_layer_types():
    rules = {
        name: [p.rule for p in st.plan_layers(_case(name)[0], "trace")]
        for name in ("mlp", "convnet", "dense_positions", "unsupported")
    }
    assert rules["mlp"] == [st.RULE_GRAM, st.RULE_READOUT, st.RULE_GRAM]
    assert rules["convnet"] == [st.RULE_LAYER_JACOBIAN] * 3 + [st.RULE_READOUT, st.RULE_GRAM]
    assert rules["dense_positions"] == [st.RULE_LAYER_JACOBIAN]
    assert rules["unsupported"] == [st.RULE_GRAM, st.RULE_FALLBACK, st.RULE_GRAM]
    # The readout rule only pays off in the trace layout.
    assert st.RULE_READOUT not in [p.rule for p in st.plan_layers(_case("mlp")[0], "full")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_grid_reuses_factors(monkeypatch, layout, symmetric):
    """A ragged grid of blocks assembles to the reference; each range's factors computed once."""
    net, params, x1, x2 = _case("convnet")
    n2 = None if symmetric else N2
    calls = []
    real = st.factors

    def counting(net_, params_, x, plans, layout_):
        calls.append(x.shape[0])
        return real(net_, params_, x, plans, layout_)

    monkeypatch.setattr(st, "factors", counting)
    plan = plan_kernel(N1, n2, net.output_size, layout, 8, 1 << 30, block_rows=2, block_cols=2)
    computer = KernelComputer(net, params, "structured", layout, cache_bytes=1 << 30)
    out = torch.full(plan.shape, float("nan"), dtype=torch.float64)
    xc = x1 if symmetric else x2
    for b in plan.blocks:
        rows, cols = (
            slice(b.row_offset, b.row_offset + b.rows),
            slice(b.col_offset, b.col_offset + b.cols),
        )
        block = computer.block(
            x1[rows], xc[cols], ("x1", rows.start), ("x2" if n2 else "x1", cols.start)
        )
        out[rows, cols] = block
        if b.mirror:
            out[cols, rows] = (
                block.transpose(0, 1).transpose(2, 3) if layout == "full" else block.transpose(0, 1)
            )
    computer.release()

    assert_kernel_close(
        out, _reference("convnet", layout, "gram" if symmetric else "cross"), torch.float64
    )
    expected_ranges = 3 if symmetric else 3 + 2  # rows of 5 in 2s; columns of 3 in 2s
    assert len(calls) == expected_ranges


def test_auto_resolves_and_reports(monkeypatch):
    net, params, x1, x2 = _case("mlp")
    computer = KernelComputer(net, params, "auto", "trace", cache_bytes=0)
    got = computer.block(x1, x2)
    assert computer.method in ("structured", "jacobian_contraction", "ntk_vector_products")
    assert computer.method_reason.startswith("auto: ") and "\n" not in computer.method_reason
    assert_kernel_close(got, _reference("mlp", "trace", "cross"), torch.float64)
