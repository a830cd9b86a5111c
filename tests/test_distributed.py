"""One kernel spread over several replicas (NOTE(spreading) in ntk_client/distributed.py).

Scheduling rules run against scripted fake replicas (deterministic failures); the contract runs
against three real server processes on 127.0.0.1 sharing one registry directory.
"""

from __future__ import annotations

import socket
import threading
from contextlib import ExitStack

import grpc
import numpy as np
import pytest
from conftest import CNN_SPEC, MLP_SPEC
from local_replicas import LocalReplicas
from ntk_client import Client, KernelBlock, NTKError, ReplicaSet, distributed_kernel
from ntk_client._proto.ntk.v1 import kernel_pb2
from ntk_client.distributed import MAX_REPLICA_FAILURES
from ntk_client.grid import _chunks, grid_indices, tiles
from ntk_client.targets import _split_host_port, resolve, resolve_targets
from ntk_server.engine.blocks import plan_kernel

# Targets --------------------------------------------------------------------------------------


def test_dns_name_resolves_to_one_address_per_record_of_one_family():
    assert resolve("dns:///localhost:50051") == ["127.0.0.1:50051"]
    assert resolve("dns:localhost:7") == ["127.0.0.1:7"]
    assert resolve("dns:///127.0.0.1:9") == ["127.0.0.1:9"]
    assert resolve("127.0.0.1:9") == ["127.0.0.1:9"]  # not a dns: target; used as it is
    listed = ["127.0.0.1:1", "dns:///localhost:1", "127.0.0.1:2"]
    assert resolve_targets(listed) == ["127.0.0.1:1", "127.0.0.1:2"]


def test_bad_targets_name_the_target():
    assert _split_host_port("[::1]:8080", "t") == ("::1", 8080)
    for target, fragment in [
        ("dns:///localhost", "needs host:port"),
        ("dns:///localhost:0", "1..65535"),
        ("dns://8.8.8.8/localhost:1", "names a DNS server"),
    ]:
        with pytest.raises(ValueError, match=fragment) as info:
            resolve(target)
        assert repr(target) in str(info.value)
    with pytest.raises(ValueError, match="targets is empty"):
        resolve_targets([])
    with pytest.raises(NTKError) as info:
        resolve("dns:///no-such-host.invalid:1")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "no-such-host" in info.value.details


