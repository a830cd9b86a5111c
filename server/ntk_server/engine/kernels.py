"""Empirical NTK blocks: K(x1, x2) for one block of rows and columns.

Shapes, with n1 = len(x1), n2 = len(x2), O = output size:
  full      (n1, n2, O, O)   K[i, j, a, b] = <d f_a(x1_i)/dw, d f_b(x2_j)/dw>
  trace     (n1, n2)         mean over a of K[i, j, a, a]
  diagonal  (n1, n2, O)      K[i, j, a, a]
With batch_diagonal (x2 is x1) only K(x1_i, x1_i): (n1, O, O), (n1,) or (n1, O).

Methods:
  jacobian_contraction  per-example Jacobians (vmap of jacrev), contracted per parameter tensor.
  ntk_vector_products   for each output b, vjps of f_b(x2_j) then jvps through f(x1): the full
                        Jacobian of a block is never held, only one output's slice of it.
  structured            per-layer factors (inputs and back-propagated signals) whose Grams
                        multiply to the kernel; see structured.py.
  auto                  resolved by the cost model (cost.choose_method) from the request shape.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch.func import jacrev, jvp, vjp, vmap

from ntk_server.engine import cost, structured
from ntk_server.engine.network import Network

LAYOUTS = ("full", "trace", "diagonal")
METHODS = ("jacobian_contraction", "ntk_vector_products", "structured")
AUTO = cost.AUTO
# Jacobians of one chunk of examples are computed together up to this size.
JACOBIAN_CHUNK_BYTES = 256 << 20

Params = Mapping[str, torch.Tensor]
Jacobian = dict[str, torch.Tensor]  # name -> (n, O, P_name)


def kernel_shape(n1: int, n2: int, output_size: int, layout: str, batch_diagonal: bool) -> tuple:
    """Shape of a kernel (or block) for the given layout; see the module docstring."""
    lead = (n1,) if batch_diagonal else (n1, n2)
    tail = {"full": (output_size, output_size), "trace": (), "diagonal": (output_size,)}[layout]
    return lead + tail


def jacobian(net: Network, params: Params, x: torch.Tensor) -> Jacobian:
    """Per-example Jacobians of f at params: name -> (n, O, numel(param))."""
    n = x.shape[0]
    chunk = max(
        1, JACOBIAN_CHUNK_BYTES // max(1, net.output_size * net.parameter_count * x.element_size())
    )
    jac_fn = vmap(jacrev(net.apply_one), in_dims=(None, 0))
    parts = [jac_fn(dict(params), x[s : s + chunk]) for s in range(0, n, chunk)]
    return {
        name: torch.cat([p[name] for p in parts]).reshape(n, net.output_size, -1) for name in params
    }


def contract(j1: Jacobian, j2: Jacobian, layout: str, batch_diagonal: bool = False) -> torch.Tensor:
    """Sum over parameter tensors of J1 J2^T in the requested layout."""
    out = None
    for name, a in j1.items():
        b = j2[name]
        n1, o, _ = a.shape
        n2 = b.shape[0]
        if batch_diagonal:
            equation = {"full": "iap,ibp->iab", "trace": "iap,iap->i", "diagonal": "iap,iap->ia"}
            part = torch.einsum(equation[layout], a, b)
            part = part / o if layout == "trace" else part
        elif layout == "trace":
            part = (a.reshape(n1, -1) @ b.reshape(n2, -1).T) / o
        elif layout == "full":
            part = (a.reshape(n1 * o, -1) @ b.reshape(n2 * o, -1).T).reshape(n1, o, n2, o)
            part = part.permute(0, 2, 1, 3)
        else:
            part = torch.bmm(a.transpose(0, 1), b.transpose(0, 1).transpose(1, 2)).permute(1, 2, 0)
        out = part if out is None else out + part
    return out


def ntk_vector_products(
    net: Network,
    params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    layout: str,
    batch_diagonal: bool = False,
) -> torch.Tensor:
    """K(x1, x2) by vjps then jvps, one output index b at a time; x2 None means x1."""
    params = dict(params)
    o = net.output_size
    x2 = x1 if x2 is None else x2
    eye = torch.eye(o, dtype=x1.dtype, device=x1.device)

    def grad_of_output(xj, e_b):
        _, vjp_fn = vjp(lambda p: net.apply_one(p, xj), params)
        return vjp_fn(e_b)[0]

    def push(direction):
        return jvp(lambda p: net.apply(p, x1), (params,), (direction,))[1]

    def push_one(xi, direction):
        return jvp(lambda p: net.apply_one(p, xi), (params,), (direction,))[1]

    columns = []  # per b: (n1, n2, O) or (n1, O) with batch_diagonal
    for b in range(o):
        grads = vmap(grad_of_output, in_dims=(0, None))(x2, eye[b])
        if batch_diagonal:
            columns.append(vmap(push_one)(x1, grads))
        else:
            columns.append(vmap(push)(grads).permute(1, 0, 2))

    if layout == "full":
        return torch.stack(columns, dim=-1)  # [..., a, b]
    diag = torch.stack([col[..., b] for b, col in enumerate(columns)], dim=-1)
    return diag.mean(-1) if layout == "trace" else diag


class KernelComputer:
    """Computes blocks of one request, keeping per-range factors for reuse.

    Blocks of a grid share row and column ranges; what a method computes per range (the
    Jacobian for jacobian_contraction, layer inputs and signals for structured) is kept in a
    small cache bounded by `cache_bytes`, so walking a column of blocks computes the column's
    factors once, and a block whose two keys are equal (a diagonal block of a Gram matrix)
    computes them once and only its tiles on or above the diagonal.

    method "auto" is resolved by the cost model at the first block, from that block's shape;
    a caller that knows the whole request (the scheduler) resolves it with
    cost.choose_method and passes the result, so the stream header can report it.
    """

    def __init__(self, net: Network, params: Params, method: str, layout: str, cache_bytes: int):
        if method not in (*METHODS, AUTO):
            raise ValueError(f"method must be one of {(*METHODS, AUTO)}, got {method!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.net, self.params, self.method, self.layout = net, params, method, layout
        self.method_reason = "" if method == AUTO else "requested"
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, Jacobian] = OrderedDict()
        self._plans: list[structured.LayerPlan] | None = None

    def _cached(self, key: tuple, fn: Callable[[], Jacobian]) -> Jacobian:
        if not key:
            return fn()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = fn()
        if self._size(value) <= self.cache_bytes:
            self._cache[key] = value
            while sum(self._size(v) for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return value

    @staticmethod
    def _size(jac: Jacobian) -> int:
        return sum(t.numel() * t.element_size() for t in jac.values())

    def _resolve(self, x1: torch.Tensor, x2: torch.Tensor | None, batch_diagonal: bool) -> None:
        n2 = None if x2 is None else x2.shape[0]
        self.method, self.method_reason = cost.choose_method(
            self.net, x1.shape[0], n2, self.layout, x1.element_size(),
            x1.shape[0], 0 if n2 is None else n2, batch_diagonal,
        )  # fmt: skip

    def block(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor | None,
        key1: tuple = (),
        key2: tuple = (),
        batch_diagonal: bool = False,
    ) -> torch.Tensor:
        """One block; key1/key2 identify the row and column ranges for the cache.

        x2 None (or batch_diagonal) means the block of x1 against itself. Returns the shape of
        `kernel_shape(len(x1), len(x2), O, layout, batch_diagonal)`.
        """
        if self.method == AUTO:
            self._resolve(x1, x2, batch_diagonal)
        same = x2 is None or batch_diagonal or (bool(key1) and key1 == key2)
        if self.method == "structured":
            if self._plans is None:
                self._plans = structured.plan_layers(self.net, self.layout)

            def factors(x):
                return structured.factors(self.net, self.params, x, self._plans, self.layout)

            f1 = self._cached(key1, lambda: factors(x1))
            f2 = f1 if same else self._cached(key2, lambda: factors(x2))
            return structured.contract_factors(
                self._plans, f1, f2, self.layout, self.net.output_size, batch_diagonal
            )
        with torch.no_grad():
            if self.method == "ntk_vector_products":
                return ntk_vector_products(
                    self.net, self.params, x1, None if same else x2, self.layout, batch_diagonal
                )
            j1 = self._cached(key1, lambda: jacobian(self.net, self.params, x1))
            j2 = j1 if same else self._cached(key2, lambda: jacobian(self.net, self.params, x2))
            return contract(j1, j2, self.layout, batch_diagonal)

    def release(self) -> None:
        self._cache.clear()


def compute_kernel(
    net: Network,
    params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    layout: str = "trace",
    method: str = "jacobian_contraction",
    batch_diagonal: bool = False,
) -> torch.Tensor:
    """The whole kernel K(x1, x2) in one piece (in-process use); shape from `kernel_shape`."""
    return KernelComputer(net, params, method, layout, cache_bytes=0).block(
        x1, x2, batch_diagonal=batch_diagonal
    )
