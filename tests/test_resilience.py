"""Servers in their own processes that are killed, signalled and restarted, and a client that
may not hold the kernel it computes: resume, drain, crash safety of the registry, memmaps."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import MLP_SPEC, WIDE_SPEC
from ntk_client import Client, NTKError, RetryPolicy
from ntk_client._proto.ntk.v1 import service_pb2, service_pb2_grpc
from procs import ServerProcess, child_env, health
from reference import assert_kernel_close

SERVING, NOT_SERVING = 1, 2
# Enough retries to outlast a server restart (a torch import) on a loaded machine.
PATIENT = RetryPolicy(max_attempts=60, initial_backoff_s=0.2, max_backoff_s=1.0)
SETTLE_TIMEOUT_S = 60


def _wait_until(condition, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)


def test_killed_server_restarted_on_the_same_registry_and_the_client_resumes(tmp_path, rng, caplog):
    registry, workdir = tmp_path / "reg", tmp_path / "run"
    servers = [ServerProcess(registry, workdir).wait_ready()]
    try:
        x = rng.standard_normal((140, 6))
        options = dict(layout="full", dtype="float64", block_shape=(10, 10))
        with Client(servers[0].address, retry=PATIENT) as c:
            model = c.register_model(WIDE_SPEC)
            unbroken = c.kernel(model, x, **options)

            def kill_after_three(done, *_):
                if done == 3 and len(servers) == 1:
                    servers[0].kill()
                    # Same port (first bound from port 0) and registry: "the server came back".
                    servers.append(ServerProcess(registry, workdir, address=servers[0].address))

            with caplog.at_level("INFO", logger="ntk_client.assemble"):
                resumed = c.kernel(model, x, progress=kill_after_three, **options)
        np.testing.assert_array_equal(resumed, unbroken)  # bit for bit

        first_break = next(r.getMessage() for r in caplog.records if "broke" in r.getMessage())
        held, total = map(int, re.search(r"with (\d+) of (\d+) blocks held", first_break).groups())
        assert 3 <= held < total == 14 * 15 // 2
        _wait_until(lambda: "kernel done" in servers[1].output(), "the restarted server logged")
        done = re.search(r"kernel done .* blocks=(\d+)", servers[1].output())
        assert int(done.group(1)) == total - held  # only the missing blocks were asked for
    finally:
        for server in servers:
            server.stop()


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path, rng):
    server = ServerProcess(tmp_path / "reg", tmp_path / "run", "--grace-period-s", "60")
    server.wait_ready()
    try:
        x = rng.standard_normal((140, 6))
        with Client(server.address, retry=RetryPolicy(max_attempts=1)) as c:
            model = c.register_model(WIDE_SPEC)
            expected = c.kernel(model, x, dtype="float64", block_shape=(10, 10))
            signalled = threading.Event()

            def terminate_after_three(done, *_):
                if done == 3 and not signalled.is_set():
                    signalled.set()
                    server.proc.send_signal(15)

            result = {}
            streaming = threading.Thread(
                target=lambda: result.setdefault(
                    "k",
                    c.kernel(
                        model,
                        x,
                        dtype="float64",
                        block_shape=(10, 10),
                        progress=terminate_after_three,
                    ),
                )
            )
            streaming.start()
            assert signalled.wait(SETTLE_TIMEOUT_S)
            _wait_until(lambda: health(server.address) == NOT_SERVING, "health is NOT_SERVING")
            with pytest.raises(NTKError) as info:
                c.models()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "draining" in info.value.details and info.value.retryable
            streaming.join(SETTLE_TIMEOUT_S)
        np.testing.assert_array_equal(result["k"], expected)  # finished, not resumed
        assert server.proc.wait(timeout=SETTLE_TIMEOUT_S) == 0
        assert "draining grace_s=60.0 inflight=1" in server.output()
        assert "stopped" in server.output()
    finally:
        server.stop()


def test_grace_period_over_cancels_the_stream_and_still_exits_0(tmp_path, rng):
    server = ServerProcess(tmp_path / "reg", tmp_path / "run", "--grace-period-s", "0.5")
    server.wait_ready()
    try:
        with Client(server.address, retry=RetryPolicy(max_attempts=1)) as c:
            model = c.register_model(WIDE_SPEC)
            stream = c.kernel_blocks(model, rng.standard_normal((400, 6)), block_shape=(10, 10))
            next(iter(stream))
            start = time.monotonic()
            assert server.terminate() == 0
            with pytest.raises(NTKError) as info:
                list(stream)
            assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - start < SETTLE_TIMEOUT_S
        assert "grace period over, cancelling inflight=1" in server.output()
    finally:
        server.stop()


def _entries(path):
    return sorted(p.name for p in path.iterdir())


def test_kill_9_during_upload_or_registration_leaves_nothing_half_written(tmp_path, rng):
    registry, workdir = tmp_path / "reg", tmp_path / "run"
    server = ServerProcess(registry, workdir).wait_ready()
    try:
        # Upload: killed after some chunks are on disk in a staging directory.
        x = rng.standard_normal((20_000, 6))
        data = x.tobytes()

        def slow_chunks():
            yield service_pb2.DatasetChunk(dtype=2, x_shape=list(x.shape))
            for start in range(0, len(data), 64 << 10):
                yield service_pb2.DatasetChunk(x_data=data[start : start + (64 << 10)])
                time.sleep(0.05)

        with grpc.insecure_channel(server.address) as channel:
            upload = service_pb2_grpc.NTKServiceStub(channel).UploadDataset.future(
                slow_chunks(), timeout=SETTLE_TIMEOUT_S
            )
            _wait_until(lambda: _entries(registry / "tmp"), "the upload is staged")
            server.kill()
            with pytest.raises(grpc.RpcError):
                upload.result()
        assert _entries(registry / "datasets") == []

        # Registration: large uploaded weights, killed as soon as staging starts.
        server = ServerProcess(registry, workdir).wait_ready()
        assert _entries(registry / "tmp") == []  # the dead process's staging was swept
        big = {
            "input_shape": [1000],
            "layers": [
                {"type": "dense", "width": 2000},
                {"type": "relu"},
                {"type": "dense", "width": 1},
            ],
        }
        weights = {
            "0.weight": rng.standard_normal((2000, 1000)) / 30,
            "0.bias": np.zeros(2000),
            "2.weight": rng.standard_normal((1, 2000)) / 45,
            "2.bias": np.zeros(1),
        }
        with Client(server.address, max_message_bytes=256 << 20) as c:
            registering = threading.Thread(
                target=lambda: _ignore_errors(c.register_model, big, weights)
            )
            registering.start()
            _wait_until(
                lambda: _entries(registry / "tmp") or _entries(registry / "models"),
                "registration started writing",
                timeout_s=SETTLE_TIMEOUT_S,
            )
            server.kill()
            registering.join(SETTLE_TIMEOUT_S)

        server = ServerProcess(registry, workdir).wait_ready()
        assert _entries(registry / "tmp") == []
        with Client(server.address, max_message_bytes=256 << 20) as c:
            models = c.models()
            assert len(models) == len(_entries(registry / "models")) <= 1
            model = c.register_model(big, weights)  # whole, or whole again
            k = c.kernel(model, rng.standard_normal((2, 1000)))
            assert k.shape == (2, 2) and np.isfinite(k).all()
            dataset = c.upload_dataset(x)
            assert _entries(registry / "datasets") == [dataset.id]
    finally:
        server.stop()


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except NTKError:
        pass  # the server was killed under it


# The client has no torch, so its data segment can be kept small: grpc, numpy and a few
# blocks in flight, never the kernel.
MEMMAP_CLIENT = r"""
import resource, sys
limit = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
import numpy as np
from ntk_client import Client
address, model_id, out = sys.argv[1:4]
x = np.random.default_rng(0).standard_normal((int(sys.argv[5]), 6))
with Client(address) as c:
    k = c.kernel(model_id, x, dtype="float64", out=out, progress=False)
