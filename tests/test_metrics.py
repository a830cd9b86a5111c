"""Prometheus metrics scraped over HTTP from a live server, and the per-request log line."""

from __future__ import annotations

import json
import logging
import math
import uuid

import grpc
import numpy as np
import pytest
from conftest import MLP_SPEC
from deploy_metrics import SERVER_METRICS, SYNTHETIC_METRICS, metric_family, metric_names_used
from grpc_health.v1 import health_pb2
from ntk_client import Client, NTKError, codec
from ntk_client._proto.ntk.v1 import kernel_pb2, model_pb2, service_pb2, service_pb2_grpc
from ntk_server.cli import JsonFormatter
from ntk_server.config import ServerConfig
from ntk_server.server import BackgroundServer
from prometheus_client.parser import text_string_to_metric_families
from scrape import assert_status, health_status, scrape, scrape_text, value, wait_for

# Label names a series may carry: bounded by the service's methods, the gRPC codes, histogram
# buckets and the build.
ALLOWED_LABELS = {"method", "code", "le", "version", "torch_version", "python_version", "device"}
RANDOM_ID_REQUESTS = 1000


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(address="127.0.0.1:0", registry=tmp_path / "reg", metrics_port=0)
    with BackgroundServer(config) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def _stream_kernel(address: str, request: kernel_pb2.KernelRequest) -> list:
    """Every response message of one ComputeKernel call, as sent."""
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.NTKServiceStub(channel)
        return list(stub.ComputeKernel(request, timeout=120))


def test_metrics_port_zero_picks_a_free_port_and_exposes_it(server):
    host, _, port = server.metrics_address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert int(port) != int(server.address.rpartition(":")[2])
    assert "ntk_build_info" in scrape_text(server.metrics_address)


def test_no_metrics_port_means_no_metrics_server(tmp_path):
    with BackgroundServer(ServerConfig(address="127.0.0.1:0", registry=tmp_path)) as srv:
        assert srv.metrics_address is None


def test_counters_move_by_exactly_the_workload(server, client, rng):
    before = scrape(server.metrics_address)
    model = client.register_model(MLP_SPEC)
    x = rng.standard_normal((10, 6))
    request = kernel_pb2.KernelRequest(
        model_id=model.id,
        x1=kernel_pb2.Inputs(tensor=codec.to_proto(x, "float64")),
        layout=kernel_pb2.FULL,
        dtype=codec.dtype_enum("float64"),
        block_rows=4,
        block_cols=4,
    )
    responses = _stream_kernel(server.address, request)
    header, blocks, summary = responses[0].header, responses[1:-1], responses[-1].summary
    with pytest.raises(NTKError) as info:
        client.get_model("0" * 32)
    assert_status(info, grpc.StatusCode.NOT_FOUND, "model_id", "0" * 32)
    after = scrape(server.metrics_address)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # A symmetric 10 x 10 Gram matrix in 4 x 4 blocks: a 3 x 3 grid, 6 blocks on or above the
    # diagonal; FULL layout with O = 3 outputs has 9 entries per pair of examples.
    assert header.blocks_total == len(blocks) == 6
    assert summary.entries == sum(m.block.rows * m.block.cols * 9 for m in blocks)
    assert delta("ntk_kernel_blocks_total") == 6
    assert delta("ntk_kernel_entries_total") == summary.entries
    assert delta("ntk_stream_bytes_total") == sum(m.ByteSize() for m in responses)
    assert delta("ntk_requests_total", method="RegisterModel", code="OK") == 1
    assert delta("ntk_requests_total", method="ComputeKernel", code="OK") == 1
    assert delta("ntk_requests_total", method="GetModel", code="NOT_FOUND") == 1
    assert delta("ntk_requests_total", method="GetModel", code="OK") == 0
    for method in ("RegisterModel", "ComputeKernel", "GetModel"):
        assert delta("ntk_request_duration_seconds_count", method=method) == 1
        assert delta("ntk_request_duration_seconds_bucket", method=method, le="+Inf") == 1
    assert delta("ntk_request_duration_seconds_sum", method="ComputeKernel") > 0
    assert value(after, "ntk_inflight_requests") == 0
    assert value(after, "ntk_queue_depth") == 0
    assert value(after, "ntk_queue_limit") == server.config.queue_limit
    assert value(before, "ntk_models_registered") == 0
    assert value(after, "ntk_models_registered") == 1


