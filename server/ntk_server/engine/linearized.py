"""Linearised networks: gradient-descent predictions on the MSE, and f_lin for given deltas.

Conventions (the same as the best-known JAX NTK library, so results compare 1:1):
  loss = 1 / (2 N O) sum_i ||f(x_i) - y_i||^2, learning rate eta, continuous time t;
  f_t(x*) = f0(x*) + K(x*, X) K^-1 (I - exp(-eta K t / (N O))) (Y - f0(X)).

NOTE (spectral form). With K = V diag(lam) V^T the update is K(x*, X) V diag(g(lam)) V^T r,
r = Y - f0(X), g(lam) = (1 - exp(-eta lam t / (N O))) / lam. g is evaluated as
(eta t / (N O)) * phi(eta lam t / (N O)) with phi(z) = -expm1(-z) / z, phi(0) = 1, so a zero
eigenvalue takes its limit eta t / (N O) instead of 0/0. Negative eigenvalues (round-off on a
positive semi-definite kernel) are clipped to zero. At t = inf, g(lam) = 1 / lam on the
eigenvalues above a relative cutoff and 0 below it: the gradient-flow limit, which on a singular
kernel is the minimum-norm (pseudo-inverse) solution rather than NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.func import jvp

from ntk_server.engine.network import Network
from ntk_server.errors import InvalidArgument

# Eigenvalues below this fraction of the largest, times N, count as zero at t = inf.
PINV_RTOL_PER_EXAMPLE = torch.finfo(torch.float64).eps


def add_diag_reg(k: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    """K + diag_reg * mean(diag K) * I (relative), or K + diag_reg * I (absolute)."""
    if diag_reg == 0:
        return k
    amount = diag_reg if absolute else diag_reg * torch.diagonal(k).mean()
    return k + amount * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)


def _phi(z: torch.Tensor) -> torch.Tensor:
    """-expm1(-z) / z with its limit 1 at z = 0."""
    safe = torch.where(z > 0, z, torch.ones_like(z))
    return torch.where(z > 0, -torch.expm1(-safe) / safe, torch.ones_like(z))


def _flatten_kernel(k: torch.Tensor, n: int, o: int, layout: str) -> torch.Tensor:
    """trace (n, m) stays; full (n, m, O, O) -> (n O, m O) with rows (i, a), columns (j, b)."""
    if layout == "trace":
        return k
    m = k.shape[1]
    return k.permute(0, 2, 1, 3).reshape(n * o, m * o)


def gradient_descent_mse(
    k_train_train: torch.Tensor,
    k_test_train: torch.Tensor,
    y_train: torch.Tensor,
    f0_train: torch.Tensor,
    f0_test: torch.Tensor,
    t: Sequence[float],
    *,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute: bool = False,
    layout: str = "trace",
) -> list[torch.Tensor]:
    """Predictions f_t(x_test) for each t; each (N_test, O), in float64.

    Args:
      k_train_train: (N, N) for trace (outputs independent, K x I) or (N, N, O, O) for full.
      k_test_train: (M, N) or (M, N, O, O).
      y_train, f0_train: (N, O). f0_test: (M, O).
      t: training times (>= 0, +inf allowed).
    """
    if layout not in ("trace", "full"):
        raise InvalidArgument(f"must be trace or full, got {layout!r}", field="layout")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise InvalidArgument(f"must be finite and > 0, got {learning_rate}", field="learning_rate")
    if not (math.isfinite(diag_reg) and diag_reg >= 0):
        raise InvalidArgument(f"must be finite and >= 0, got {diag_reg}", field="diag_reg")
    for value in t:
        if math.isnan(value) or value < 0:
            raise InvalidArgument(f"times must be >= 0 (inf allowed), got {value}", field="t")

    for name, value in (
        ("k_train_train", k_train_train),
        ("k_test_train", k_test_train),
        ("f0_train", f0_train),
        ("f0_test", f0_test),
    ):
        if not torch.isfinite(value).all():
            raise InvalidArgument(
                f"{name} has non-finite entries: the inputs or weights overflow the dtype; "
                "rescale the inputs or use float64",
                field="x_train",
            )

    f64 = torch.float64
    n, o = y_train.shape
    m = f0_test.shape[0]
    ktt = _flatten_kernel(k_train_train.to(f64), n, o, layout)
    kst = _flatten_kernel(k_test_train.to(f64), m, o, layout)
    ktt = add_diag_reg(0.5 * (ktt + ktt.T), diag_reg, diag_reg_absolute)
    resid = y_train.to(f64) - f0_train.to(f64)
    resid = resid if layout == "trace" else resid.reshape(n * o, 1)

    evals, evecs = torch.linalg.eigh(ktt)
    evals = evals.clamp_min(0)
    proj = evecs.T @ resid  # coordinates of the residual in the eigenbasis
    lhs = kst @ evecs
    normalization = n * o
    cutoff = PINV_RTOL_PER_EXAMPLE * ktt.shape[0] * evals.max().clamp_min(0)

    out = []
    for time in t:
        scale = learning_rate * time / normalization
        if math.isinf(scale):  # t = inf, or eta t too large for a float: the same limit
            g = torch.where(evals > cutoff, 1.0 / torch.where(evals > cutoff, evals, 1.0), 0.0)
        else:
            g = scale * _phi(evals * scale)
        update = lhs @ (g.unsqueeze(-1) * proj)
        out.append(f0_test.to(f64) + update.reshape(m, o))
    return out


def evaluate_linearized(
    net: Network,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    dw: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x; w0), f_lin(x; w0 + dw)) with f_lin = f0 + J(x) dw by one jvp; each (N, O).

    Missing names in dw mean a zero delta.
    """
    params = dict(params)
    tangent = {
        name: (dw[name].to(p) if name in dw else torch.zeros_like(p)) for name, p in params.items()
    }
    with torch.no_grad():
        f0, jdw = jvp(lambda p: net.apply(p, x), (params,), (tangent,))
    return f0, f0 + jdw
