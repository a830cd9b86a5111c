"""Declarative architectures: a spec dict -> a torch module with named parameters.

The module is only a container: kernels call it functionally through `Network.apply(params, x)`
so that the same weights can be held in several dtypes and on several devices. Parameter names
follow nn.Sequential ("<index>.weight", "<index>.bias", "<block>.<inner>.weight").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ntk_server.errors import InvalidArgument, ResourceExhausted, short

DEFAULT_SIGMA_W = 1.0
DEFAULT_SIGMA_B = 0.0
DEFAULT_LEAKY_SLOPE = 0.01
DEFAULT_LAYER_NORM_EPS = 1e-5
MAX_INPUT_DIMS = 4
MAX_INPUT_ELEMENTS = 1 << 28  # per example; keeps every layer's size within int64
MAX_LAYERS = 256  # in the whole spec, residual blocks' layers included
MAX_RESIDUAL_DEPTH = 8
# Larger scales overflow float32 activations and make every kernel entry inf.
MAX_SIGMA = 1e3
MAX_LEAKY_SLOPE = 1e3
MAX_WIDTH = 1 << 20
MAX_PARAMETERS = 1 << 31

ACTIVATION_FNS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "identity": lambda x: x,
}


@dataclass(frozen=True)
class Scaling:
    """How a layer multiplies its raw parameters (see `parameterization`)."""

    parameterization: str
    sigma_w: float
    sigma_b: float

    def weight_scale(self, fan_in: int) -> float:
        return self.sigma_w / math.sqrt(fan_in) if self.parameterization == "ntk" else 1.0

    def bias_scale(self) -> float:
        return self.sigma_b if self.parameterization == "ntk" else 1.0

    def weight_init_std(self, fan_in: int) -> float:
        return 1.0 if self.parameterization == "ntk" else self.sigma_w / math.sqrt(fan_in)

    def bias_init_std(self) -> float:
        return 1.0 if self.parameterization == "ntk" else self.sigma_b


class Dense(nn.Module):
    """y = scale_w * x W^T + scale_b * b on the last axis; weight (width, fan_in)."""

    def __init__(self, fan_in: int, width: int, bias: bool, scaling: Scaling):
        super().__init__()
        self.fan_in, self.width = fan_in, width
        self.w_scale = scaling.weight_scale(fan_in)
        self.b_scale = scaling.bias_scale()
        self.weight = nn.Parameter(torch.empty(width, fan_in, device="meta"))
        self.bias = nn.Parameter(torch.empty(width, device="meta")) if bias else None

    def forward(self, x):
        y = F.linear(x, self.weight) * self.w_scale
        return y if self.bias is None else y + self.bias * self.b_scale


class Conv(nn.Module):
    """conv1d / conv2d, channels first; weight (channels, in_channels, *kernel_size)."""

    def __init__(self, in_channels, channels, kernel_size, stride, padding, bias, scaling):
        super().__init__()
        self.fan_in = in_channels * math.prod(kernel_size)
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.w_scale = scaling.weight_scale(self.fan_in)
        self.b_scale = scaling.bias_scale()
        shape = (channels, in_channels, *kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device="meta"))
        self.bias = nn.Parameter(torch.empty(channels, device="meta")) if bias else None
        self.conv = F.conv1d if len(kernel_size) == 1 else F.conv2d

    def forward(self, x):
        y = self.conv(x, self.weight, stride=self.stride, padding=self.padding) * self.w_scale
        if self.bias is None:
            return y
        return y + (self.bias * self.b_scale).view(-1, *([1] * (y.dim() - 2)))


class Activation(nn.Module):
    def __init__(self, kind: str, negative_slope: float = DEFAULT_LEAKY_SLOPE):
        super().__init__()
        self.kind, self.negative_slope = kind, negative_slope

    def forward(self, x):
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, self.negative_slope)
        return ACTIVATION_FNS[self.kind](x)


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=tuple(range(2, x.dim())))


class AvgPool(nn.Module):
    def __init__(self, window, stride):
        super().__init__()
        self.window, self.stride = tuple(window), tuple(stride)

    def forward(self, x):
        pool = F.avg_pool1d if len(self.window) == 1 else F.avg_pool2d
        return pool(x, self.window, self.stride)


class LayerNorm(nn.Module):
    """Normalises every axis after the batch axis; no learned parameters."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        dims = tuple(range(1, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps)


