"""The independent reference every kernel method is checked against, and the one tolerance table.

The reference uses nothing but torch.autograd.grad, one example and one output at a time, in
float64: J[i, a, :] = d f_a(x_i) / dw flattened over every parameter, K = J1 J2^T per layout.
"""

from __future__ import annotations

import numpy as np
import torch

# (rtol, atol relative to the largest |entry|) by the dtype the kernel was computed in.
TOLERANCES = {
    "float32": (2e-4, 2e-5),
    "float64": (1e-10, 1e-12),
}


def _dtype_key(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name


def per_example_jacobian(net, params, x) -> torch.Tensor:
    """(N, O, P) float64, by plain autograd."""
    leaves = {
        k: v.detach().to(torch.float64).clone().requires_grad_(True) for k, v in params.items()
    }
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    rows = []
    for i in range(x.shape[0]):
        out = net.apply(leaves, x[i : i + 1])[0]
        per_output = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], list(leaves.values()), retain_graph=True)
            per_output.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_kernel(net, params, x1, x2=None, layout="full", batch_diagonal=False) -> np.ndarray:
    """K(x1, x2) in float64 numpy, in the layout's documented shape."""
    j1 = per_example_jacobian(net, params, x1)
    j2 = j1 if x2 is None else per_example_jacobian(net, params, x2)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if batch_diagonal:
        full = torch.stack([full[i, i] for i in range(full.shape[0])])  # (N, O, O)
        diag = torch.diagonal(full, dim1=1, dim2=2)
    else:
        diag = torch.diagonal(full, dim1=2, dim2=3)
    out = {"full": full, "diagonal": diag, "trace": diag.mean(-1)}[layout]
    return out.numpy()


def assert_kernel_close(actual, expected, dtype) -> None:
    """Compare with the tolerance of `dtype`; atol scales with the kernel's magnitude."""
    rtol, atol = TOLERANCES[_dtype_key(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), "kernel has non-finite entries"
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)
