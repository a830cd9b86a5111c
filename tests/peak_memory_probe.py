"""Run one kernel block in this process and print its peak memory next to the cost model's.

Used by test_cost.py in a fresh subprocess, so that the peak (ru_maxrss) belongs to this
block alone: python peak_memory_probe.py METHOD LAYOUT N1 N2 (N2 = 0: the Gram of x1).
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from ntk_server.engine import KernelComputer, Network
from ntk_server.engine.cost import estimate_memory_bytes

PAGE_BYTES = resource.getpagesize()
PROBE_SPEC = {
    "input_shape": [64],
    "layers": [
        {"type": "dense", "width": 1024},
        {"type": "relu"},
        {"type": "dense", "width": 1024},
        {"type": "relu"},
        {"type": "dense", "width": 10},
    ],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(method: str, layout: str, n1: int, n2: int) -> None:
    net = Network(PROBE_SPEC)
    params = net.init_params()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(n1, 64, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n2, 64, generator=gen, dtype=torch.float64) if n2 else None

    # Thread pools and kernels warm up on a tiny network, so they are in the baseline.
    tiny = Network({"input_shape": [3], "layers": [{"type": "dense", "width": 2}]})
    KernelComputer(tiny, tiny.init_params(), method, layout, 0).block(x1[:2, :3], None)
    baseline = _rss_bytes()
    # ru_maxrss would carry the parent's peak across fork and exec (a large pytest process):
    # reset this process's high-water mark instead and read it back from /proc.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    KernelComputer(net, params, method, layout, cache_bytes=0).block(x1, x2)
    peak = _peak_rss_bytes() - baseline
    estimate = estimate_memory_bytes(
        net, method, n1, n2 or None, layout, 8, block_rows=n1, block_cols=n2 or n1
    )
    print(json.dumps({"measured_bytes": peak, "estimated_bytes": estimate}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
