"""Architecture specs as plain dicts <-> ntk.v1.ArchitectureSpec.

A spec dict looks like::

    {
        "input_shape": [64],
        "layers": [
            {"type": "dense", "width": 512}, {"type": "relu"},
            {"type": "dense", "width": 10},
        ],
        "parameterization": "standard",          # or "ntk"
        "init": {"seed": 0, "sigma_w": 1.0, "sigma_b": 0.0},
    }

Layer types: dense (width, bias), conv (channels, kernel_size, stride, padding, bias; "conv1d"
and "conv2d" are accepted aliases), the activations relu, tanh, erf, gelu, sigmoid, softplus,
leaky_relu (negative_slope) and identity, flatten, avg_pool (window, stride), global_avg_pool,
layer_norm (eps) and residual (layers).
"""

from __future__ import annotations

from typing import Any

from ntk_client._proto.ntk.v1 import model_pb2

ACTIVATIONS = {
    "relu": model_pb2.RELU,
    "tanh": model_pb2.TANH,
    "erf": model_pb2.ERF,
    "gelu": model_pb2.GELU,
    "sigmoid": model_pb2.SIGMOID,
    "softplus": model_pb2.SOFTPLUS,
    "leaky_relu": model_pb2.LEAKY_RELU,
    "identity": model_pb2.IDENTITY,
}
_ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()}
# Deeper nesting than protobuf decodes (its recursion limit); the server allows less still.
MAX_NESTING = 16
PARAMETERIZATIONS = {"standard": model_pb2.STANDARD, "ntk": model_pb2.NTK}
LAYER_TYPES = (
    "dense",
    "conv",
    *ACTIVATIONS,
    "flatten",
    "avg_pool",
    "global_avg_pool",
    "layer_norm",
    "residual",
)


def _ints(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in value]
    except TypeError:
        raise ValueError(f"{where} must be an int or a list of ints, got {value!r}") from None


def _layer_to_proto(layer: dict, where: str) -> model_pb2.Layer:
    if not isinstance(layer, dict) or "type" not in layer:
        raise ValueError(f"{where} must be a dict with a 'type', got {layer!r}")
    kind = str(layer["type"]).lower()
    msg = model_pb2.Layer()
    if kind == "dense":
        msg.dense.width = int(layer.get("width", 0))
        if "bias" in layer:
            msg.dense.bias = bool(layer["bias"])
    elif kind in ("conv", "conv1d", "conv2d"):
        conv = msg.conv
        conv.channels = int(layer.get("channels", 0))
        conv.kernel_size.extend(_ints(layer.get("kernel_size", []), f"{where}.kernel_size"))
        conv.stride.extend(_ints(layer.get("stride", []), f"{where}.stride"))
        conv.padding.extend(_ints(layer.get("padding", []), f"{where}.padding"))
        if "bias" in layer:
            conv.bias = bool(layer["bias"])
    elif kind in ACTIVATIONS:
        msg.activation.kind = ACTIVATIONS[kind]
        if "negative_slope" in layer:
            msg.activation.negative_slope = float(layer["negative_slope"])
    elif kind == "flatten":
        msg.flatten.SetInParent()
    elif kind == "global_avg_pool":
        msg.global_avg_pool.SetInParent()
    elif kind == "avg_pool":
        msg.avg_pool.window.extend(_ints(layer.get("window", []), f"{where}.window"))
        msg.avg_pool.stride.extend(_ints(layer.get("stride", []), f"{where}.stride"))
    elif kind == "layer_norm":
        msg.layer_norm.SetInParent()
        if "eps" in layer:
            msg.layer_norm.eps = float(layer["eps"])
    elif kind == "residual":
        if where.count(".layers[") >= MAX_NESTING:
            raise ValueError(f"{where}: residual blocks nest at most {MAX_NESTING} deep")
        inner = layer.get("layers", [])
        msg.residual.SetInParent()
        for i, sub in enumerate(inner):
            msg.residual.layers.append(_layer_to_proto(sub, f"{where}.layers[{i}]"))
    else:
        raise ValueError(
            f"{where}.type: unknown layer type {kind!r}; known: {', '.join(LAYER_TYPES)}"
        )
    return msg


def to_proto(spec: dict) -> model_pb2.ArchitectureSpec:
    """Spec dict -> ArchitectureSpec. Raises ValueError naming the offending key."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec must be a dict, got {type(spec).__name__}")
    msg = model_pb2.ArchitectureSpec()
    msg.input_shape.extend(_ints(spec.get("input_shape", []), "spec.input_shape"))
    for i, layer in enumerate(spec.get("layers", [])):
        msg.layers.append(_layer_to_proto(layer, f"spec.layers[{i}]"))
    param = str(spec.get("parameterization", "standard")).lower()
    if param not in PARAMETERIZATIONS:
        raise ValueError(f"spec.parameterization must be 'standard' or 'ntk', got {param!r}")
    msg.parameterization = PARAMETERIZATIONS[param]
    init = spec.get("init", {}) or {}
    msg.init.seed = int(init.get("seed", 0))
    if "sigma_w" in init:
        msg.init.sigma_w = float(init["sigma_w"])
    if "sigma_b" in init:
        msg.init.sigma_b = float(init["sigma_b"])
    return msg


def _layer_from_proto(msg: model_pb2.Layer) -> dict:
    kind = msg.WhichOneof("kind")
    if kind == "dense":
        out = {"type": "dense", "width": msg.dense.width}
        if msg.dense.HasField("bias"):
            out["bias"] = msg.dense.bias
        return out
    if kind == "conv":
        c = msg.conv
        out = {
            "type": "conv",
            "channels": c.channels,
            "kernel_size": list(c.kernel_size),
            "stride": list(c.stride),
            "padding": list(c.padding),
        }
        if c.HasField("bias"):
            out["bias"] = c.bias
        return out
    if kind == "activation":
        out = {"type": _ACTIVATION_NAMES.get(msg.activation.kind, f"enum:{msg.activation.kind}")}
        if msg.activation.HasField("negative_slope"):
            out["negative_slope"] = msg.activation.negative_slope
        return out
    if kind == "avg_pool":
        return {
            "type": "avg_pool",
            "window": list(msg.avg_pool.window),
            "stride": list(msg.avg_pool.stride),
        }
    if kind == "layer_norm":
        out = {"type": "layer_norm"}
        if msg.layer_norm.HasField("eps"):
            out["eps"] = msg.layer_norm.eps
        return out
    if kind == "residual":
        return {"type": "residual", "layers": [_layer_from_proto(x) for x in msg.residual.layers]}
    if kind in ("flatten", "global_avg_pool"):
        return {"type": kind}
    return {"type": None}


def from_proto(msg: model_pb2.ArchitectureSpec) -> dict:
    """ArchitectureSpec -> spec dict (unset optional fields stay absent)."""
    init: dict[str, Any] = {"seed": msg.init.seed}
    if msg.init.HasField("sigma_w"):
        init["sigma_w"] = msg.init.sigma_w
    if msg.init.HasField("sigma_b"):
        init["sigma_b"] = msg.init.sigma_b
    names = {v: k for k, v in PARAMETERIZATIONS.items()}
    return {
        "input_shape": list(msg.input_shape),
        "layers": [_layer_from_proto(x) for x in msg.layers],
        "parameterization": names.get(msg.parameterization, "standard"),
        "init": init,
    }
