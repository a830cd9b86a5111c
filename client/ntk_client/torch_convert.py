"""Convert a torch nn.Sequential of supported layers to a spec dict and numpy weights.

torch is imported only when this module is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ACTIVATIONS = {
    "ReLU": "relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Identity": "identity",
}


def _unsupported(index: int, module, why: str) -> ValueError:
    return ValueError(
        f"layer {index} ({type(module).__name__}) is not supported: {why}. Supported: Linear, "
        "Conv1d, Conv2d, ReLU, Tanh, GELU, Sigmoid, Softplus, LeakyReLU, Identity, Flatten, "
        "AvgPool1d, AvgPool2d, LayerNorm(elementwise_affine=False)"
    )


def _layer(index: int, m) -> dict:
    from torch import nn

    name = type(m).__name__
    if isinstance(m, nn.Linear):
        return {"type": "dense", "width": m.out_features, "bias": m.bias is not None}
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1 or any(d != 1 for d in m.dilation) or isinstance(m.padding, str):
            raise _unsupported(index, m, "groups, dilation and string padding are not supported")
        if m.padding_mode != "zeros":
            raise _unsupported(index, m, f"padding_mode {m.padding_mode!r}")
        return {
            "type": "conv",
            "channels": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "bias": m.bias is not None,
        }
    if name in _ACTIVATIONS:
        return {"type": _ACTIVATIONS[name]}
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise _unsupported(index, m, "only the exact (erf) GELU is supported")
        return {"type": "gelu"}
    if isinstance(m, nn.Softplus):
        if m.beta != 1 or m.threshold != 20:
            raise _unsupported(index, m, "only beta=1, threshold=20")
        return {"type": "softplus"}
    if isinstance(m, nn.LeakyReLU):
        return {"type": "leaky_relu", "negative_slope": float(m.negative_slope)}
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise _unsupported(index, m, "only Flatten(start_dim=1, end_dim=-1)")
        return {"type": "flatten"}
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):

        def pair(v):
            return (
                list(v)
                if isinstance(v, (tuple, list))
                else [v] * (1 if isinstance(m, nn.AvgPool1d) else 2)
            )

        if any(p != 0 for p in pair(m.padding)) or m.ceil_mode:
            raise _unsupported(index, m, "padding and ceil_mode are not supported")
        return {"type": "avg_pool", "window": pair(m.kernel_size), "stride": pair(m.stride)}
    if isinstance(m, nn.LayerNorm):
        if m.elementwise_affine:
            raise _unsupported(index, m, "learned affine parameters are not supported")
        return {"type": "layer_norm", "eps": float(m.eps)}
    raise _unsupported(index, m, "no rule for this layer")


def from_sequential(module, input_shape: Sequence[int]) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, weights) for an nn.Sequential; weights keep their torch names ("0.weight")."""
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"expected a torch nn.Sequential or a spec dict, got {type(module).__name__}"
        )
    layers = [_layer(i, m) for i, m in enumerate(module)]
    spec = {"input_shape": list(input_shape), "layers": layers, "parameterization": "standard"}
    weights = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return spec, weights
