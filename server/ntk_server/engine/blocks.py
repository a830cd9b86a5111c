"""The block grid of a kernel: which blocks exist, their offsets, and the order they are sent.

A kernel K(x1, x2) is cut into a grid of grid_rows x grid_cols blocks of at most
block_rows x block_cols examples; block (r, c) has index r * grid_cols + c. For the Gram matrix
of x1 alone (symmetric) the grid is square and only blocks with c >= r are computed; those with
c > r are flagged `mirror` so the receiver also places their transpose. With batch_diagonal
there is one column: block r holds K(x1_i, x1_i) for its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ntk_server.engine.kernels import kernel_shape
from ntk_server.errors import InvalidArgument, ResourceExhausted

DEFAULT_BLOCK_EXAMPLES = 1024
# A grid this large is a mistake (blocks of a few examples over a large N): planning and
# streaming it would cost more than the kernel.
MAX_GRID_BLOCKS = 1 << 18
TARGET_BLOCK_BYTES = 4 << 20
# Room kept in each message for the block's own fields and protobuf framing.
MESSAGE_OVERHEAD_BYTES = 64 << 10


@dataclass(frozen=True)
class Block:
    index: int
    row_offset: int
    col_offset: int
    rows: int
    cols: int
    mirror: bool


@dataclass(frozen=True)
class KernelPlan:
    n1: int
    n2: int
    output_size: int
    layout: str
    symmetric: bool
    batch_diagonal: bool
    block_rows: int
    block_cols: int
    grid_rows: int
    grid_cols: int
    blocks: tuple[Block, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return kernel_shape(self.n1, self.n2, self.output_size, self.layout, self.batch_diagonal)

    def entries(self, block: Block) -> int:
        """Kernel entries in a block, counting each element of an O x O output block."""
        per_pair = math.prod(kernel_shape(1, 1, self.output_size, self.layout, False))
        return block.rows * (1 if self.batch_diagonal else block.cols) * per_pair


def entry_bytes(output_size: int, layout: str, itemsize: int) -> int:
    return math.prod(kernel_shape(1, 1, output_size, layout, False)) * itemsize


def plan_kernel(
    n1: int,
    n2: int | None,
    output_size: int,
    layout: str,
    itemsize: int,
    max_message_bytes: int,
    *,
    batch_diagonal: bool = False,
    block_rows: int = 0,
    block_cols: int = 0,
    indices: list[int] | None = None,
) -> KernelPlan:
    """Cut a kernel into blocks that each fit in `max_message_bytes`.

    n2 None means the Gram matrix of x1 (symmetric). `indices` keeps only those blocks (resume);
    an index outside the grid, or one below the diagonal of a symmetric grid, is rejected.
    """
    symmetric = n2 is None and not batch_diagonal
    n2 = n1 if n2 is None else n2
    for name, hint in (("block_rows", block_rows), ("block_cols", block_cols)):
        if hint < 0:
            raise InvalidArgument(f"must be >= 0, got {hint}", field=name, value=hint)
    per_pair = entry_bytes(output_size, layout, itemsize)
    budget = max_message_bytes - MESSAGE_OVERHEAD_BYTES
    if per_pair > budget:
        raise ResourceExhausted(
            f"one kernel entry block of {per_pair} bytes does not fit the message limit of "
            f"{max_message_bytes} bytes (less {MESSAGE_OVERHEAD_BYTES} bytes of framing); "
            "raise max_message_bytes on the client (Client(max_message_bytes=...)) and on the "
            "server (--max-message-bytes / NTK_MAX_MESSAGE_BYTES) where that is the smaller, "
            "or use the trace or diagonal layout",
            field="max_message_bytes",
            value=max_message_bytes,
        )

    rows = min(block_rows or DEFAULT_BLOCK_EXAMPLES, n1)
    if batch_diagonal:
        rows = max(1, min(rows, budget // per_pair))
        grid_rows = math.ceil(n1 / rows)
        _check_grid_size(grid_rows)
        blocks = [
            Block(r, r * rows, r * rows, min(rows, n1 - r * rows), min(rows, n1 - r * rows), False)
            for r in range(grid_rows)
        ]
        return _select(
            KernelPlan(n1, n1, output_size, layout, False, True, rows, rows, grid_rows, 1, ()),
            blocks,
            indices,
        )

    cols = rows if symmetric else min(block_cols or DEFAULT_BLOCK_EXAMPLES, n2)
    # Blocks the server sizes itself stay near TARGET_BLOCK_BYTES, so that computing one block
    # overlaps with sending the last; one huge message leaves both ends idle in turn.
    if not (block_rows or block_cols):
        budget = min(budget, TARGET_BLOCK_BYTES)
    while rows * cols * per_pair > budget:
        if rows >= cols:
            rows = max(1, rows // 2)
        else:
            cols = max(1, cols // 2)
        if symmetric:
            cols = rows
    grid_rows, grid_cols = math.ceil(n1 / rows), math.ceil(n2 / cols)
    _check_grid_size(grid_rows * (grid_rows + 1) // 2 if symmetric else grid_rows * grid_cols)
    blocks = []
    # Column-major order: consecutive blocks share a column range, whose Jacobian is reused.
    for c in range(grid_cols):
        for r in range(grid_rows):
            if symmetric and c < r:
                continue
            blocks.append(
                Block(
                    index=r * grid_cols + c,
                    row_offset=r * rows,
                    col_offset=c * cols,
                    rows=min(rows, n1 - r * rows),
                    cols=min(cols, n2 - c * cols),
                    mirror=symmetric and c > r,
                )
            )
    plan = KernelPlan(
        n1, n2, output_size, layout, symmetric, False, rows, cols, grid_rows, grid_cols, ()
    )
    return _select(plan, blocks, indices)


def _check_grid_size(blocks: int) -> None:
    if blocks > MAX_GRID_BLOCKS:
        raise InvalidArgument(
            f"the block grid would have {blocks} blocks, over the limit of {MAX_GRID_BLOCKS}; "
            "use larger blocks (or 0 to let the server choose)",
            field="block_rows",
            value=blocks,
        )


def _select(plan: KernelPlan, blocks: list[Block], indices: list[int] | None) -> KernelPlan:
    if indices:
        by_index = {b.index: b for b in blocks}
        unknown = sorted(set(indices) - set(by_index))
        if unknown:
            raise InvalidArgument(
                f"{unknown[:5]} are not blocks of this {plan.grid_rows}x{plan.grid_cols} grid "
                f"(valid: {sorted(by_index)[:5]}...); resume with the same block shape",
                field="block_indices",
                value=unknown[:5],
            )
        wanted = set(indices)
        blocks = [b for b in blocks if b.index in wanted]
    return KernelPlan(**{**plan.__dict__, "blocks": tuple(blocks)})
