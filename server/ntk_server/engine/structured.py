"""STRUCTURED kernels: per-layer factors instead of per-parameter Jacobians.

For a layer z = w_scale * a W^T + b_scale * b with input a (F features) and back-propagated
signal d_a = d f_a / d z (C features) the Jacobian of output a is w_scale * d_a a^T, so

    K_W(x, x')[a, b] = w_scale^2 (a(x) . a(x')) (d_a(x) . d_b(x'))
    K_b(x, x')[a, b] = b_scale^2                (d_a(x) . d_b(x'))

and a block of the kernel costs O(n1 n2 (F + O C)) per layer instead of O(n1 n2 O F C).
The per-range factors (inputs a and signals d of every parametrised layer) come from one
forward pass and one batched backward pass over the O output basis vectors; they are what
KernelComputer caches per row or column range and what the cost model (cost.py) counts.

Rules, chosen per layer by `plan_layers`:
  gram            dense on a vector: the two Grams above.
  readout         a gram layer followed only by elementwise activations (and flatten) and a
                  final dense readout, in the trace layout; see NOTE (readout).
  layer_jacobian  a layer with positions (conv1d/conv2d, dense on a >1-D input); see NOTE
                  (positions).
  fallback        a parametrised module with no rule: autograd per-example Jacobian of that
                  module's parameters only (vmap of jacrev), contracted like jacobian_contraction.
Pooling, flatten, layer norm, activations and residual blocks have no parameters; autograd
carries the signals through them, so they need no rule of their own.

NOTE (readout). If a layer's output reaches the network output only through elementwise
activations phi and a dense readout V = w_scale_L W_L (O, C), its signal is
d_a(x) = phi'(z(x)) * V[a], so sum_a d_a(x) . d_a(x') = sum_k m_k(x) m_k(x') sum_a V[a, k]^2
with m = phi'(z). The trace-layout signal Gram then needs C features, r = m * sqrt(sum_a V^2),
instead of O C.

NOTE (positions). With positions s (conv output pixels via im2col patches p_s, or the leading
axes of a dense input) the Jacobian is w_scale sum_s d_{a,s} p_s^T and the exact pairwise form
sums Gram products over pairs of positions, O(n1 n2 S^2 (F + O C)). Forming the layer's own
Jacobian from the factors, O(n O S C F), and contracting it, O(n1 n2 O C F), is exact and
cheaper for the small-image convolutions this service targets, so that is the rule used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F

from ntk_server.engine.network import Activation, Conv, Dense, Flatten, Network, Residual

RULE_GRAM = "gram"
RULE_READOUT = "readout"
RULE_LAYER_JACOBIAN = "layer_jacobian"
RULE_FALLBACK = "fallback"
# Fallback Jacobians of one chunk of examples are computed together up to this size.
FALLBACK_CHUNK_BYTES = 256 << 20
# The Gram of a range with itself is cut into tiles of about this many Gram rows (examples,
# or examples x outputs in the full layout); only tiles on or above the diagonal are
# computed. Tiles this size also keep each Gram product and its elementwise work in cache.
SYMMETRIC_TILE_ROWS = 128

Params = Mapping[str, torch.Tensor]
Factors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerPlan:
    """One parametrised module and the rule that computes its share of the kernel.

    Shapes are per example. `positions` S, `fan_in` F (patch size for a convolution) and
    `channels` C describe the factors: inputs (S, F) and signals (O, S, C).
    """

    path: str
    rule: str
    param_names: tuple[str, ...]
    param_count: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    positions: int
    fan_in: int
    channels: int
    has_bias: bool
    w_scale: float
    b_scale: float


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _run(module: nn.Module, path: str, x: torch.Tensor, params: Params, taps: list) -> torch.Tensor:
    """Forward pass that records (path, module, input, output) of every parametrised module."""
    if isinstance(module, nn.Sequential):
        h = x
        for name, child in module.named_children():
            h = _run(child, _join(path, name), h, params, taps)
        return x + h if isinstance(module, Residual) else h
    names = [n for n, _ in module.named_parameters()]
    if not names:
        return module(x)
    if isinstance(module, (Dense, Conv)):
        # The scales are folded into the weights so that neither the forward pass nor the
        # batched backward pass spends a separate elementwise pass on them.
        weight = params[_join(path, "weight")] * module.w_scale
        bias = params[_join(path, "bias")] * module.b_scale if module.bias is not None else None
        if isinstance(module, Dense):
            z = F.linear(x, weight, bias)
        else:
            z = module.conv(x, weight, bias, stride=module.stride, padding=module.padding)
    else:
        z = functional_call(module, {n: params[_join(path, n)] for n in names}, (x,))
    taps.append((path, module, x, z))
    return z


def _readout_paths(net: Network) -> set[str]:
    """Top-level layers whose signals are phi'(z) * V[a]; see NOTE (readout)."""
    top = list(net.module.named_children())
    if not top or not isinstance(top[-1][1], Dense):
        return set()
    paths = set()
    for i in range(len(top) - 2, -1, -1):
        name, module = top[i]
        if isinstance(module, Dense):
            paths.add(name)
            break
        if not isinstance(module, (Activation, Flatten)):
            break
    return paths


