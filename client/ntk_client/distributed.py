"""One kernel spread over several replicas of the service that share one registry.

    from ntk_client.distributed import ReplicaSet
    with ReplicaSet("dns:///ntk.ntk.svc.cluster.local:50051") as replicas:
        model = replicas.register_model(spec)          # any replica; the registry is shared
        k = replicas.kernel(model, x_train)            # (N, N), blocks from every replica

NOTE(spreading): how a kernel is split, and what happens when a replica fails.
  1. A probe asks one replica for block 0 only. Its header fixes the grid (block shape, grid
     rows and columns, symmetry) and the method AUTO resolved to; block 0 is kept.
  2. Every later request pins that block shape and method, so each replica plans the same grid
     and computes each block exactly as a single server would. A replica whose header
     disagrees (another server version) is an error, not something to paper over.
  3. The remaining blocks are cut into about CHUNKS_PER_REPLICA chunks per replica, each a
     tile of the grid (block rows x block columns; on a symmetric grid, the tiles on and above
     the diagonal). A server computes the Jacobian of each block row and column range once per
     request and keeps it only for that request, so what a request costs is mostly the number
     of ranges it touches: a tile of t x t blocks needs 2t Jacobians where a run of whole
     columns needs one per block row. Several chunks per replica let a faster replica take
     more of them; the largest go first. One thread per replica takes chunks from a shared
     queue and streams each as one request, its blocks in the server's column-major order.
  4. A stream that breaks (replica gone, draining, overloaded, unknown model on a replica that
     does not see the registry yet) puts the blocks it had not delivered back at the front of
     the queue, split so that every surviving replica can take a piece. A replica that fails
     MAX_REPLICA_FAILURES times with no block delivered in between is left out of this
     kernel. Errors in the request
     itself (INVALID_ARGUMENT and the like) stop the whole kernel at once.
  5. The kernel is complete when every block index has been placed; if every replica has been
     left out before that, the last errors are raised.
Addresses are resolved once per ReplicaSet; call `refresh()` to pick up pods added later.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from ntk_client.client import METHOD_NAMES, Client, KernelBlock, NTKError, place_block
from ntk_client.grid import _chunks, grid_indices, tiles
from ntk_client.targets import resolve_targets

log = logging.getLogger(__name__)

CHUNKS_PER_REPLICA = 2
MAX_REPLICA_FAILURES = 2
RETRY_BACKOFF_S = 0.2
# Errors in the request itself: every replica would answer the same, so none is retried.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
# Header fields every replica must agree on for their blocks to form one kernel.
GRID_FIELDS = (
    "n1",
    "n2",
    "output_size",
    "layout",
    "method",
    "dtype",
    "symmetric",
    "batch_diagonal",
    "shape",
    "block_rows",
    "block_cols",
    "grid_rows",
    "grid_cols",
)


# Reports ------------------------------------------------------------------------------------


@dataclass
class ReplicaReport:
    """What one replica did for one kernel."""

    address: str
    blocks: int = 0
    streams: int = 0
    failures: list[str] = field(default_factory=list)
    left_out: bool = False  # failed MAX_REPLICA_FAILURES times with no block in between


@dataclass(frozen=True)
class SpreadReport:
    """How one kernel was spread: `moved_blocks` counts blocks re-queued after a failure."""

    blocks_total: int
    method: str
    block_shape: tuple[int, int]
    moved_blocks: int
    seconds: float
    replicas: tuple[ReplicaReport, ...]


# The spread of one kernel ---------------------------------------------------------------------


@dataclass
class _Replica:
    client: Client
    report: ReplicaReport
    failures_in_a_row: int = 0
    last_error: NTKError | None = None
    streams: list = field(default_factory=list)  # open KernelStreams, to cancel


class _Spread:
    """The state of one kernel being computed by several replicas (NOTE(spreading))."""

    def __init__(
        self, replicas: list[_Replica], request: dict, out, timeout, on_block, chunks_per_replica
    ):
        self.replicas = replicas
        self.chunks_per_replica = chunks_per_replica
        self.request = request  # kernel_blocks keyword arguments, without block_indices
        self.out = out
        self.timeout = timeout
        self.on_block = on_block
        self.header = None
        self.received: set[int] = set()
        self.pending: collections.deque[list[int]] = collections.deque()
        self.in_flight = 0
        self.moved = 0
        self.fatal: BaseException | None = None
        self.last_error: NTKError | None = None
        self.cond = threading.Condition()

    # One stream -----------------------------------------------------------------------------

    def _stream(self, replica: _Replica, indices: list[int]) -> None:
        """Stream `indices` from one replica, placing each block; raises NTKError on failure."""
        replica.report.streams += 1
        stream = replica.client.kernel_blocks(
            **self.request, block_indices=indices, timeout=self.timeout
        )
        with self.cond:
            replica.streams.append(stream)
            if self.fatal is not None:
                stream.cancel()
        try:
            if self.header is None:
                self._adopt(stream.header)
            else:
                self._check(replica, stream.header)
            wanted = set(indices)
            for block in stream:
                if block.index not in wanted:
                    raise NTKError(
                        grpc.StatusCode.DATA_LOSS,
                        f"replica {replica.report.address} sent block {block.index}, which was "
                        f"not asked for",
                    )
                self._place(replica, block)
            missing = wanted - self.received
            if missing:
                raise NTKError(
                    grpc.StatusCode.DATA_LOSS,
                    f"stream ended without {len(missing)} of its {len(wanted)} blocks",
                )
        except BaseException:
            stream.cancel()  # a no-op on a broken stream; stops the server on our own errors
            raise
        finally:
            with self.cond:
                replica.streams.remove(stream)

    def _adopt(self, header) -> None:
        """Fix the grid and method from the probe's header; allocate the output."""
        self.header = header
        shape = tuple(header.shape)
        if self.out is None:
            self.out = np.empty(shape, dtype=self.request["dtype"])
        elif tuple(self.out.shape) != shape:
            raise ValueError(f"out has shape {self.out.shape}, the kernel has shape {shape}")
        self.request["method"] = METHOD_NAMES[header.method]
        self.request["block_shape"] = (header.block_rows, header.block_cols)

    def _check(self, replica: _Replica, header) -> None:
        for name in GRID_FIELDS:
            mine, theirs = getattr(self.header, name), getattr(header, name)
            if mine != theirs:
                raise NTKError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"replica {replica.report.address} plans this kernel differently: header."
                    f"{name} is {theirs}, not {mine} as on the first replica; run one server "
                    "version on every replica",
                )

    def _place(self, replica: _Replica, block: KernelBlock) -> None:
        # Blocks cover disjoint parts of `out` (a mirror covers the transposed part), so
        # placing needs no lock; the bookkeeping does.
        with self.cond:
            if block.index in self.received or self.fatal is not None:
                return
        place_block(self.out, block, block.values, self.header.batch_diagonal)
        with self.cond:
            self.received.add(block.index)
            replica.report.blocks += 1
            replica.failures_in_a_row = 0
        if self.on_block is not None:
            self.on_block(block, replica.report.address)

    # Scheduling -----------------------------------------------------------------------------

    def probe(self) -> None:
        """Block 0 from the first replica that answers, for the header (NOTE(spreading) 1)."""
        for attempt in range(MAX_REPLICA_FAILURES):
            time.sleep(RETRY_BACKOFF_S * attempt)
            for replica in self.replicas:
                try:
                    self._stream(replica, [0])
                    return
                except NTKError as exc:
                    if exc.code in FATAL_CODES:
                        raise
                    self._failed(replica, exc, 0)
        self._raise_all_failed()

    def run(self) -> np.ndarray:
        """Probe, then stream the other blocks from every replica at once."""
        self.probe()
        alive = [r for r in self.replicas if not r.report.left_out]
        parts = self.chunks_per_replica * len(alive) if len(alive) > 1 else 1
        for tile in tiles(self.header, parts):
            rest = [i for i in tile if i not in self.received]
            if rest:
                self.pending.append(rest)
        # Each replica starts with a chunk of its own, however fast the others are.
        firsts = [self.pending.popleft() if self.pending else None for _ in alive]
        self.in_flight = sum(first is not None for first in firsts)
        threads = [
            threading.Thread(
                target=self._worker, args=(r, first), name=f"ntk-spread-{r.report.address}"
            )
            for r, first in zip(alive, firsts, strict=True)
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException as exc:  # KeyboardInterrupt while waiting: cancel every stream
            self._stop(exc)
            for t in threads:
                t.join()
            raise
        if self.fatal is not None:
            raise self.fatal
        if len(self.received) < len(grid_indices(self.header)):
            self._raise_all_failed()
        return self.out

    def _worker(self, replica: _Replica, chunk: list[int] | None) -> None:
        while True:
            if chunk is None:
                with self.cond:
                    while not self.pending and self.in_flight and self.fatal is None:
                        self.cond.wait()
                    if self.fatal is not None or not self.pending or replica.report.left_out:
                        return
                    chunk = self.pending.popleft()
                    self.in_flight += 1
            error = None
            try:
                self._stream(replica, chunk)
            except NTKError as exc:
                error = exc
            except BaseException as exc:  # out of shape, on_block raised, a bug: stop all
                self._stop(exc)
            with self.cond:
                self.in_flight -= 1
                left = [i for i in chunk if i not in self.received]
                if left and self.fatal is None:
                    alive = sum(not r.report.left_out for r in self.replicas)
                    for piece in reversed(_chunks(left, alive)):
                        self.pending.appendleft(piece)
                    self.moved += len(left)
                self.cond.notify_all()
            if error is not None:
                if error.code in FATAL_CODES:
                    self._stop(error)
                    return
                self._failed(replica, error, len(left))
                if replica.report.left_out:
                    return
                time.sleep(RETRY_BACKOFF_S * replica.failures_in_a_row)
            chunk = None

    def _failed(self, replica: _Replica, exc: NTKError, requeued: int) -> None:
        with self.cond:
            if self.fatal is not None:
                return
            replica.failures_in_a_row += 1
            replica.last_error = self.last_error = exc
            replica.report.failures.append(str(exc))
            if replica.failures_in_a_row >= MAX_REPLICA_FAILURES:
                replica.report.left_out = True
            self.cond.notify_all()
        log.warning(
            "replica %s failed (%s); %d of its blocks went back to the queue%s",
            replica.report.address,
            exc,
            requeued,
            "; it is left out of this kernel" if replica.report.left_out else "",
        )

    def _stop(self, exc: BaseException) -> None:
        """Record the error that ends the kernel and cancel every open stream."""
        with self.cond:
            if self.fatal is None:
                self.fatal = exc
            streams = [s for r in self.replicas for s in r.streams]
            self.cond.notify_all()
        for stream in streams:
            stream.cancel()

    def _raise_all_failed(self) -> None:
        failed = [r for r in self.replicas if r.last_error is not None]
        errors = "; ".join(f"{r.report.address}: {r.last_error}" for r in failed)
        total = len(grid_indices(self.header)) if self.header is not None else "?"
        code = self.last_error.code if self.last_error else grpc.StatusCode.UNAVAILABLE
        raise NTKError(
            code,
            f"every replica failed, after {len(self.received)} of {total} blocks; each is tried "
            f"{MAX_REPLICA_FAILURES} times in a row ({errors})",
        )


# The public face ----------------------------------------------------------------------------


class ReplicaSet:
    """Clients for every replica of one service, all sharing one registry.

    Args:
      targets: "dns:///name:port" (each A or AAAA record is one replica, as a Kubernetes headless
        Service answers), one "host:port", or a sequence of targets.
      client_factory: builds the Client of one address (default: Client(address,
        **client_options)); for TLS, tokens or other channel settings.
      client_options: keyword arguments for each Client (max_message_bytes, timeout, ...).

    Safe to share between threads; `last_report` describes the kernel that finished last.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        client_factory: Callable[[str], Client] | None = None,
        **client_options,
    ):
        self.targets = targets
        self._factory = client_factory or (lambda address: Client(address, **client_options))
        self._clients: dict[str, Client] = {}
        self._turn = 0
        self._lock = threading.Lock()
        self.last_report: SpreadReport | None = None
        self.refresh()

    @property
    def addresses(self) -> list[str]:
        return list(self._clients)

    def refresh(self) -> list[str]:
        """Resolve the targets again: clients open for new addresses and close for gone ones."""
        addresses = resolve_targets(self.targets)
        with self._lock:
            for address in [a for a in self._clients if a not in addresses]:
                self._clients.pop(address).close()
            for address in addresses:
                if address not in self._clients:
                    self._clients[address] = self._factory(address)
        log.debug("replicas %s", addresses)
        return addresses

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rotated(self) -> list[tuple[str, Client]]:
        # Start each kernel's probe at the next replica, so probes spread over the set.
        with self._lock:
            items = list(self._clients.items())
            turn = self._turn % max(1, len(items))
            self._turn += 1
        return items[turn:] + items[:turn]

    def first_available(self, call: Callable[[Client], object]):
        """call(client) on one replica after another until one answers.

        Registry calls need only one replica, since all share the registry. An error in the
        request itself (FATAL_CODES) is raised at once; otherwise the last error, once every
        replica has failed.
        """
        last = None
        for address, client in self._rotated():
            try:
                return call(client)
            except NTKError as exc:
                if exc.code in FATAL_CODES:
                    raise
                log.warning("replica %s failed (%s); trying the next", address, exc)
                last = exc
        raise last if last is not None else ValueError("the replica set is closed")

    def register_model(self, *args, **kwargs):
        """Client.register_model on any replica; the model is then usable on all of them."""
        return self.first_available(lambda c: c.register_model(*args, **kwargs))

    def get_model(self, model):
        return self.first_available(lambda c: c.get_model(model))

    def upload_dataset(self, x, y=None, **kwargs):
        """Client.upload_dataset on any replica; pass the returned `.id` for x1 or x2 so that
        large inputs are not re-sent with every chunk of blocks."""
        return self.first_available(lambda c: c.upload_dataset(x, y, **kwargs))

    def kernel(
        self,
        model,
        x1,
        x2=None,
        *,
        layout: str = "trace",
        method: str = "auto",
        dtype: str = "float32",
        batch_diagonal: bool = False,
        block_shape: tuple[int, int] | None = None,
        out: np.ndarray | None = None,
        timeout: float | None = None,
        on_block: Callable[[KernelBlock, str], None] | None = None,
        chunks_per_replica: int = CHUNKS_PER_REPLICA,
    ) -> np.ndarray:
        """The empirical NTK K(x1, x2) as one array, its blocks computed by every replica.

        Shape, with N1 = len(x1), N2 = len(x2) (N1 when x2 is None), O = output size:
          full (N1, N2, O, O), trace (N1, N2) (the MEAN over a of K[i, j, a, a]),
          diagonal (N1, N2, O); with batch_diagonal only K(x1_i, x1_i): (N1, ...).
        The values equal those of Client.kernel with the same block shape and method.

        Args:
          x1, x2: arrays (N, *input_shape) or uploaded dataset ids (upload once with
            `upload_dataset`: every request carries the inputs).
          block_shape: (rows, cols) hint; smaller blocks spread more evenly and lose less work
            when a replica fails, at more per-block overhead.
          out: an array (e.g. a numpy memmap) of the kernel's shape to write into.
          timeout: deadline in seconds of each request (one chunk of blocks); a replica that
            misses it counts as failed and its blocks go to the others.
          on_block: called as on_block(block, address) after each block is placed, from the
            thread of that replica; an exception raised there stops the kernel.
          chunks_per_replica: requests per replica the grid is first cut into. More balance
            replicas of unequal speed; fewer recompute fewer Jacobians (NOTE(spreading) 3).

        Raises:
          NTKError: the request's own error (e.g. INVALID_ARGUMENT) at once, or the last
            error once every replica has failed MAX_REPLICA_FAILURES times in a row.
        """
        started = time.perf_counter()
        replicas = [_Replica(client, ReplicaReport(address)) for address, client in self._rotated()]
        if not replicas:
            raise ValueError("the replica set is closed")
        request = dict(
            model=model,
            x1=x1,
            x2=x2,
            layout=layout,
            method=method,
            dtype=dtype,
            batch_diagonal=batch_diagonal,
            block_shape=block_shape,
        )
        if chunks_per_replica < 1:
            raise ValueError(f"chunks_per_replica must be >= 1, got {chunks_per_replica}")
        spread = _Spread(replicas, request, out, timeout, on_block, chunks_per_replica)
        try:
            return spread.run()
        finally:
            if spread.header is not None:
                self.last_report = SpreadReport(
                    blocks_total=len(grid_indices(spread.header)),
                    method=request["method"],
                    block_shape=(spread.header.block_rows, spread.header.block_cols),
                    moved_blocks=spread.moved,
                    seconds=time.perf_counter() - started,
                    replicas=tuple(r.report for r in replicas),
                )
                log.info(
                    "kernel spread shape=%s blocks=%d replicas=%d moved=%d s=%.3f",
                    list(spread.header.shape),
                    self.last_report.blocks_total,
                    len(replicas),
                    spread.moved,
                    self.last_report.seconds,
                )


def distributed_kernel(
    targets: str | Sequence[str],
    model,
    x1,
    x2=None,
    *,
    client_options: dict | None = None,
    **kernel_options,
) -> np.ndarray:
    """ReplicaSet(targets).kernel(model, x1, x2, **kernel_options) in one call; see there for
    the shape. client_options go to each replica's Client."""
    with ReplicaSet(targets, **(client_options or {})) as replicas:
        return replicas.kernel(model, x1, x2, **kernel_options)
