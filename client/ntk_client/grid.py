"""The block grid of a kernel as a client sees it: its indices, and how to cut it into chunks.

The grid is defined by the server (ntk_server/engine/blocks.py) and described in each stream's
header: index = block_row * grid_cols + block_col; a symmetric grid holds only blocks on or
above the diagonal; a batch_diagonal grid has one column.
"""

from __future__ import annotations

import itertools
import math


def grid_indices(header) -> list[int]:
    """Every block index of a kernel header's grid, in the order a server computes them.

    Column-major, index = block_row * grid_cols + block_col; a symmetric grid has only blocks
    on or above the diagonal; batch_diagonal grids have one column.
    """
    rows, cols = header.grid_rows, header.grid_cols
    return [
        r * cols + c for c in range(cols) for r in range(rows) if not header.symmetric or c >= r
    ]


def _segments(count: int, parts: int) -> list[range]:
    """range(count) cut into `parts` contiguous runs of near-equal length."""
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def tiles(header, parts: int) -> list[list[int]]:
    """The block indices cut into about `parts` tiles, largest first (ntk_client.distributed,
    NOTE(spreading) 3).

    Each tile lists its indices in grid_indices order. A rectangular grid is cut into a x b
    tiles (a * b >= parts) touching the fewest block rows plus columns; a symmetric one into
    the s (s + 1) / 2 tiles on and above the diagonal of an s x s cut.
    """
    rows, cols = header.grid_rows, header.grid_cols
    if header.symmetric:
        s = 1
        while s * (s + 1) // 2 < parts and s < rows:
            s += 1
        row_cuts = col_cuts = _segments(rows, s)
        pairs = [(i, j) for j in range(len(col_cuts)) for i in range(j + 1)]
    else:
        shapes = [
            (a, math.ceil(parts / a))
            for a in range(1, min(parts, rows) + 1)
            if math.ceil(parts / a) <= cols
        ] or [(min(parts, rows), 1)]
        a, b = min(shapes, key=lambda ab: math.ceil(rows / ab[0]) + math.ceil(cols / ab[1]))
        row_cuts, col_cuts = _segments(rows, a), _segments(cols, b)
        pairs = [(i, j) for j in range(len(col_cuts)) for i in range(len(row_cuts))]
    owner = {}
    for n, (i, j) in enumerate(pairs):
        for r in row_cuts[i]:
            for c in col_cuts[j]:
                owner[r * cols + c] = n
    out: list[list[int]] = [[] for _ in pairs]
    for index in grid_indices(header):
        out[owner[index]].append(index)
    return sorted((t for t in out if t), key=len, reverse=True)


def _chunks(indices: list[int], parts: int) -> list[list[int]]:
    """`indices` cut into at most `parts` contiguous runs of near-equal length."""
    if not indices:
        return []
    parts = max(1, min(parts, len(indices)))
    size = math.ceil(len(indices) / parts)
    return [indices[i : i + size] for i in range(0, len(indices), size)]