def plan_layers(net: Network, layout: str) -> list[LayerPlan]:
    """The rule for every parametrised module, from a forward pass on the meta device."""
    params = {n: torch.empty(s, device="meta") for n, s in net.param_shapes.items()}
    taps: list = []
    _run(net.module, "", torch.empty(1, *net.input_shape, device="meta"), params, taps)
    readout = _readout_paths(net) if layout == "trace" else set()

    plans = []
    for path, module, a, z in taps:
        names = tuple(_join(path, n) for n, _ in module.named_parameters())
        count = sum(math.prod(net.param_shapes[n]) for n in names)
        in_shape, out_shape = tuple(a.shape[1:]), tuple(z.shape[1:])
        has_bias = getattr(module, "bias", None) is not None
        if isinstance(module, Dense):
            positions = math.prod(in_shape[:-1])
            rule = RULE_GRAM if positions == 1 else RULE_LAYER_JACOBIAN
            if rule == RULE_GRAM and path in readout:
                rule = RULE_READOUT
            fan_in, channels = module.fan_in, module.width
        elif isinstance(module, Conv):
            rule, positions = RULE_LAYER_JACOBIAN, math.prod(out_shape[1:])
            fan_in, channels = module.fan_in, out_shape[0]
        else:
            rule, positions, fan_in, channels = RULE_FALLBACK, 1, 0, 0
        plans.append(
            LayerPlan(
                path=path,
                rule=rule,
                param_names=names,
                param_count=count,
                input_shape=in_shape,
                output_shape=out_shape,
                positions=positions,
                fan_in=fan_in,
                channels=channels,
                has_bias=has_bias,
                w_scale=float(getattr(module, "w_scale", 1.0)),
                b_scale=float(getattr(module, "b_scale", 1.0)),
            )
        )
    return plans