def test_predict_counts_the_kernel_blocks_it_computes(server, client, rng):
    model = client.register_model(MLP_SPEC)
    before = scrape(server.metrics_address)
    x, y = rng.standard_normal((7, 6)), rng.standard_normal((7, 3))
    client.predict(model, x, y, dtype="float64")
    after = scrape(server.metrics_address)
    # K(x_train, x_train) in one block (7 x 7 fits any message), TRACE: one entry per pair.
    assert value(after, "ntk_kernel_blocks_total") - value(before, "ntk_kernel_blocks_total") == 1
    entries = value(after, "ntk_kernel_entries_total") - value(before, "ntk_kernel_entries_total")
    assert entries == 49
    assert value(after, "ntk_requests_total", method="Predict", code="OK") == 1
    assert value(after, "ntk_stream_bytes_total") == value(before, "ntk_stream_bytes_total")


def test_random_model_ids_add_no_series(server, client):
    # Warm up: the NOT_FOUND series of both methods exist before counting.
    unknown = uuid.uuid4().hex
    for call in (client.get_model, lambda m: client.kernel(m, np.zeros((1, 6)))):
        with pytest.raises(NTKError) as info:
            call(unknown)
        assert_status(info, grpc.StatusCode.NOT_FOUND, unknown)
    before = scrape(server.metrics_address)

    ids = [uuid.uuid4().hex for _ in range(RANDOM_ID_REQUESTS)]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.NTKServiceStub(channel)
        for i, model_id in enumerate(ids):
            with pytest.raises(grpc.RpcError) as info:
                if i % 2:
                    stub.GetModel(model_pb2.GetModelRequest(model_id=model_id), timeout=30)
                else:
                    request = kernel_pb2.KernelRequest(
                        model_id=model_id,
                        x1=kernel_pb2.Inputs(tensor=codec.to_proto(np.zeros((1, 6)))),
                    )
                    list(stub.ComputeKernel(request, timeout=30))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    body = scrape_text(server.metrics_address)
    after = scrape(server.metrics_address)
    assert set(after) == set(before), set(after) ^ set(before)
    half = RANDOM_ID_REQUESTS // 2
    for method in ("GetModel", "ComputeKernel"):
        moved = value(after, "ntk_requests_total", method=method, code="NOT_FOUND") - value(
            before, "ntk_requests_total", method=method, code="NOT_FOUND"
        )
        assert moved == half
    assert not any(model_id in body for model_id in ids)


def test_labels_are_bounded(server, client):
    with pytest.raises(NTKError):
        client.get_model(uuid.uuid4().hex)
    families = list(text_string_to_metric_families(scrape_text(server.metrics_address)))
    codes = {code.name for code in grpc.StatusCode}
    methods = set(service_pb2.DESCRIPTOR.services_by_name["NTKService"].methods_by_name)
    for family in families:
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            if "code" in sample.labels:
                assert sample.labels["code"] in codes, sample
            if "method" in sample.labels:
                assert sample.labels["method"] in methods, sample


def test_every_metric_in_deploy_exists_in_a_live_scrape(server):
    families = list(text_string_to_metric_families(scrape_text(server.metrics_address)))
    scraped = {s.name for f in families for s in f.samples}
    used = set(metric_names_used())
    missing = used - scraped - SYNTHETIC_METRICS
    assert not missing, f"deploy/ uses metrics the server does not export: {sorted(missing)}"
    # Exactly the contract's names (the client library adds a `_created` twin to counters).
    exported = {metric_family(n) for n in scraped if not n.endswith("_created")}
    assert exported == SERVER_METRICS


