"""The one simple reference every kernel method is checked against, and its tolerances.

`reference_kernel` uses nothing but torch.autograd.grad: one gradient per example and output,
flattened and concatenated over parameters, in float64, then contracted with einsum. It is slow
and obviously right, which is the point.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype of the kernel under test; atol is relative to the largest entry of
# the reference, since kernel scales vary over orders of magnitude between networks.
TOLERANCES = {
    torch.float32: (2e-4, 2e-5),
    torch.float64: (1e-10, 1e-12),
}


def _per_example_jacobian(net, params, x: torch.Tensor) -> torch.Tensor:
    """(n, O, P) in float64 by one autograd.grad call per example and output."""
    leaves = {k: v.detach().to(torch.float64).requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    rows = []
    for xi in x.detach().to(torch.float64):
        out = net.apply(leaves, xi.unsqueeze(0))[0]
        per_output = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], [leaves[k] for k in names], retain_graph=True)
            per_output.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_kernel(net, params, x1, x2=None, layout="trace", batch_diagonal=False):
    """K(x1, x2) in float64: (n1, n2, O, O) full, (n1, n2) trace, (n1, n2, O) diagonal.

    x2 None means x1; with batch_diagonal only K(x1_i, x1_i): (n1, O, O), (n1,) or (n1, O).
    """
    j1 = _per_example_jacobian(net, params, x1)
    j2 = j1 if x2 is None or batch_diagonal else _per_example_jacobian(net, params, x2)
    if batch_diagonal:
        full = torch.einsum("iap,ibp->iab", j1, j1)
        if layout == "full":
            return full
        diag = torch.diagonal(full, dim1=1, dim2=2)
        return diag.mean(-1) if layout == "trace" else diag
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if layout == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag.mean(-1) if layout == "trace" else diag


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """actual == expected within TOLERANCES[dtype]; shapes must match exactly."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    )
    rtol, atol = TOLERANCES[dtype]
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(torch.float64), expected, rtol=rtol, atol=atol * max(scale, 1.0)
    )
