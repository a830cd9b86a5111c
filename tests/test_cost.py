"""The cost model: AUTO's choice, flops, and the memory estimate against measured peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ntk_server.engine import Network
from ntk_server.engine.cost import (
    ENGINE_METHODS,
    choose_method,
    estimate_memory_bytes,
    method_costs,
)

# The memory estimate must be within this factor of the measured peak, either way. On the CPU
# the peak is resident memory, which also holds what the C allocator keeps after many small
# tile-sized frees; that, not the model, is most of the spread.
MEMORY_ESTIMATE_FACTOR = 2.0
PROBE = Path(__file__).with_name("peak_memory_probe.py")

MLP = {
    "input_shape": [64],
    "layers": [
        {"type": "dense", "width": 512},
        {"type": "relu"},
        {"type": "dense", "width": 512},
        {"type": "relu"},
        {"type": "dense", "width": 10},
    ],
}
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
}
# The bench workloads' request shapes (n2 None: the Gram of x1).
WORKLOADS = {
    "W1": (MLP, 1000, "trace"),
    "W2": (MLP, 256, "full"),
    "W3": (CONVNET, 256, "trace"),
}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_auto_is_deterministic_and_structured_on_the_workloads(workload):
    spec, n, layout = WORKLOADS[workload]
    net = Network(spec)
    first = choose_method(net, n, None, layout, 4)
    assert first == choose_method(Network(spec), n, None, layout, 4)
    method, reason = first
    assert method == "structured"
    assert reason.startswith("auto: structured") and "\n" not in reason
    for other in ENGINE_METHODS:
        assert other in reason


def test_memory_limit_steers_auto():
    net = Network(MLP)
    costs = method_costs(net, 1000, None, "trace", 4)
    assert costs["structured"].peak_bytes < costs["jacobian_contraction"].peak_bytes
    method, reason = choose_method(net, 1000, None, "trace", 4, memory_limit_bytes=1)
    assert method == min(costs.values(), key=lambda c: c.peak_bytes).method
    assert "no method fits" in reason


def test_structured_flops_of_a_dense_layer():
    # One dense layer, its output the network output: forward 2 n F C; backward nothing;
    # per block a Gram of inputs (F) and of signals (O outputs x C channels).
    net = Network({"input_shape": [8], "layers": [{"type": "dense", "width": 3}]})
    n1, n2 = 10, 6
    flops = method_costs(net, n1, n2, "trace", 8)["structured"].flops
    expected = (n1 + n2) * 2 * 8 * 3 + 2 * n1 * n2 * (8 + 3 * 3)
    assert flops == pytest.approx(expected)


def test_grid_counts_each_range_once():
    # Two column ranges and two row ranges: 4 ranges' factors, 4 blocks; the Gram of x1 with
    # the same grid has 2 ranges and 3 blocks.
    net = Network(MLP)
    cross = method_costs(net, 200, 200, "trace", 4, 100, 100)["structured"].flops
    gram = method_costs(net, 200, None, "trace", 4, 100, 100)["structured"].flops
    assert gram < cross


def test_auto_memory_estimate_is_the_chosen_methods():
    net = Network(MLP)
    method, _ = choose_method(net, 300, 200, "diagonal", 4)
    assert estimate_memory_bytes(net, "auto", 300, 200, "diagonal", 4) == estimate_memory_bytes(
        net, method, 300, 200, "diagonal", 4
    )


@pytest.mark.parametrize(
    "layout, n1, n2",
    [("trace", 1500, 0), ("full", 300, 200), ("full", 300, 0), ("diagonal", 600, 500)],
)  # fmt: skip
def test_memory_estimate_matches_measured_peak(layout, n1, n2):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, str(PROBE), "structured", layout, str(n1), str(n2)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    measured, estimated = result["measured_bytes"], result["estimated_bytes"]
    assert measured > 50 << 20, "the probe is too small to measure"
    ratio = estimated / measured
    print(f"{layout} {n1}x{n2 or n1}: estimate / measured = {ratio:.2f}")
    assert 1 / MEMORY_ESTIMATE_FACTOR <= ratio <= MEMORY_ESTIMATE_FACTOR, (
        f"estimate {estimated >> 20} MiB vs measured {measured >> 20} MiB"
    )