def test_device_memory_gauges_are_consistent(server):
    samples = scrape(server.metrics_address)
    used = value(samples, "ntk_device_memory_bytes")
    peak = value(samples, "ntk_device_memory_peak_bytes")
    limit = value(samples, "ntk_device_memory_limit_bytes")
    assert 0 < used <= peak
    assert limit > 0 and math.isfinite(limit)
    assert value(samples, "ntk_build_info", **_build_labels(samples)) == 1


def _build_labels(samples) -> dict:
    ((_, labels),) = [k for k in samples if k[0] == "ntk_build_info"]
    labels = dict(labels)
    assert labels["version"] and labels["torch_version"] and labels["device"] in ("cpu", "cuda")
    return labels


def test_one_log_line_per_request_with_json_fields(tmp_path, caplog, rng):
    secret = "s3cret-" + uuid.uuid4().hex
    config = ServerConfig(address="127.0.0.1:0", registry=tmp_path, tokens=f"alice:{secret}")
    caplog.set_level(logging.INFO, logger="ntk_server")
    with BackgroundServer(config) as srv, Client(srv.address, token=secret, timeout=60) as c:
        model = c.register_model(MLP_SPEC)
        c.kernel(model, rng.standard_normal((300, 6)), layout="full")
        with pytest.raises(NTKError):
            c.get_model("f" * 32)
        with grpc.insecure_channel(srv.address) as channel:  # health: no request line
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    lines = [r for r in caplog.records if r.name == "ntk_server.interceptors"]
    assert [r.fields["method"] for r in lines] == ["RegisterModel", "ComputeKernel", "GetModel"]
    assert [r.fields["code"] for r in lines] == ["OK", "OK", "NOT_FOUND"]
    kernel = lines[1]
    assert kernel.levelno == logging.INFO
    assert kernel.fields["model"] == model.id
    assert kernel.fields["token"] == "alice"
    assert kernel.fields["peer"].startswith("ipv4:127.0.0.1:")
    assert kernel.fields["request_bytes"] > 300 * 6 * 4
    assert kernel.fields["response_bytes"] > 300 * 300 * 9 * 4
    assert kernel.fields["seconds"] > 0
    entry = json.loads(JsonFormatter().format(kernel))
    assert entry["level"] == "INFO" and entry["method"] == "ComputeKernel"
    assert entry["code"] == "OK" and entry["token"] == "alice" and entry["model"] == model.id
    # No secrets, no tensors: the token never appears and every line stays short although
    # megabytes of inputs and kernel values went by.
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert secret not in text and secret not in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


def test_a_deadline_is_counted_and_frees_the_request(server, client, rng):
    model = client.register_model(MLP_SPEC)
    x = rng.standard_normal((3000, 6))  # many blocks: far longer than the deadline
    with pytest.raises(NTKError) as info:
        client.kernel(model, x, layout="full", block_shape=(16, 16), timeout=1.0)
    assert_status(info, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def ended_early():
        # The server sees the cancel the client's timer sends; see interceptors._code_of.
        samples = scrape(server.metrics_address)
        codes = ("DEADLINE_EXCEEDED", "CANCELLED")
        return sum(
            value(samples, "ntk_requests_total", method="ComputeKernel", code=c) for c in codes
        )

    wait_for(lambda: ended_early() == 1, "the expired ComputeKernel to be counted")
    assert value(scrape(server.metrics_address), "ntk_inflight_requests") == 0


@pytest.mark.parametrize(
    ("remaining_s", "code"),
    [
        (None, "CANCELLED"),
        (30.0, "CANCELLED"),
        (0.01, "DEADLINE_EXCEEDED"),
        (-1, "DEADLINE_EXCEEDED"),
    ],
)
def test_a_cancelled_handler_is_a_deadline_only_near_its_deadline(remaining_s, code):
    import asyncio

    from ntk_server.interceptors import _code_of

    class Context:
        def time_remaining(self):
            return remaining_s

    assert _code_of(asyncio.CancelledError(), Context()).name == code