def test_grid_indices_are_column_major_and_chunks_contiguous():
    sym = kernel_pb2.KernelHeader(grid_rows=3, grid_cols=3, symmetric=True)
    assert grid_indices(sym) == [0, 1, 4, 2, 5, 8]
    rect = kernel_pb2.KernelHeader(grid_rows=2, grid_cols=3)
    assert grid_indices(rect) == [0, 3, 1, 4, 2, 5]
    diag = kernel_pb2.KernelHeader(grid_rows=4, grid_cols=1, batch_diagonal=True)
    assert grid_indices(diag) == [0, 1, 2, 3]
    assert _chunks(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert _chunks([5], 3) == [[5]]


@pytest.mark.parametrize(
    "header",
    [
        kernel_pb2.KernelHeader(grid_rows=10, grid_cols=10, symmetric=True),
        kernel_pb2.KernelHeader(grid_rows=4, grid_cols=7),
        kernel_pb2.KernelHeader(grid_rows=5, grid_cols=1, batch_diagonal=True),
        kernel_pb2.KernelHeader(grid_rows=1, grid_cols=1, symmetric=True),
    ],
)
@pytest.mark.parametrize("parts", [1, 2, 6, 20])
def test_tiles_cover_the_grid_once_and_touch_few_ranges(header, parts):
    cut = tiles(header, parts)
    assert sorted(i for t in cut for i in t) == sorted(grid_indices(header))
    order = {index: n for n, index in enumerate(grid_indices(header))}
    assert all([order[i] for i in t] == sorted(order[i] for i in t) for t in cut)
    assert [len(t) for t in cut] == sorted((len(t) for t in cut), reverse=True)
    if header.symmetric and header.grid_rows == 10 and parts == 6:
        # 3 x 3 cut: each tile touches at most 2 of 3 segments, not every block row
        ranges = [{i // 10 for i in t} | {i % 10 for i in t} for t in cut]
        assert len(cut) == 6 and max(len(r) for r in ranges) <= 7


# Scheduling, with scripted replicas -------------------------------------------------------------


class FakeStream:
    def __init__(self, header, blocks, fail_after, code):
        self.header, self._blocks, self._fail_after, self._code = header, blocks, fail_after, code

    def __iter__(self):
        for n, block in enumerate(self._blocks):
            if n == self._fail_after:
                raise NTKError(self._code, "scripted failure")
            yield block

    def cancel(self):
        pass


class FakeReplica:
    """Serves blocks of a known Gram matrix (trace layout), failing as scripted.

    refuse: every call fails at once with `code`; fail_after: each stream breaks after that many
    blocks; block_rows: plans this block shape whatever it is asked (another server version).
    """

    def __init__(self, gram, *, refuse=False, fail_after=None, code=None, block_rows=None):
        self.gram, self.refuse, self.fail_after = gram, refuse, fail_after
        self.code = code or grpc.StatusCode.UNAVAILABLE
        self.block_rows = block_rows
        self.calls: list[list[int]] = []

    def kernel_blocks(self, model, x1, x2, *, block_shape, block_indices, **_):
        self.calls.append(list(block_indices))
        if self.refuse:
            raise NTKError(self.code, "scripted refusal")
        n = len(self.gram)
        rows = self.block_rows or (block_shape or (4, 4))[0]
        plan = plan_kernel(
            n, None, 1, "trace", 8, 1 << 30, block_rows=rows, block_cols=rows,
            indices=list(block_indices),
        )  # fmt: skip
        header = kernel_pb2.KernelHeader(
            n1=n, n2=n, output_size=1, layout=kernel_pb2.TRACE, dtype=2, symmetric=True,
            method=kernel_pb2.JACOBIAN_CONTRACTION, shape=[n, n], block_rows=plan.block_rows,
            block_cols=plan.block_cols, grid_rows=plan.grid_rows, grid_cols=plan.grid_cols,
            blocks_total=len(plan.blocks),
        )  # fmt: skip
        blocks = (
            KernelBlock(
                b.index,
                b.row_offset,
                b.col_offset,
                b.rows,
                b.cols,
                self.gram[
                    b.row_offset : b.row_offset + b.rows, b.col_offset : b.col_offset + b.cols
                ],
                b.mirror,
            )  # fmt: skip
            for b in plan.blocks
        )
        return FakeStream(header, blocks, self.fail_after, self.code)

    def close(self):
        pass


def _fake_set(fakes):
    by_address = {f"10.0.0.{i}:1": fake for i, fake in enumerate(fakes)}
    return ReplicaSet(list(by_address), client_factory=by_address.__getitem__), by_address


@pytest.fixture
def gram(rng):
    a = rng.standard_normal((20, 5))
    return a @ a.T


def test_blocks_of_failing_replicas_move_to_the_others(gram):
    # One replica's streams break after one block each time: it goes on making progress. The
    # other's break before any block: it is left out after MAX_REPLICA_FAILURES tries.
    flaky, broken = FakeReplica(gram, fail_after=1), FakeReplica(gram, fail_after=0)
    replicas, by_address = _fake_set([FakeReplica(gram), flaky, broken, FakeReplica(gram)])
    k = replicas.kernel("m", np.zeros((20, 5)), block_shape=(2, 2), dtype="float64")
    np.testing.assert_array_equal(k, gram)
    report = replicas.last_report
    assert report.blocks_total == 55 and report.moved_blocks > 0
    assert sum(r.blocks for r in report.replicas) == 55
    reports = {id(by_address[r.address]): r for r in report.replicas}
    assert not reports[id(flaky)].left_out  # each failure came after a block
    assert reports[id(flaky)].blocks >= len(reports[id(flaky)].failures) > 0
    assert reports[id(broken)].blocks == 0 and reports[id(broken)].failures
    asked = [i for fake in by_address.values() for call in fake.calls for i in call]
    assert set(asked) == set(grid_indices(replicas_header(report)))


def replicas_header(report):
    rows = report.block_shape[0]
    grid = -(-20 // rows)
    return kernel_pb2.KernelHeader(grid_rows=grid, grid_cols=grid, symmetric=True)


def test_every_replica_failing_raises_with_each_replicas_error(gram):
    replicas, by_address = _fake_set([FakeReplica(gram, refuse=True) for _ in range(2)])
    with pytest.raises(NTKError) as info:
        replicas.kernel("m", np.zeros((20, 5)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "every replica failed" in info.value.details
    assert all(address in info.value.details for address in by_address)
    assert all(len(fake.calls) == MAX_REPLICA_FAILURES for fake in by_address.values())


def test_a_replica_that_fails_twice_with_no_block_between_is_left_out(gram):
    broken = FakeReplica(gram, fail_after=0)
    replicas, by_address = _fake_set([FakeReplica(gram), broken])

    def slow_down(block, address):
        threading.Event().wait(0.02)  # lets the broken replica come back for a second chunk

    k = replicas.kernel(
        "m", np.zeros((20, 5)), block_shape=(2, 2), dtype="float64", on_block=slow_down
    )
    np.testing.assert_array_equal(k, gram)
    report = next(r for r in replicas.last_report.replicas if by_address[r.address] is broken)
    assert report.left_out and len(report.failures) == MAX_REPLICA_FAILURES


def test_a_request_error_is_raised_at_once_and_not_retried(gram):
    bad = grpc.StatusCode.INVALID_ARGUMENT
    fakes = [FakeReplica(gram, refuse=True, code=bad), FakeReplica(gram, refuse=True, code=bad)]
    replicas, _ = _fake_set(fakes)
    with pytest.raises(NTKError) as info:
        replicas.kernel("m", np.zeros((20, 5)))
    assert info.value.code == bad
    assert sum(len(f.calls) for f in fakes) == 1


def test_a_replica_that_plans_another_grid_is_an_error(gram):
    # The probe goes to the first replica of a new set.
    replicas, _ = _fake_set([FakeReplica(gram), FakeReplica(gram, block_rows=5)])
    with pytest.raises(NTKError) as info:
        replicas.kernel("m", np.zeros((20, 5)), block_shape=(4, 4))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "header.block_rows is 5, not 4" in info.value.details


def test_an_exception_in_on_block_stops_the_kernel(gram):
    replicas, _ = _fake_set([FakeReplica(gram), FakeReplica(gram)])
    seen = []

    def on_block(block, address):
        seen.append(block.index)
        if len(seen) == 3:
            raise KeyError("enough")

    with pytest.raises(KeyError, match="enough"):
        replicas.kernel("m", np.zeros((20, 5)), block_shape=(2, 2), on_block=on_block)
    assert len(seen) < 55


# Three real replicas sharing one registry --------------------------------------------------------


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    with LocalReplicas(tmp_path_factory.mktemp("trio"), 3) as replicas:
        yield replicas


CASES = {
    "gram-full-float64": dict(layout="full", dtype="float64", block_shape=(4, 4)),
    "x1-x2-trace-float32": dict(layout="trace", dtype="float32", block_shape=(5, 7), x2=True),
    "batch-diagonal": dict(
        layout="diagonal", dtype="float64", batch_diagonal=True, block_shape=(4, 4)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_across_three_replicas_equals_a_single_server_kernel(trio, rng, case):
    options = dict(CASES[case])
    with ExitStack() as stack:
        a, b, c = (stack.enter_context(Client(address, timeout=60)) for address in trio.addresses)
        model = a.register_model(CNN_SPEC)  # through one replica only
        x1 = rng.standard_normal((23, 1, 6, 6))
        x2 = rng.standard_normal((31, 1, 6, 6)) if options.pop("x2", False) else None
        if x2 is not None:  # uploaded once, through another replica: every replica sees it
            x1, x2 = b.upload_dataset(x1).id, b.upload_dataset(x2).id
        replicas = stack.enter_context(ReplicaSet(trio.addresses, timeout=60))
        k = replicas.kernel(model, x1, x2, **options)

        report = replicas.last_report
        assert sorted(r.address for r in report.replicas) == sorted(trio.addresses)
        assert sum(r.blocks for r in report.replicas) == report.blocks_total > 3
        assert report.moved_blocks == 0
        options["block_shape"] = report.block_shape  # the pinned shape; same blocks, same bits
        single = c.kernel(model, x1, x2, method=report.method, **options)
    assert k.shape == single.shape
    np.testing.assert_array_equal(k, single)


def test_a_dns_name_reaches_the_replica_behind_it(trio, rng):
    port = trio.addresses[0].rpartition(":")[2]
    x = rng.standard_normal((9, 6))
    with ReplicaSet(f"dns:///localhost:{port}") as replicas:
        assert replicas.addresses == [trio.addresses[0]]
        model = replicas.register_model(MLP_SPEC)
        k = replicas.kernel(model, x, dtype="float64", block_shape=(4, 4))
    with Client(trio.addresses[1]) as other:
        single = other.kernel(model, x, dtype="float64", block_shape=(4, 4))
    np.testing.assert_array_equal(k, single)


def test_unreachable_replicas_raise_unavailable_naming_each(trio):
    with ExitStack() as stack:
        dead = []
        for _ in range(2):  # bound but never listening: every connection is refused
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            dead.append(f"127.0.0.1:{sock.getsockname()[1]}")
        with pytest.raises(NTKError) as info:
            distributed_kernel(dead, "0" * 32, np.zeros((3, 6)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert all(address in info.value.details for address in dead)


def test_unknown_model_is_not_found_on_every_replica(trio):
    with pytest.raises(NTKError) as info:
        distributed_kernel(trio.addresses, "f" * 32, np.zeros((3, 6)))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "f" * 32 in info.value.details


WIDE_MLP = {
    **MLP_SPEC,
    "layers": [
        {"type": "dense", "width": 128},
        {"type": "relu"},
        {"type": "dense", "width": 128},
        {"type": "tanh"},
        {"type": "dense", "width": 3},
    ],
}


def test_killing_a_replica_mid_kernel_still_completes_correctly(tmp_path, rng):
    x = rng.standard_normal((96, 6))
    options = dict(layout="full", dtype="float64", block_shape=(8, 8))  # 78 blocks
    with LocalReplicas(tmp_path, 3) as trio, ReplicaSet(trio.addresses, timeout=60) as replicas:
        model = replicas.register_model(WIDE_MLP)
        with Client(trio.addresses[0], timeout=60) as first:
            single = first.kernel(model, x, method="jacobian_contraction", **options)
        victim = trio.addresses[1]
        delivered = []
        killed = threading.Event()

        def on_block(block, address):
            # The victim is killed from its own stream's thread after its second block, so it
            # dies holding the rest of a chunk of blocks that it has not computed yet.
            if address == victim and not killed.is_set():
                delivered.append(block.index)
                if len(delivered) == 2:
                    trio.kill(1)
                    killed.set()

        k = replicas.kernel(model, x, method="jacobian_contraction", on_block=on_block, **options)

    assert killed.is_set()
    np.testing.assert_array_equal(k, single)
    report = replicas.last_report
    by_address = {r.address: r for r in report.replicas}
    assert by_address[victim].failures and by_address[victim].blocks == 2
    assert report.moved_blocks > 0
    assert sum(r.blocks for r in report.replicas) == report.blocks_total == 78
