"""Every kernel method x layout x dtype against the float64 autograd reference, assembled from
ragged block grids exactly as the server streams them."""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
import torch
from conftest import CNN_SPEC, MLP_SPEC
from ntk_client import place_block
from ntk_server.engine import METHODS, KernelComputer, Network, compute_kernel, plan_kernel
from ntk_server.runtime import symmetrize
from reference import assert_kernel_close, reference_kernel

SPECS = {"mlp": MLP_SPEC, "cnn": CNN_SPEC}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# name -> (n1, n2 or None for the Gram matrix of x1, batch_diagonal)
CASES = {
    "gram_ragged": (7, None, False),
    "x1_x2_ragged": (5, 8, False),
    "one_row": (1, 4, False),
    "one_by_one": (1, None, False),
    "batch_diagonal": (6, None, True),
}
BLOCK = 3  # not a divisor of 5, 7 or 8: every grid has ragged edges


@functools.cache
def _setup(spec_name: str, case: str):
    net = Network(SPECS[spec_name])
    params = net.init_params()
    n1, n2, batch_diagonal = CASES[case]
    gen = np.random.default_rng(zlib.crc32(f"{spec_name}-{case}".encode()))
    x1 = gen.standard_normal((n1, *net.input_shape))
    x2 = None if n2 is None else gen.standard_normal((n2, *net.input_shape))
    refs = {
        layout: reference_kernel(net, params, x1, x2, layout, batch_diagonal)
        for layout in ("full", "trace", "diagonal")
    }
    return net, params, x1, x2, refs


def assemble(net, params, x1, x2, method, layout, dtype, batch_diagonal, block=BLOCK):
    """Plan a grid, compute every block, place it; also count how often each entry is written."""
    torch_dtype = DTYPES[dtype]
    t1 = torch.tensor(x1, dtype=torch_dtype)
    t2 = None if x2 is None else torch.tensor(x2, dtype=torch_dtype)
    cast = {k: v.to(torch_dtype) for k, v in params.items()}
    itemsize = torch.finfo(torch_dtype).bits // 8
    plan = plan_kernel(
        len(x1),
        None if x2 is None else len(x2),
        net.output_size,
        layout,
        itemsize,
        1 << 30,
        batch_diagonal=batch_diagonal,
        block_rows=block,
        block_cols=block,
    )
    computer = KernelComputer(net, cast, method, layout, cache_bytes=1 << 24)
    out = np.full(plan.shape, np.nan)
    hits = np.zeros(plan.shape[: 1 if batch_diagonal else 2], dtype=int)
    for b in plan.blocks:
        rows = t1[b.row_offset : b.row_offset + b.rows]
        if batch_diagonal:
            values = computer.block(rows, None, ("x1", b.row_offset), batch_diagonal=True)
            hits[b.row_offset : b.row_offset + b.rows] += 1
        else:
            other, name = (t1, "x1") if t2 is None else (t2, "x2")
            cols = other[b.col_offset : b.col_offset + b.cols]
            values = computer.block(rows, cols, ("x1", b.row_offset), (name, b.col_offset))
            if plan.symmetric and b.row_offset == b.col_offset:
                values = symmetrize(values)
            hits[b.row_offset : b.row_offset + b.rows, b.col_offset : b.col_offset + b.cols] += 1
            if b.mirror:
                hits[
                    b.col_offset : b.col_offset + b.cols, b.row_offset : b.row_offset + b.rows
                ] += 1
        place_block(out, b, values.numpy(), batch_diagonal)
    return out, hits, plan


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_kernel_matches_reference(spec_name, case, method, layout, dtype):
    net, params, x1, x2, refs = _setup(spec_name, case)
    batch_diagonal = CASES[case][2]
    out, hits, plan = assemble(net, params, x1, x2, method, layout, dtype, batch_diagonal)

    assert (hits == 1).all(), "every entry must be written exactly once"
    assert out.shape == refs[layout].shape
    assert_kernel_close(out, refs[layout], dtype)
    if plan.symmetric:
        mirrored = np.swapaxes(out, 0, 1)
        if layout == "full":
            mirrored = np.swapaxes(mirrored, 2, 3)
        assert np.array_equal(out, mirrored), "the Gram matrix of x1 must be exactly symmetric"


@pytest.mark.parametrize("method", METHODS)
def test_compute_kernel_in_one_piece(method):
    net, params, x1, x2, refs = _setup("cnn", "x1_x2_ragged")
    out = compute_kernel(
        net, params, torch.tensor(x1), torch.tensor(x2), layout="full", method=method
    )
    assert_kernel_close(out.numpy(), refs["full"], "float64")


def test_symmetric_grid_sends_upper_triangle_only():
    plan = plan_kernel(10, None, 2, "trace", 4, 1 << 30, block_rows=3)
    pairs = {(b.row_offset // 3, b.col_offset // 3) for b in plan.blocks}
    assert pairs == {(r, c) for r in range(4) for c in range(4) if c >= r}
    assert all(b.mirror == (b.col_offset > b.row_offset) for b in plan.blocks)
    assert plan.symmetric and plan.grid_rows == plan.grid_cols == 4


def test_blocks_fit_the_message_limit():
    limit = 256 << 10
    plan = plan_kernel(500, 400, 10, "full", 8, limit)
    per_block = plan.block_rows * plan.block_cols * 10 * 10 * 8
    assert per_block <= limit
    covered = sum(b.rows * b.cols for b in plan.blocks)
    assert covered == 500 * 400
