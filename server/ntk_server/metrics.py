"""Prometheus metrics of one server, on their own registry and HTTP port.

Every metric here is named in tests/deploy_metrics.py (SERVER_METRICS), which the alert rules and
the Grafana dashboard in deploy/ rely on. Labels are bounded: `method` is one of the service's
RPC names and `code` one of the gRPC status names; never model ids, request ids, token names or
block coordinates.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ntk_server import __version__

log = logging.getLogger(__name__)

# Seconds: from a registry lookup (ms) up to a large kernel streamed for minutes.
DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
# cgroup v1 reports "no limit" as a huge number near 2**63.
_CGROUP_UNLIMITED_BYTES = 1 << 60
_CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)


class Metrics:
    """The server's metrics. `serve(host, port)` exposes them at http://host:port/metrics."""

    def __init__(
        self,
        device: torch.device,
        *,
        queue_depth: Callable[[], int],
        queue_limit: int,
        models_registered: Callable[[], int],
        methods: frozenset[str],
        registry: CollectorRegistry | None = None,
    ):
        # A registry per server: tests run many servers in one process and must not share state.
        self.registry = CollectorRegistry() if registry is None else registry
        self.methods = methods
        self.device = device
        self._http = None
        self._thread = None
        r = self.registry

        self.requests = Counter(
            "ntk_requests",
            "Finished RPCs of ntk.v1.NTKService by method and gRPC status code name.",
            ["method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "ntk_request_duration_seconds",
            "Wall time of ntk.v1.NTKService RPCs, from arrival to the last message sent.",
            ["method"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.kernel_blocks = Counter(
            "ntk_kernel_blocks", "Kernel blocks computed (ComputeKernel and Predict).", registry=r
        )
        self.kernel_entries = Counter(
            "ntk_kernel_entries",
            "Kernel entries computed; each element of an O x O output block counts once.",
            registry=r,
        )
        self.stream_bytes = Counter(
            "ntk_stream_bytes",
            "Serialized bytes of messages sent on server streams (ComputeKernel).",
            registry=r,
        )
        self.inflight = Gauge(
            "ntk_inflight_requests", "ntk.v1.NTKService RPCs being served now.", registry=r
        )
        Gauge("ntk_queue_depth", "Device work items running or waiting.", registry=r).set_function(
            queue_depth
        )
        Gauge(
            "ntk_queue_limit",
            "Device work items that may wait before new ones get RESOURCE_EXHAUSTED.",
            registry=r,
        ).set(queue_limit)
        Gauge(
            "ntk_models_registered", "Models in the registry directory.", registry=r
        ).set_function(models_registered)
        kind = "CUDA memory allocated by torch" if device.type == "cuda" else "process RSS (CPU)"
        Gauge("ntk_device_memory_bytes", f"Device memory in use: {kind}.", registry=r).set_function(
            lambda: device_memory(device)[0]
        )
        Gauge(
            "ntk_device_memory_peak_bytes", f"Peak device memory in use: {kind}.", registry=r
        ).set_function(lambda: device_memory(device)[1])
        Gauge(
            "ntk_device_memory_limit_bytes",
            "Device memory available: the GPU's total memory on CUDA; on CPU the cgroup memory "
            "limit, or physical memory without one.",
            registry=r,
        ).set_function(lambda: device_memory_limit(device))
        Gauge(
            "ntk_build_info",
            "Always 1; labels name the server, torch and Python versions and the device type.",
            ["version", "torch_version", "python_version", "device"],
            registry=r,
        ).labels(__version__, torch.__version__, platform.python_version(), device.type).set(1)

        # Series for every method and OK exist from the start, so rate() and ratios have data
        # before the first request; other codes appear when they first happen.
        for method in methods:
            self.requests.labels(method, "OK")
            self.duration.labels(method)

    # Hooks ---------------------------------------------------------------------------------

    def request_done(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.duration.labels(method).observe(seconds)

    def kernel_block(self, entries: int) -> None:
        self.kernel_blocks.inc()
        self.kernel_entries.inc(entries)

    # HTTP ----------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        addr = host.strip("[]")  # "[::]" in a gRPC address is "::" to the HTTP server
        self._http, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()
            self._http = self._thread = None


def device_memory(device: torch.device) -> tuple[int, int]:
    """(in use, peak) bytes: torch's CUDA allocations, or on CPU the process RSS and its peak."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = peak  # no procfs: the peak is the best bound there is
    return rss, max(rss, peak)  # the kernel updates its high-water mark lazily


def device_memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _CGROUP_UNLIMITED_BYTES:
            return int(text)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
