"""Serving under load, in one process: fairness, cancellation, deadlines, admission, message
sizes, datasets, and health while the device is busy. Real server on 127.0.0.1:0."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import MLP_SPEC, WIDE_SPEC
from ntk_client import Client, NTKError, RetryPolicy, place_block
from ntk_client._proto.ntk.v1 import kernel_pb2, service_pb2, service_pb2_grpc
from ntk_client.codec import from_proto, to_proto
from ntk_server.config import ServerConfig
from ntk_server.engine import Network
from ntk_server.server import BackgroundServer
from procs import health
from reference import assert_kernel_close, reference_kernel

SETTLE_TIMEOUT_S = 60
GRPC_DEFAULT_MESSAGE_BYTES = 4 << 20


def _wait_until(condition, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def _reference(spec, x1, x2=None, layout="trace"):
    net = Network(spec)
    return reference_kernel(net, net.init_params(), x1, x2, layout)


def _runtime(srv):
    return srv.server.runtime


def _idle(srv) -> bool:
    runtime = _runtime(srv)
    return not runtime.active_requests and runtime.admission.admitted_bytes == 0


def test_small_requests_finish_while_a_large_one_streams(server, rng):
    """Eight concurrent clients, one large: every result is correct, the small ones are done
    long before the large one."""
    with Client(server.address) as c:
        model = c.register_model(WIDE_SPEC)
    x_large = rng.standard_normal((240, 6))
    x_small = [rng.standard_normal((12 + i, 6)) for i in range(7)]
    streaming = threading.Event()
    spans: dict[str, tuple[float, float]] = {}

    def large():
        def on_block(done, *_):
            if done == 1:
                spans["large-first-block"] = (time.monotonic(), 0.0)
            if done >= 3:
                streaming.set()

        with Client(server.address) as c:
            k = c.kernel(model, x_large, dtype="float64", block_shape=(10, 10), progress=on_block)
        spans["large"] = (spans["large-first-block"][0], time.monotonic())
        return k

    def small(i):
        assert streaming.wait(SETTLE_TIMEOUT_S)
        with Client(server.address) as c:
            t0 = time.monotonic()
            k = c.kernel(model, x_small[i], dtype="float64", block_shape=(8, 8))
            spans[f"small{i}"] = (t0, time.monotonic())
        return k

    with ThreadPoolExecutor(8) as pool:
        large_future = pool.submit(large)
        small_futures = [pool.submit(small, i) for i in range(7)]
        small_results = [f.result() for f in small_futures]
        large_result = large_future.result()

    for x, k in zip(x_small, small_results, strict=True):
        assert_kernel_close(k, _reference(WIDE_SPEC, x), "float64")
    assert_kernel_close(large_result, _reference(WIDE_SPEC, x_large), "float64")
    large_start, large_end = spans["large"]
    for i in range(7):
        t0, t1 = spans[f"small{i}"]
        # Round robin: a small request waits for a few of the large one's 300 blocks, not all.
        assert t1 < large_end and t1 - t0 < 0.5 * (large_end - large_start), spans


def test_cancel_stops_the_request_within_a_block(server, rng):
    with Client(server.address) as c:
        model = c.register_model(WIDE_SPEC)
        stream = c.kernel_blocks(model, rng.standard_normal((300, 6)), block_shape=(10, 10))
        request_id = stream.header.request_id
        total = stream.header.blocks_total
        received = 0
        for _ in stream:
            received += 1
            if received == 3:
                stream.cancel()
                break

        _wait_until(lambda: _idle(server), "the cancelled request released its memory")
        computed = _runtime(server).blocks_computed(request_id)
        time.sleep(1.0)
        assert _runtime(server).blocks_computed(request_id) == computed
        # Blocks the server ran ahead into socket buffers, plus the one on the device.
        assert received <= computed <= received + 6, (received, computed, total)
        assert _runtime(server).scheduler.queue_depth == 0

        x = rng.standard_normal((5, 6))
        assert_kernel_close(
            c.kernel(model, x, dtype="float64"), _reference(WIDE_SPEC, x), "float64"
        )


def test_deadline_stops_the_request_and_the_next_one_is_served(server, rng):
    with Client(server.address) as c:
        model = c.register_model(WIDE_SPEC)
        with pytest.raises(NTKError) as info:
            c.kernel(model, rng.standard_normal((400, 6)), block_shape=(10, 10), timeout=1.0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
        _wait_until(lambda: _idle(server), "the expired request released its memory")
        counts = dict(_runtime(server)._block_counts)
        time.sleep(1.0)
        assert dict(_runtime(server)._block_counts) == counts  # nothing runs for it any more
        assert sum(counts.values()) < 400 * 401 // 2 // 100  # far from the 820 blocks asked
        x = rng.standard_normal((4, 6))
        assert_kernel_close(
            c.kernel(model, x, dtype="float64"), _reference(WIDE_SPEC, x), "float64"
        )


def test_health_answers_while_a_long_block_computes(server, rng):
    with Client(server.address) as c:
        model = c.register_model(WIDE_SPEC)
        x = rng.standard_normal((400, 6))
        latencies: list[float] = []
        done = threading.Event()

        def probe():
            while not done.is_set():
                t0 = time.perf_counter()
                assert health(server.address) == 1  # SERVING
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        t0 = time.perf_counter()
        prober.start()
        try:
            # Jacobian contraction keeps this one block long enough to probe during it.
            stream = c.kernel_blocks(
                model, x, block_shape=(400, 400), method="jacobian_contraction"
            )
            assert stream.header.blocks_total == 1  # one long block on the device thread
            list(stream)
        finally:
            done.set()
            prober.join()
        block_s = time.perf_counter() - t0
    assert len(latencies) >= 3, (latencies, block_s)
    assert max(latencies) < 1.0, max(latencies)


def test_a_request_that_can_never_fit_is_refused_at_once(tmp_path, rng):
    config = ServerConfig(
        address="127.0.0.1:0", registry=tmp_path / "reg", memory_budget_bytes=8 << 20
    )
    with BackgroundServer(config) as srv, Client(srv.address) as c:
        model = c.register_model(WIDE_SPEC)
        x = rng.standard_normal((64, 6))
        start = time.monotonic()
        # Jacobian contraction: its per-block Jacobians are what overflows the small budget.
        method = "jacobian_contraction"
        with pytest.raises(NTKError) as info:
            c.kernel(model, x, block_shape=(64, 64), method=method)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for fragment in (
            "estimated",
            "over the server's memory budget of 8388608 bytes",
            "--memory-budget-bytes",
        ):
            assert fragment in info.value.details, info.value.details
        assert not info.value.retryable
        assert _runtime(srv).blocks_computed(_last_request_id(srv)) == 0
        assert time.monotonic() - start < SETTLE_TIMEOUT_S

        # Left to choose, the server shrinks the blocks until one fits the budget.
        stream = c.kernel_blocks(model, x, method=method)
        assert stream.header.block_rows < 64
        blocks = list(stream)
        assert len(blocks) == stream.header.blocks_total > 1


def _last_request_id(srv) -> str:
    counts = _runtime(srv)._block_counts
    return next(reversed(counts)) if counts else ""


def test_queue_full_is_retryable_and_the_client_retries(tmp_path, rng):
    config = ServerConfig(address="127.0.0.1:0", registry=tmp_path / "reg", queue_limit=1)
    with BackgroundServer(config) as srv, Client(srv.address) as c:
        model = c.register_model(WIDE_SPEC)
        big = c.kernel_blocks(model, rng.standard_normal((200, 6)), block_shape=(10, 10))
        next(iter(big))
        admission = _runtime(srv).admission
        admission.budget_bytes = admission.admitted_bytes  # nothing else fits beside it

        waiting = ThreadPoolExecutor(1)
        queued = waiting.submit(c.kernel, model, rng.standard_normal((6, 6)), block_shape=(6, 6))
        _wait_until(lambda: admission.waiting == 1, "the second request queued")
        with pytest.raises(NTKError) as info:
            c.kernel_blocks(model, rng.standard_normal((6, 6)), block_shape=(6, 6))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details and "queue_limit=1" in info.value.details
        assert info.value.retryable

        patient = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.3)
        retried = ThreadPoolExecutor(1).submit(
            c.kernel, model, rng.standard_normal((6, 6)), block_shape=(6, 6), retry=patient
        )
        for _ in big:
            pass
        assert queued.result(timeout=SETTLE_TIMEOUT_S).shape == (6, 6)
        assert retried.result(timeout=SETTLE_TIMEOUT_S).shape == (6, 6)
        waiting.shutdown()


def test_default_grpc_client_gets_blocks_that_fit(server, rng):
    with Client(server.address) as c:
        model = c.register_model(MLP_SPEC)
    x1, x2 = rng.standard_normal((300, 6)), rng.standard_normal((250, 6))
    request = kernel_pb2.KernelRequest(
        model_id=model.id,
        x1=kernel_pb2.Inputs(tensor=to_proto(x1)),
        x2=kernel_pb2.Inputs(tensor=to_proto(x2)),
        layout=kernel_pb2.FULL,
        dtype=2,  # float64: 300 x 250 x 3 x 3 x 8 bytes = 5.4 MB in all
    )
    with grpc.insecure_channel(server.address) as channel:  # gRPC's default 4 MiB limit
        responses = list(service_pb2_grpc.NTKServiceStub(channel).ComputeKernel(request))
    header = responses[0].header
    out = np.empty(tuple(header.shape))
    for r in responses[1:-1]:
        assert r.block.ByteSize() <= GRPC_DEFAULT_MESSAGE_BYTES
        place_block(out, r.block, from_proto(r.block.values), False)
    assert header.blocks_total == len(responses) - 2
    assert out.nbytes > GRPC_DEFAULT_MESSAGE_BYTES  # the kernel itself would not have fit
    assert_kernel_close(out, _reference(MLP_SPEC, x1, x2, "full"), "float64")


def test_an_entry_block_over_the_message_limit_names_both_sizes(tmp_path, rng):
    wide_out = {"input_shape": [2], "layers": [{"type": "dense", "width": 400}]}
    x = rng.standard_normal((2, 2))
    config = ServerConfig(
        address="127.0.0.1:0", registry=tmp_path / "reg", max_message_bytes=1 << 20
    )
    with BackgroundServer(config) as srv:
        for limit in (64 << 20, 1 << 20):  # the server's limit, then the client's, is smaller
            with Client(srv.address, max_message_bytes=limit) as c:
                model = c.register_model(wide_out)
                with pytest.raises(NTKError) as info:
                    c.kernel(model, x, layout="full", dtype="float64")
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            for fragment in (
                "1280000 bytes",
                "1048576 bytes",
                "max_message_bytes",
                "--max-message-bytes",
            ):
                assert fragment in info.value.details, info.value.details

        # The server's own limit caps blocks even when the client accepts more.
        with Client(srv.address, max_message_bytes=256 << 20) as c:
            model = c.register_model(WIDE_SPEC)
            x = rng.standard_normal((160, 6))
            stream = c.kernel_blocks(model, x, layout="full", dtype="float64")
            assert all(b.values.nbytes < 1 << 20 for b in stream)
            assert stream.header.blocks_total > 1

            # A request over the server's receive limit: gRPC's sizes plus the options to change.
            with pytest.raises(NTKError) as info:
                c.kernel(model, rng.standard_normal((30_000, 6)))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "vs. 1048576" in info.value.details, info.value.details
            assert "--max-message-bytes" in info.value.details
            assert "upload_dataset" in info.value.details


def test_datasets_are_stored_once_and_replace_inline_inputs(server, client, rng):
    model = client.register_model(MLP_SPEC)
    x, y = rng.standard_normal((20, 6)), rng.standard_normal((20, 3))
    first = client.upload_dataset(x, y, chunk_bytes=100)
    again = client.upload_dataset(x.copy(), y.copy(), chunk_bytes=333)
    assert first.id == again.id and list(first.x_shape) == [20, 6]
    root = server.config.registry
    assert [p.name for p in (root / "datasets").iterdir()] == [first.id]
    assert not any((root / "tmp").iterdir())
    np.testing.assert_array_equal(
        client.kernel(model, first.id, dtype="float64"), client.kernel(model, x, dtype="float64")
    )
    by_id = client.predict(model, first.id, x_test=x[:3], dtype="float64", diag_reg=1e-3)
    inline = client.predict(model, x, y, x[:3], dtype="float64", diag_reg=1e-3)
    np.testing.assert_allclose(by_id.f, inline.f, rtol=1e-12)


def test_an_upload_cut_off_half_way_leaves_nothing(server, rng):
    x = rng.standard_normal((4000, 6))
    header = service_pb2.DatasetChunk(dtype=2, x_shape=[4000, 6])
    data = x.tobytes()
    sent = threading.Event()

    def chunks():
        yield header
        yield service_pb2.DatasetChunk(x_data=data[: len(data) // 2])
        sent.set()
        time.sleep(0.5)
        raise RuntimeError("the uploader crashed")  # gRPC cancels the call

    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.NTKServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDataset(chunks(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNKNOWN  # the client's own iterator failed
    root = server.config.registry
    _wait_until(lambda: not any((root / "tmp").iterdir()), "the staging directory was removed")
    assert not any((root / "datasets").iterdir())


def test_a_grid_of_millions_of_blocks_is_refused_at_once(client, rng):
    model = client.register_model(WIDE_SPEC)
    x = rng.standard_normal((3000, 6))
    with pytest.raises(NTKError) as info:
        client.kernel(model, x, block_shape=(1, 1))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "block_rows" in info.value.details and "over the limit" in info.value.details


def test_predictions_whose_kernel_exceeds_the_budget_are_refused(tmp_path, rng):
    config = ServerConfig(
        address="127.0.0.1:0", registry=tmp_path / "reg", memory_budget_bytes=4 << 20
    )
    with BackgroundServer(config) as srv, Client(srv.address) as c:
        model = c.register_model(WIDE_SPEC)
        x = rng.standard_normal((1500, 6))  # K(X, X) alone is 9 MB in float32
        with pytest.raises(NTKError) as info:
            c.predict(model, x, rng.standard_normal((1500, 3)))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory budget" in info.value.details
        assert health(srv.address) == 1
