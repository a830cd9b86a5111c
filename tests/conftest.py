"""Shared fixtures: small networks, and a real server on 127.0.0.1:0 with a fresh registry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

MLP_SPEC = {
    "input_shape": [6],
    "layers": [
        {"type": "dense", "width": 9},
        {"type": "relu"},
        {"type": "dense", "width": 7},
        {"type": "tanh"},
        {"type": "dense", "width": 3},
    ],
    "parameterization": "standard",
    "init": {"seed": 1, "sigma_w": 1.4, "sigma_b": 0.3},
}

CNN_SPEC = {
    "input_shape": [1, 6, 6],
    "layers": [
        {"type": "conv", "channels": 3, "kernel_size": [3, 3], "padding": [1, 1]},
        {"type": "relu"},
        {"type": "conv", "channels": 2, "kernel_size": [3, 3], "stride": [2, 2]},
        {"type": "erf"},
        {"type": "flatten"},
        {"type": "dense", "width": 2},
    ],
    "parameterization": "ntk",
    "init": {"seed": 2, "sigma_w": 1.2, "sigma_b": 0.2},
}

# Wide enough that a block of a few dozen examples takes the device tens of milliseconds.
WIDE_SPEC = {
    "input_shape": [6],
    "layers": [
        {"type": "dense", "width": 256},
        {"type": "relu"},
        {"type": "dense", "width": 256},
        {"type": "relu"},
        {"type": "dense", "width": 3},
    ],
    "init": {"seed": 3},
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def server(tmp_path):
    from ntk_server.config import ServerConfig
    from ntk_server.server import BackgroundServer

    with BackgroundServer(ServerConfig(address="127.0.0.1:0", registry=tmp_path / "reg")) as srv:
        yield srv


@pytest.fixture
def client(server):
    from ntk_client import Client

    with Client(server.address, timeout=120) as c:
        yield c
