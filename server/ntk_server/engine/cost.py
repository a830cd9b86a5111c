"""Which kernel method to use for a request, and how much memory it needs."""

from __future__ import annotations

from ntk_server.engine.network import Network

# Above this, per-block Jacobians are too large to hold and NTK-vector products are used.
JACOBIAN_BUDGET_BYTES = 1 << 30


def jacobian_bytes(net: Network, examples: int, itemsize: int) -> int:
    return examples * net.output_size * net.parameter_count * itemsize


def choose_method(
    net: Network,
    n1: int,
    n2: int,
    layout: str,
    itemsize: int,
    block_rows: int,
    block_cols: int,
    batch_diagonal: bool = False,
) -> tuple[str, str]:
    """(method, one-line reason) for a request with the given block shape."""
    need = jacobian_bytes(net, block_rows + (0 if batch_diagonal else block_cols), itemsize)
    if need <= JACOBIAN_BUDGET_BYTES:
        return (
            "jacobian_contraction",
            f"block Jacobians need {need / 2**20:.0f} MiB <= {JACOBIAN_BUDGET_BYTES >> 20} MiB",
        )
    return (
        "ntk_vector_products",
        f"block Jacobians would need {need / 2**20:.0f} MiB > {JACOBIAN_BUDGET_BYTES >> 20} MiB",
    )


def estimate_memory_bytes(
    net: Network, method: str, layout: str, itemsize: int, block_rows: int, block_cols: int
) -> int:
    """Rough peak device bytes of one block: Jacobians (or one output slice) plus the block."""
    out = (
        block_rows
        * block_cols
        * {"full": net.output_size**2, "diagonal": net.output_size}.get(layout, 1)
    )
    if method == "jacobian_contraction":
        work = jacobian_bytes(net, block_rows + block_cols, 1)
    else:
        work = block_cols * net.parameter_count + block_rows * block_cols * net.output_size
    return (out + work + net.parameter_count) * itemsize