class Residual(nn.Sequential):
    """y = x + f(x), f the inner layers."""

    def forward(self, x):
        return x + super().forward(x)


def _positive_ints(values, count: int | None, field: str, *, allow_zero=False) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    low = 0 if allow_zero else 1
    if count is not None and len(values) != count:
        raise InvalidArgument(
            f"needs {count} values, got {list(values)}", field=field, value=values
        )
    if any(v < low for v in values):
        raise InvalidArgument(
            f"values must be >= {low}, got {list(values)}", field=field, value=values
        )
    return values


class _Builder:
    """Walks a spec dict, infers shapes, and raises InvalidArgument naming the layer field."""

    def __init__(self, scaling: Scaling):
        self.scaling = scaling
        self.count = 0
        self.depth = 0

    def build(self, layers, shape: tuple[int, ...], where: str) -> tuple[nn.Sequential, tuple]:
        self.count += len(layers)
        if self.count > MAX_LAYERS:
            raise InvalidArgument(
                f"at most {MAX_LAYERS} layers in all, got {self.count} so far", field=where
            )
        seq = nn.Sequential()
        for i, layer in enumerate(layers):
            module, shape = self.layer(layer, shape, f"{where}[{i}]")
            seq.append(module)
        return seq, shape

    def layer(self, layer: Mapping, shape: tuple[int, ...], where: str):
        kind = layer.get("type")
        if kind in ("conv1d", "conv2d"):
            kind = "conv"
        if kind == "dense":
            width = int(layer.get("width", 0))
            if not 1 <= width <= MAX_WIDTH:
                raise InvalidArgument(
                    f"must be in [1, {MAX_WIDTH}], got {width}", field=f"{where}.width"
                )
            module = Dense(shape[-1], width, bool(layer.get("bias", True)), self.scaling)
            return module, (*shape[:-1], width)
        if kind == "conv":
            return self.conv(layer, shape, where)
        if kind in ACTIVATION_FNS or kind == "leaky_relu":
            slope = float(layer.get("negative_slope", DEFAULT_LEAKY_SLOPE))
            if not abs(slope) <= MAX_LEAKY_SLOPE:  # also false for NaN
                raise InvalidArgument(
                    f"must be finite with |slope| <= {MAX_LEAKY_SLOPE:g}, got {slope}",
                    field=f"{where}.negative_slope",
                )
            return Activation(kind, slope), shape
        if kind == "flatten":
            return Flatten(), (math.prod(shape),)
        if kind == "global_avg_pool":
            if len(shape) < 2:
                raise InvalidArgument(
                    f"needs a (channels, *spatial) input, got shape {list(shape)}", field=where
                )
            return GlobalAvgPool(), (shape[0],)
        if kind == "avg_pool":
            return self.avg_pool(layer, shape, where)
        if kind == "layer_norm":
            eps = float(layer.get("eps", DEFAULT_LAYER_NORM_EPS))
            if not (math.isfinite(eps) and eps > 0):
                raise InvalidArgument(f"must be finite and > 0, got {eps}", field=f"{where}.eps")
            return LayerNorm(eps), shape
        if kind == "residual":
            self.depth += 1
            if self.depth > MAX_RESIDUAL_DEPTH:
                raise InvalidArgument(
                    f"residual blocks nest at most {MAX_RESIDUAL_DEPTH} deep", field=where
                )
            inner, out = self.build(layer.get("layers", []), shape, f"{where}.layers")
            self.depth -= 1
            if out != shape:
                raise InvalidArgument(
                    f"inner layers map shape {list(shape)} to {list(out)}; a residual block must "
                    "keep the shape",
                    field=where,
                )
            return Residual(*inner), shape
        raise InvalidArgument(
            f"unknown layer type {short(kind)}", field=f"{where}.type", value=kind
        )

    def conv(self, layer, shape, where):
        kernel = layer.get("kernel_size", [])
        ndim = len(kernel)
        if ndim not in (1, 2):
            raise InvalidArgument(
                f"needs 1 (conv1d) or 2 (conv2d) values, got {list(kernel)}",
                field=f"{where}.kernel_size",
            )
        if len(shape) != ndim + 1:
            raise InvalidArgument(
                f"conv{ndim}d needs a (channels, *{ndim} spatial) input, got shape {list(shape)}",
                field=where,
            )
        kernel = _positive_ints(kernel, ndim, f"{where}.kernel_size")
        stride = _positive_ints(layer.get("stride") or [1] * ndim, ndim, f"{where}.stride")
        padding = _positive_ints(
            layer.get("padding") or [0] * ndim, ndim, f"{where}.padding", allow_zero=True
        )
        channels = int(layer.get("channels", 0))
        if not 1 <= channels <= MAX_WIDTH:
            raise InvalidArgument(
                f"must be in [1, {MAX_WIDTH}], got {channels}", field=f"{where}.channels"
            )
        spatial = []
        for n, k, s, p in zip(shape[1:], kernel, stride, padding, strict=True):
            size = (n + 2 * p - k) // s + 1
            if size < 1:
                raise InvalidArgument(
                    f"kernel {list(kernel)} does not fit input {list(shape)} with padding "
                    f"{list(padding)}",
                    field=f"{where}.kernel_size",
                )
            spatial.append(size)
        bias = bool(layer.get("bias", True))
        module = Conv(shape[0], channels, kernel, stride, padding, bias, self.scaling)
        return module, (channels, *spatial)

    def avg_pool(self, layer, shape, where):
        window = layer.get("window", [])
        ndim = len(window)
        if ndim not in (1, 2) or len(shape) != ndim + 1:
            raise InvalidArgument(
                f"window {list(window)} does not match input shape {list(shape)}",
                field=f"{where}.window",
            )
        window = _positive_ints(window, ndim, f"{where}.window")
        stride = _positive_ints(layer.get("stride") or window, ndim, f"{where}.stride")
        spatial = [(n - w) // s + 1 for n, w, s in zip(shape[1:], window, stride, strict=True)]
        if min(spatial) < 1:
            raise InvalidArgument(
                f"window {list(window)} larger than input {list(shape)}", field=where
            )
        return AvgPool(window, stride), (shape[0], *spatial)


class Network:
    """A registered architecture: spec, shapes, and a functional forward pass.

    Args:
      spec: a spec dict (see ntk_client.spec); validated here.
    """

    def __init__(self, spec: Mapping):
        param = spec.get("parameterization", "standard")
        if param not in ("standard", "ntk"):
            raise InvalidArgument(
                f"must be 'standard' or 'ntk', got {short(param)}", field="spec.parameterization"
            )
        init = spec.get("init", {}) or {}
        sigma_w = float(init.get("sigma_w", DEFAULT_SIGMA_W))
        sigma_b = float(init.get("sigma_b", DEFAULT_SIGMA_B))
        if not 0 < sigma_w <= MAX_SIGMA:
            raise InvalidArgument(
                f"must be in (0, {MAX_SIGMA:g}], got {sigma_w}", field="spec.init.sigma_w"
            )
        if not 0 <= sigma_b <= MAX_SIGMA:
            raise InvalidArgument(
                f"must be in [0, {MAX_SIGMA:g}], got {sigma_b}", field="spec.init.sigma_b"
            )
        shape = tuple(int(s) for s in spec.get("input_shape", []))
        if not 1 <= len(shape) <= MAX_INPUT_DIMS or min(shape) < 1:
            raise InvalidArgument(
                f"needs 1 to {MAX_INPUT_DIMS} positive dimensions, got {list(shape)}",
                field="spec.input_shape",
            )
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise InvalidArgument(
                f"{list(shape)} has {math.prod(shape)} elements per example, over the limit of "
                f"{MAX_INPUT_ELEMENTS}",
                field="spec.input_shape",
            )
        layers = spec.get("layers", [])
        if not layers:
            raise InvalidArgument("needs at least one layer", field="spec.layers")

        self.scaling = Scaling(param, sigma_w, sigma_b)
        self.seed = int(init.get("seed", 0))
        self.input_shape = shape
        self.module, out_shape = _Builder(self.scaling).build(layers, shape, "spec.layers")
        if len(out_shape) != 1:
            raise InvalidArgument(
                f"the network must end in a vector per example, got output shape {list(out_shape)};"
                " add a flatten or global_avg_pool layer",
                field="spec.layers",
            )
        self.output_size = out_shape[0]
        self.param_shapes = {n: tuple(p.shape) for n, p in self.module.named_parameters()}
        if not self.param_shapes:
            raise InvalidArgument("the network has no parameters", field="spec.layers")
        self.parameter_count = sum(math.prod(s) for s in self.param_shapes.values())
        if self.parameter_count > MAX_PARAMETERS:
            raise ResourceExhausted(
                f"{self.parameter_count} parameters is over the limit of {MAX_PARAMETERS}",
                field="spec.layers",
            )

    def init_params(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Seeded float64 initial weights (CPU), identical on every machine for a given seed."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        params = {}
        for name, module in self._param_owners():
            fan_in = module.fan_in
            w = torch.randn(module.weight.shape, generator=gen, dtype=torch.float64)
            params[f"{name}.weight"] = w * self.scaling.weight_init_std(fan_in)
            if module.bias is not None:
                b = torch.randn(module.bias.shape, generator=gen, dtype=torch.float64)
                params[f"{name}.bias"] = b * self.scaling.bias_init_std()
        return params

    def _param_owners(self):
        for name, module in self.module.named_modules():
            if isinstance(module, (Dense, Conv)):
                yield name, module

    def check_params(self, params: Mapping[str, torch.Tensor], field: str = "weights") -> None:
        """Name-by-name and shape-by-shape check of uploaded weights."""
        missing = sorted(set(self.param_shapes) - set(params))
        extra = sorted(set(params) - set(self.param_shapes))
        if missing:
            raise InvalidArgument(f"missing parameter(s) {missing}", field=field, value=missing)
        if extra:
            raise InvalidArgument(
                f"unexpected parameter(s) {extra}; expected {sorted(self.param_shapes)}",
                field=field,
                value=extra,
            )
        for name, shape in self.param_shapes.items():
            got = tuple(params[name].shape)
            if got != shape:
                raise InvalidArgument(
                    f"shape {list(got)} does not match the spec's {list(shape)}",
                    field=f"{field}[{name!r}]",
                    value=got,
                )
            if not torch.isfinite(params[name]).all():
                raise InvalidArgument("contains non-finite values", field=f"{field}[{name!r}]")

    def apply(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f(x; params): x (N, *input_shape) -> (N, O)."""
        return functional_call(self.module, dict(params), (x,))

    def apply_one(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f for a single example: x (*input_shape) -> (O,). For vmap."""
        return self.apply(params, x.unsqueeze(0)).squeeze(0)


def _canonical_layer(layer: Mapping) -> dict:
    kind = layer["type"]
    if kind in ("conv", "conv1d", "conv2d"):
        ndim = len(layer["kernel_size"])
        return {
            "type": "conv",
            "channels": int(layer["channels"]),
            "kernel_size": [int(k) for k in layer["kernel_size"]],
            "stride": [int(s) for s in (layer.get("stride") or [1] * ndim)],
            "padding": [int(p) for p in (layer.get("padding") or [0] * ndim)],
            "bias": bool(layer.get("bias", True)),
        }
    if kind == "dense":
        return {
            "type": "dense",
            "width": int(layer["width"]),
            "bias": bool(layer.get("bias", True)),
        }
    if kind == "leaky_relu":
        slope = float(layer.get("negative_slope", DEFAULT_LEAKY_SLOPE))
        return {"type": kind, "negative_slope": slope}
    if kind == "avg_pool":
        window = [int(w) for w in layer["window"]]
        return {
            "type": kind,
            "window": window,
            "stride": [int(s) for s in (layer.get("stride") or window)],
        }
    if kind == "layer_norm":
        return {"type": kind, "eps": float(layer.get("eps", DEFAULT_LAYER_NORM_EPS))}
    if kind == "residual":
        return {"type": kind, "layers": [_canonical_layer(x) for x in layer.get("layers", [])]}
    return {"type": kind}


def canonical_spec(spec: Mapping) -> dict:
    """The spec with every default written out, so equal networks have equal specs.

    Validates by building the network first.
    """
    Network(spec)
    init = spec.get("init", {}) or {}
    return {
        "input_shape": [int(s) for s in spec["input_shape"]],
        "layers": [_canonical_layer(layer) for layer in spec["layers"]],
        "parameterization": spec.get("parameterization", "standard"),
        "init": {
            "seed": int(init.get("seed", 0)),
            "sigma_w": float(init.get("sigma_w", DEFAULT_SIGMA_W)),
            "sigma_b": float(init.get("sigma_b", DEFAULT_SIGMA_B)),
        },
    }
