"""The torch.func peers, written the way the public torch.func NTK tutorial describes them.

Jacobian contraction: per-example Jacobians by vmap(jacrev) of a single-example forward,
contracted per parameter tensor with einsum and summed. NTK-vector products: for each pair of
examples, vjp of f(x1) against every output basis vector, pushed forward through f(x2) by jvp,
vmapped over the basis and over both example axes. Both return (N1, N2, O, O) or, for trace,
(N1, N2) as the mean over outputs (the service's convention; the tutorial sums).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap


def _single(module):
    def f(params, x):
        return functional_call(module, params, (x.unsqueeze(0),)).squeeze(0)

    return f


def jacobian_contraction(module, params, x1, x2, layout):
    f = _single(module)
    jac1 = vmap(jacrev(f), (None, 0))(params, x1)
    jac2 = jac1 if x2 is None else vmap(jacrev(f), (None, 0))(params, x2)
    total = None
    for name in params:
        a, b = jac1[name].flatten(2), jac2[name].flatten(2)
        if layout == "full":
            part = torch.einsum("Naf,Mbf->NMab", a, b)
        else:
            part = torch.einsum("Naf,Maf->NMa", a, b)
        total = part if total is None else total + part
    return total.mean(-1) if layout == "trace" else total


def ntk_vector_products(module, params, x1, x2, layout):
    f = _single(module)
    x2 = x1 if x2 is None else x2

    def pair(xa, xb):
        out, vjp_fn = vjp(lambda p: f(p, xa), params)

        def column(e):
            (cotangent,) = vjp_fn(e)
            return jvp(lambda p: f(p, xb), (params,), (cotangent,))[1]

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return vmap(column)(basis)  # (O, O): [a, b] = <J_a(xa), J_b(xb)>

    full = vmap(vmap(pair, (None, 0)), (0, None))(x1, x2)
    if layout == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag.mean(-1) if layout == "trace" else diag
