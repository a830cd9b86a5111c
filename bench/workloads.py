"""The benchmark workloads W1-W4 and their data; importable without torch (the nt env has none).

digits = sklearn's bundled 8x8 digits, standardised per pixel (zero mean, unit variance; the
pixels that are always 0 stay 0). W4 needs 2000 examples and digits has 1797, so inputs cycle
through the data set: duplicate rows cost the same as new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGITS_EXAMPLES = 1797


def _mlp(widths: list[int]) -> dict:
    layers: list[dict] = []
    for width in widths[:-1]:
        layers += [{"type": "dense", "width": width}, {"type": "relu"}]
    layers.append({"type": "dense", "width": widths[-1]})
    return {"input_shape": [64], "layers": layers, "parameterization": "standard"}


CONVNET = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "channels": 16, "kernel_size": [3, 3], "padding": [1, 1]},
        {"type": "relu"},
        {"type": "conv2d", "channels": 16, "kernel_size": [3, 3]},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "dense", "width": 10},
    ],
    "parameterization": "standard",
}


@dataclass(frozen=True)
class Workload:
    """One benchmark request: K(X, X) (the Gram of X, x2 absent) of `spec` on n digits."""

    name: str
    spec: dict
    n: int
    layout: str
    dtype: str  # "float32" or "float64"
    description: str

    @property
    def kind(self) -> str:
        return "convnet" if len(self.spec["input_shape"]) == 3 else "mlp"


WORKLOADS = {
    "W1": Workload("W1", _mlp([512, 512, 10]), 1000, "trace", "float32", "MLP 64-512-512-10"),
    "W1-f64": Workload(
        "W1-f64", _mlp([512, 512, 10]), 1000, "trace", "float64", "MLP 64-512-512-10, float64"
    ),
    "W2": Workload("W2", _mlp([512, 512, 10]), 256, "full", "float32", "MLP 64-512-512-10"),
    "W3": Workload("W3", CONVNET, 256, "trace", "float32", "conv3x3(16)-conv3x3(16)-dense(10)"),
    "W4": Workload(
        "W4", _mlp([2048, 2048, 2048, 10]), 2000, "trace", "float32", "MLP 64-2048x3-10"
    ),
}


def digits(n: int, kind: str) -> np.ndarray:
    """n standardised digits, float64: (n, 64) for an MLP, (n, 1, 8, 8) for the convnet."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    x = x[np.arange(n) % x.shape[0]]
    return x.reshape(n, 1, 8, 8) if kind == "convnet" else x
