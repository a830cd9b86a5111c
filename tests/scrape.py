"""Helpers for tests of a live server's /metrics endpoint and status codes."""

from __future__ import annotations

import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 30.0


def scrape_text(metrics_address: str) -> str:
    """The body of http://<metrics_address>/metrics (loopback only in tests)."""
    url = f"http://{metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        return response.read().decode()


def scrape(metrics_address: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} of one scrape."""
    samples = {}
    for family in text_string_to_metric_families(scrape_text(metrics_address)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 for a series not (yet) exported."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(predicate, what: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll until predicate() is true; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def assert_status(info, code: grpc.StatusCode, *fragments: str) -> None:
    """An NTKError or grpc.RpcError captured by pytest.raises has `code` and `fragments`."""
    exc = info.value
    got = exc.code() if callable(getattr(exc, "code", None)) else exc.code
    details = exc.details() if callable(getattr(exc, "details", None)) else exc.details
    assert got == code, f"expected {code.name}, got {got}: {details}"
    for fragment in fragments:
        assert fragment in (details or ""), f"{fragment!r} not in {details!r}"