assert "torch" not in sys.modules
print("ok", k.nbytes)
"""
CLIENT_DATA_LIMIT_BYTES = 250 << 20
MEMMAP_EXAMPLES = 14_000  # trace, float64: 1.57 GB, over 6 times the client's limit


def _rss_bytes(pid: int, key: str) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024


def test_a_kernel_larger_than_client_memory_streams_into_a_memmap(tmp_path):
    server = ServerProcess(tmp_path / "reg", tmp_path / "run").wait_ready()
    try:
        with Client(server.address) as c:
            model = c.register_model(MLP_SPEC)
            c.kernel(model, np.ones((3, 6)))  # model loaded: the server's resting size
        server_before = _rss_bytes(server.proc.pid, "VmRSS")
        out = tmp_path / "k.npy"
        kernel_bytes = MEMMAP_EXAMPLES**2 * 8
        assert kernel_bytes > 3 * CLIENT_DATA_LIMIT_BYTES
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMMAP_CLIENT,
                server.address,
                model.id,
                str(out),
                str(CLIENT_DATA_LIMIT_BYTES),
                str(MEMMAP_EXAMPLES),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=child_env(MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1"),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["ok", str(kernel_bytes)]
        server_growth = _rss_bytes(server.proc.pid, "VmHWM") - server_before
        # Blocks in flight, their wire copies and the O(N) Jacobian cache: not the N^2 kernel.
        assert server_growth < kernel_bytes / 4, server_growth

        k = np.load(out, mmap_mode="r")
        assert k.shape == (MEMMAP_EXAMPLES, MEMMAP_EXAMPLES)
        x = np.random.default_rng(0).standard_normal((MEMMAP_EXAMPLES, 6))
        picks = np.random.default_rng(1).integers(0, MEMMAP_EXAMPLES, size=(2, 200))
        with Client(server.address) as c:
            rows = c.kernel(model, x[picks[0]], x[picks[1]], dtype="float64")
        assert_kernel_close(k[picks[0][:, None], picks[1][None, :]], rows, "float64")
        np.testing.assert_array_equal(k[picks[0], picks[1]], k[picks[1], picks[0]])
        assert not (tmp_path / "k.npy.partial").exists()
    finally:
        server.stop()