def _patches(module: Conv, a: torch.Tensor) -> torch.Tensor:
    """im2col patches of a conv input: (n, C_in * prod(kernel), S) in the weight's order."""
    kernel = tuple(module.weight.shape[2:])
    if len(kernel) == 1:
        return F.unfold(
            a.unsqueeze(2),
            (1, kernel[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        )
    return F.unfold(a, kernel, padding=module.padding, stride=module.stride)


def _readout_factor(net: Network, plan: LayerPlan, z: torch.Tensor, params: Params):
    """r = phi'(z) * sqrt(sum_a V[a]^2): (n, C); see NOTE (readout)."""
    top = list(net.module.named_children())
    start = [name for name, _ in top].index(plan.path) + 1
    readout_name, readout = top[-1]
    z = z.detach().requires_grad_(True)
    h = z
    for _, module in top[start:-1]:
        h = module(h)
    (mask,) = torch.autograd.grad(h.sum(), z)
    v = params[f"{readout_name}.weight"] * readout.w_scale
    return mask.flatten(1) * v.square().sum(0).sqrt()


def _fallback_jacobian(net: Network, params: Params, plan: LayerPlan, x: torch.Tensor):
    """Per-example Jacobian of f for one module's parameters: (n, O, P_module)."""
    sub = {n: params[n] for n in plan.param_names}
    rest = {n: p for n, p in params.items() if n not in sub}

    def f(p, xi):
        return net.apply_one({**rest, **p}, xi)

    o, n = net.output_size, x.shape[0]
    chunk = max(1, FALLBACK_CHUNK_BYTES // max(1, o * plan.param_count * x.element_size()))
    jac_fn = vmap(jacrev(f), in_dims=(None, 0))
    parts = []
    for s in range(0, n, chunk):
        jac = jac_fn(sub, x[s : s + chunk])
        parts.append(torch.cat([jac[k].flatten(2) for k in plan.param_names], dim=2))
    return torch.cat(parts)


def factors(
    net: Network, params: Params, x: torch.Tensor, plans: list[LayerPlan], layout: str
) -> Factors:
    """Per-range factors of every layer, keyed "<path>:<factor>".

    Factors: "a" inputs (n, F); "d" signals, (n, O C) in trace layout, (O, n, C) in diagonal
    and (n O, C) in full; "r" readout signals (n, C); "jw" and "jb" the weight and bias
    Jacobians of layer_jacobian and fallback layers, (n, O, P).

    NOTE (batched backward). The signals of all O outputs come from one backward pass. For
    dense layers and activations a vmapped backward (is_grads_batched) runs as wide matmuls.
    Convolution backward has no batching rule and would loop over the outputs, so networks
    with layers that need per-position signals instead run the forward pass on O copies of
    the range and one ordinary backward, copy a carrying e_a: O times the forward flops, but
    large convolutions instead of O small ones.
    """
    o, n = net.output_size, x.shape[0]
    out: Factors = {}
    need = [p for p in plans if p.rule in (RULE_GRAM, RULE_LAYER_JACOBIAN)]
    # See NOTE (batched backward) below.
    replicate = any(p.rule == RULE_LAYER_JACOBIAN for p in need)
    with torch.enable_grad():
        taps: list = []
        xin = x.detach().repeat(o, *([1] * (x.dim() - 1))) if replicate else x.detach()
        y = _run(net.module, "", xin.requires_grad_(True), params, taps)
        by_path = {path: (module, a[:n], z) for path, module, a, z in taps}
        for plan in plans:
            if plan.rule == RULE_READOUT:
                z = by_path[plan.path][2][:n]
                out[f"{plan.path}:r"] = _readout_factor(net, plan, z, params).detach()
            elif plan.rule == RULE_FALLBACK:
                out[f"{plan.path}:jw"] = _fallback_jacobian(net, params, plan, x)
        signals = []
        if need:
            zs = [by_path[p.path][2] for p in need]
            eye = torch.eye(o, dtype=y.dtype, device=y.device)
            if replicate:
                basis = eye.repeat_interleave(n, dim=0)  # row a * n + i is e_a
                grads = torch.autograd.grad(y, zs, basis)
                signals = [g.reshape(o, n, *g.shape[1:]) for g in grads]
            else:
                basis = eye.unsqueeze(1).expand(o, n, o)
                signals = list(torch.autograd.grad(y, zs, basis, is_grads_batched=True))
            # signals[k] is (O, n, *z.shape[1:]): d f_a / d z of layer k for example i.
    inputs = {path: (module, a.detach()) for path, (module, a, _) in by_path.items()}
    del y, taps, by_path, xin  # frees the autograd graph before the factors are reshaped
    for plan in plans:
        if plan.rule in (RULE_GRAM, RULE_READOUT):
            out[f"{plan.path}:a"] = inputs[plan.path][1]

    for k, plan in enumerate(need):
        module, a = inputs[plan.path]
        d, signals[k] = signals[k], None  # each signal is released once reshaped
        if plan.rule == RULE_GRAM:
            if layout == "diagonal":
                out[f"{plan.path}:d"] = d.contiguous()
            else:
                d = d.transpose(0, 1).contiguous()  # (n, O, C)
                flat = (n, -1) if layout == "trace" else (n * o, -1)
                out[f"{plan.path}:d"] = d.reshape(flat)
            continue
        # layer_jacobian: patches (n, S, F) and signals (O, n, S, C).
        if isinstance(module, Conv):
            p = _patches(module, a).transpose(1, 2)
            d = d.flatten(3).transpose(2, 3)
        else:
            p = a.reshape(n, plan.positions, plan.fan_in)
            d = d.reshape(o, n, plan.positions, plan.channels)
        if plan.w_scale != 1.0:
            p = p * plan.w_scale  # the patches are smaller than the Jacobian
        out[f"{plan.path}:jw"] = torch.einsum("ansc,nsf->nacf", d, p).reshape(n, o, -1)
        if plan.has_bias:
            bias = d.sum(2).transpose(0, 1)
            out[f"{plan.path}:jb"] = bias * plan.b_scale if plan.b_scale != 1.0 else bias
    return out


def _gram(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u v^T for factors with examples on the first axis."""
    return u @ v.T


def _add_gram_term(
    out: torch.Tensor | None,
    plan: LayerPlan,
    f1: Factors,
    f2: Factors,
    layout: str,
    o: int,
    batch_diagonal: bool,
) -> torch.Tensor:
    """out + one gram or readout layer's share of a block, in the block's layout."""
    a1, a2 = f1[f"{plan.path}:a"], f2[f"{plan.path}:a"]
    w2 = plan.w_scale**2
    b2 = plan.b_scale**2 if plan.has_bias else 0.0
    if batch_diagonal:
        inputs = a1.square().sum(-1) * w2 + b2  # (n,)
        if plan.rule == RULE_READOUT:
            part = inputs * f1[f"{plan.path}:r"].square().sum(-1) / o
        else:
            d = f1[f"{plan.path}:d"]
            if layout == "trace":
                part = inputs * d.square().sum(-1) / o
            elif layout == "diagonal":
                part = inputs[:, None] * d.square().sum(-1).T
            else:
                d = d.reshape(-1, o, d.shape[-1])
                part = inputs[:, None, None] * (d @ d.transpose(1, 2))
        return part if out is None else out.add_(part)

    inputs = _gram(a1, a2)  # (n1, n2)
    if layout == "trace":
        key = f"{plan.path}:r" if plan.rule == RULE_READOUT else f"{plan.path}:d"
        signals = _gram(f1[key], f2[key])
        if out is None:
            out = torch.zeros_like(inputs)
        # Two fused passes over the block: out += (w2 GA + b2) * GD / O.
        out.addcmul_(inputs, signals, value=w2 / o)
        return out.add_(signals, alpha=b2 / o) if b2 else out
    inputs = inputs.mul_(w2).add_(b2) if b2 else inputs.mul_(w2)
    d1, d2 = f1[f"{plan.path}:d"], f2[f"{plan.path}:d"]
    if layout == "diagonal":
        part = torch.bmm(d1, d2.transpose(1, 2)).mul_(inputs).permute(1, 2, 0)  # (n1, n2, O)
    else:
        n1, n2 = a1.shape[0], a2.shape[0]
        part = _gram(d1, d2).reshape(n1, o, n2, o).permute(0, 2, 1, 3)
        part = part * inputs[:, :, None, None]
    return part if out is None else out.add_(part)


def _contract(plans, f1, f2, layout, o, batch_diagonal) -> torch.Tensor:
    from ntk_server.engine.kernels import contract  # kernels imports this module

    out = None
    j1, j2 = {}, {}
    for plan in plans:
        if plan.rule in (RULE_GRAM, RULE_READOUT):
            out = _add_gram_term(out, plan, f1, f2, layout, o, batch_diagonal)
        else:
            for key in (f"{plan.path}:jw", f"{plan.path}:jb"):
                if key in f1:
                    j1[key], j2[key] = f1[key], f2[key]
    if j1:
        part = contract(j1, j2, layout, batch_diagonal)
        out = part if out is None else out.add_(part)
    return out.contiguous()


def _rows(f: Factors, start: int, stop: int, layout: str, o: int) -> Factors:
    """The factors of examples start:stop of a range (views, no copies)."""
    out = {}
    for key, t in f.items():
        if key.endswith(":d") and layout == "diagonal":
            out[key] = t[:, start:stop]
        elif key.endswith(":d") and layout == "full":
            out[key] = t[start * o : stop * o]
        else:
            out[key] = t[start:stop]
    return out


def _range_size(f: Factors, layout: str, o: int) -> int:
    key, t = next(iter(f.items()))
    if key.endswith(":d") and layout == "diagonal":
        return t.shape[1]
    return t.shape[0] // o if key.endswith(":d") and layout == "full" else t.shape[0]


def _contract_symmetric(plans, f, layout, o, tile) -> torch.Tensor:
    """K(x, x) tile by tile: tiles above the diagonal are computed once and mirrored."""
    n = _range_size(f, layout, o)
    starts = list(range(0, n, tile))
    tiles = [_rows(f, s, min(s + tile, n), layout, o) for s in starts]
    out = None
    for i, si in enumerate(starts):
        for j in range(i, len(starts)):
            sj = starts[j]
            part = _contract(plans, tiles[i], tiles[j], layout, o, False)
            if out is None:
                out = part.new_empty((n, n, *part.shape[2:]))
            rows, cols = slice(si, si + part.shape[0]), slice(sj, sj + part.shape[1])
            out[rows, cols] = part
            if j > i:
                # K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b].
                mirror = part.transpose(0, 1)
                out[cols, rows] = mirror.transpose(2, 3) if layout == "full" else mirror
    return out


def symmetric_tile_examples(layout: str, output_size: int) -> int:
    """Examples per tile of a Gram of one range (see SYMMETRIC_TILE_ROWS)."""
    per_example = output_size if layout == "full" else 1
    return max(1, SYMMETRIC_TILE_ROWS // per_example)


def contract_factors(
    plans: list[LayerPlan],
    f1: Factors,
    f2: Factors,
    layout: str,
    output_size: int,
    batch_diagonal: bool = False,
) -> torch.Tensor:
    """K(x1, x2) from two ranges' factors; shape as kernels.kernel_shape.

    f2 is f1 means the Gram of one range: only tiles on or above the diagonal are computed.
    """
    with torch.no_grad():
        if f2 is f1 and not batch_diagonal:
            tile = symmetric_tile_examples(layout, output_size)
            return _contract_symmetric(plans, f1, layout, output_size, tile)
        return _contract(plans, f1, f2, layout, output_size, batch_diagonal)


def structured_kernel(
    net: Network,
    params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    layout: str,
    batch_diagonal: bool = False,
) -> torch.Tensor:
    """K(x1, x2) by the structured method in one piece; x2 None means the Gram of x1.

    Returns (n1, n2, O, O) full, (n1, n2) trace or (n1, n2, O) diagonal; with batch_diagonal
    (n1, O, O), (n1,) or (n1, O).
    """
    plans = plan_layers(net, layout)
    f1 = factors(net, params, x1, plans, layout)
    f2 = f1 if x2 is None or batch_diagonal else factors(net, params, x2, plans, layout)
    return contract_factors(plans, f1, f2, layout, net.output_size, batch_diagonal)
