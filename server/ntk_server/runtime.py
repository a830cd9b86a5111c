"""Request-level work between the servicer and the engine: loaded models, input checks, block
streams, predictions. Speaks numpy and torch, never protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from ntk_client.client import place_block

from ntk_server import auth
from ntk_server.admission import Admission, Ticket
from ntk_server.engine import METHODS, KernelComputer, Network, plan_kernel
from ntk_server.engine.blocks import Block, KernelPlan
from ntk_server.engine.cost import choose_method, estimate_memory_bytes
from ntk_server.engine.linearized import evaluate_linearized, gradient_descent_mse
from ntk_server.errors import InvalidArgument
from ntk_server.registry import ModelRecord, Registry
from ntk_server.scheduler import Scheduler

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOADED_MODELS_MAX = 8
KERNEL_CACHE_BYTES = 1 << 30
MAX_EXAMPLES = 1 << 24
# Per-request block counters are kept for this many recent requests (tests and debugging).
BLOCK_COUNTS_KEPT = 4096


@dataclass
class LoadedModel:
    record: ModelRecord
    net: Network
    params: dict[str, torch.Tensor]


@dataclass(frozen=True)
class KernelJob:
    model_id: str
    x1: np.ndarray
    x2: np.ndarray | None
    layout: str = "trace"
    method: str = "auto"
    dtype: str = "float32"
    batch_diagonal: bool = False
    block_rows: int = 0
    block_cols: int = 0
    block_indices: tuple[int, ...] = ()
    max_message_bytes: int = 4 << 20
    request_id: str = ""
    assemble: bool = False  # the whole kernel is held in memory (predictions)


@dataclass
class KernelRun:
    """A planned kernel: the plan, the resolved method and why, and a block iterator."""

    plan: KernelPlan
    method: str
    reason: str
    blocks: AsyncIterator[tuple[Block, np.ndarray]] = field(repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


class Runtime:
    """Request-level work. NOTE(one torch thread): every torch operation runs on the
    scheduler's device thread. With OpenMP, each thread that runs parallel torch work keeps
    its own team of worker threads, and idle teams spin; on a small machine a second team
    (the event loop's, or a to_thread worker's) slowed the device thread's blocks by 2-3x.
    """

    def __init__(
        self,
        registry: Registry,
        scheduler: Scheduler,
        device: torch.device,
        admission: Admission | None = None,
        on_block: Callable[[int], None] | None = None,
    ):
        """on_block(entries) is called once per computed kernel block (metrics)."""
        self.registry = registry
        self.scheduler = scheduler
        self.device = device
        self.admission = admission or Admission()
        self.on_block = on_block
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._block_counts: OrderedDict[str, int] = OrderedDict()
        self.active_requests: set[str] = set()
        self._releasing: set[asyncio.Task] = set()

    def blocks_computed(self, request_id: str) -> int:
        """Kernel blocks computed on the device for a recent request (0 if unknown)."""
        with self._lock:
            return self._block_counts.get(request_id, 0)

    def _count_block(self, request_id: str) -> None:
        with self._lock:
            self._block_counts[request_id] = self._block_counts.get(request_id, 0) + 1
            self._block_counts.move_to_end(request_id)
            while len(self._block_counts) > BLOCK_COUNTS_KEPT:
                self._block_counts.popitem(last=False)

    # Models -------------------------------------------------------------------------------

    def _load(self, model_id: str, dtype: str) -> LoadedModel:
        key = (model_id, dtype)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
        # Replicas share the registry: a model deleted through another one must go here too.
        if loaded is not None and self.registry.has_model(model_id):
            return loaded
        self.forget(model_id)
        record = self.registry.get_model(model_id)
        net = Network(record.spec)
        weights = self.registry.load_weights(model_id)
        params = {k: v.to(device=self.device, dtype=DTYPES[dtype]) for k, v in weights.items()}
        loaded = LoadedModel(record, net, params)
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > LOADED_MODELS_MAX:
                self._models.popitem(last=False)
        return loaded

    async def model(self, model_id: str, dtype: str) -> LoadedModel:
        # On the device thread, like every torch operation: see NOTE(one torch thread).
        return await self.scheduler.run(self._load, model_id, dtype)

    def forget(self, model_id: str) -> None:
        with self._lock:
            for key in [k for k in self._models if k[0] == model_id]:
                del self._models[key]

    def check_inputs(self, model: LoadedModel, x: np.ndarray, field: str) -> None:
        want = model.net.input_shape
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise InvalidArgument(
                f"shape {list(x.shape)} does not match (N, *input_shape) = (N, "
                f"{', '.join(map(str, want))})",
                field=f"{field}.shape",
                value=list(x.shape),
            )
        if x.shape[0] < 1:
            raise InvalidArgument("needs at least one example, got N = 0", field=f"{field}.shape")
        if x.shape[0] > MAX_EXAMPLES:
            raise InvalidArgument(
                f"N = {x.shape[0]} is over the limit of {MAX_EXAMPLES}", field=f"{field}.shape"
            )

    def _tensor(self, x: np.ndarray, dtype: str) -> torch.Tensor:
        # A copy: inputs may be read-only views of request bytes or memory-mapped datasets.
        return torch.tensor(np.asarray(x), dtype=DTYPES[dtype], device=self.device)

    # Kernels ------------------------------------------------------------------------------

    async def kernel(self, job: KernelJob) -> KernelRun:
        """Validate, plan and admit a kernel; blocks are computed as the iterator is consumed.

        Waits here until admission (admission.py) lets the request's memory estimate in. The
        blocks run in the scheduler lane `job.request_id`, round robin with other requests.
        """
        if job.batch_diagonal and job.x2 is not None:
            raise InvalidArgument(
                "must be absent with batch_diagonal, which computes K(x1_i, x1_i)", field="x2"
            )
        model = await self.model(job.model_id, job.dtype)
        self.check_inputs(model, job.x1, "x1")
        if job.x2 is not None:
            self.check_inputs(model, job.x2, "x2")
        itemsize = torch.finfo(DTYPES[job.dtype]).bits // 8
        # Planning walks the whole block grid: off the event loop, which must answer health.
        plan, method, reason, estimate, cache_bytes = await asyncio.to_thread(
            self._plan_within_budget, model, job, itemsize
        )
        what = f"kernel with blocks of {plan.block_rows}x{plan.block_cols} examples"
        ticket = self.admission.reserve(job.request_id, estimate, what)
        try:
            await ticket.wait()
            computer = KernelComputer(model.net, model.params, method, job.layout, cache_bytes)
            blocks = self._blocks(job, plan, computer, ticket)
            # Started generators are closed by the event loop when dropped, so from here on
            # its `finally` returns the request's memory whatever happens to the stream.
            await anext(blocks)
        except BaseException:
            ticket.release()
            raise
        return KernelRun(plan, method, reason, blocks)

    def _plan(self, model: LoadedModel, job: KernelJob, itemsize: int, rows: int, cols: int):
        n2 = None if job.x2 is None else job.x2.shape[0]
        plan = plan_kernel(
            job.x1.shape[0],
            n2,
            model.net.output_size,
            job.layout,
            itemsize,
            job.max_message_bytes,
            batch_diagonal=job.batch_diagonal,
            block_rows=rows,
            block_cols=cols,
            indices=list(job.block_indices),
        )
        auth.check_kernel_entries(sum(plan.entries(b) for b in plan.blocks))
        method, reason = job.method, "requested"
        if method != "auto" and method not in METHODS:
            raise InvalidArgument(
                f"{method} is not available on this server; use auto or one of {list(METHODS)}",
                field="method",
                value=method,
            )
        if method == "auto":
            method, reason = choose_method(
                model.net,
                plan.n1,
                None if plan.symmetric else plan.n2,  # a Gram matrix computes half the blocks
                job.layout,
                itemsize,
                plan.block_rows,
                plan.block_cols,
                job.batch_diagonal,
            )
        return plan, method, reason

    def _estimate(
        self, model: LoadedModel, job: KernelJob, plan: KernelPlan, method: str, itemsize: int
    ) -> tuple[int, int]:
        """(peak device bytes, Jacobian cache bytes) for a planned kernel.

        One block's working memory (the cost model's estimate), the inputs, the assembled
        kernel when it is held whole, and a Jacobian cache that gets at most half of what the
        budget has left.
        """
        net = model.net
        rows, cols = plan.block_rows, plan.block_cols
        # One block as a request of its own: rows x cols (rows alone with batch_diagonal).
        per_block = estimate_memory_bytes(
            net,
            method,
            rows,
            None if plan.batch_diagonal else cols,
            job.layout,
            itemsize,
            rows,
            cols,
            batch_diagonal=plan.batch_diagonal,
        )
        inputs = (job.x1.size + (0 if job.x2 is None else job.x2.size)) * itemsize
        output = math.prod(plan.shape) * itemsize if job.assemble else 0
        fixed = per_block + inputs + output
        cache = 0
        if method == "jacobian_contraction":
            examples = plan.n1 + (0 if job.x2 is None else plan.n2)
            jacobians = examples * net.output_size * net.parameter_count * itemsize
            room = max(0, self.admission.budget_bytes - fixed)
            cache = min(KERNEL_CACHE_BYTES, jacobians, room // 2)
        return fixed + cache, cache

    def _plan_within_budget(self, model: LoadedModel, job: KernelJob, itemsize: int):
        """Plan the kernel; when the server picks the block shape, halve it until it fits.

        A block shape the caller chose (or a resume, which names block indices) is kept as is,
        since the block grid must not change under the caller.
        """
        rows, cols = job.block_rows, job.block_cols
        pinned = bool(rows or cols or job.block_indices)
        # What no block shape changes: the inputs, and the kernel itself when held whole.
        n_inputs = job.x1.size + (0 if job.x2 is None else job.x2.size)
        floor = n_inputs * itemsize
        previous = None
        while True:
            try:
                plan, method, reason = self._plan(model, job, itemsize, rows, cols)
            except InvalidArgument:
                if previous is None:
                    raise
                return previous  # a finer grid would be too large; admission refuses this one
            estimate, cache = self._estimate(model, job, plan, method, itemsize)
            if job.assemble:
                floor = (n_inputs + math.prod(plan.shape)) * itemsize
            smallest = plan.block_rows == 1 and plan.block_cols == 1
            hopeless = self.admission.never_fits(floor)
            previous = plan, method, reason, estimate, cache
            if pinned or smallest or hopeless or not self.admission.never_fits(estimate):
                return previous
            rows, cols = max(1, plan.block_rows // 2), max(1, plan.block_cols // 2)

    async def _blocks(
        self, job: KernelJob, plan: KernelPlan, computer: KernelComputer, ticket: Ticket
    ) -> AsyncIterator[tuple[Block, np.ndarray] | None]:
        """Yields None once (primed by `kernel`), then (block, values) per block."""
        request_id = job.request_id
        self.active_requests.add(request_id)
        try:
            inputs: dict[str, torch.Tensor] = {}  # converted on the device thread, once

            def compute(block: Block) -> np.ndarray:
                if not inputs:
                    inputs["x1"] = self._tensor(job.x1, job.dtype)
                    if job.x2 is not None:
                        inputs["x2"] = self._tensor(job.x2, job.dtype)
                x1, x2 = inputs["x1"], inputs.get("x2")
                r0, c0 = block.row_offset, block.col_offset
                rows = x1[r0 : r0 + block.rows]
                if plan.batch_diagonal:
                    out = computer.block(rows, None, ("x1", r0), batch_diagonal=True)
                else:
                    other, name = (x1, "x1") if x2 is None else (x2, "x2")
                    cols = other[c0 : c0 + block.cols]
                    out = computer.block(rows, cols, ("x1", r0), (name, c0))
                    if plan.symmetric and r0 == c0:
                        out = symmetrize(out)
                values = out.detach().cpu().numpy()
                self._count_block(request_id)
                if not np.isfinite(values).all():
                    raise InvalidArgument(
                        f"block {block.index} of the kernel has non-finite entries: the inputs "
                        f"or weights overflow {job.dtype}; rescale the inputs or use float64",
                        field="x1",
                    )
                return values

            yield None
            for block in plan.blocks:
                start = time.perf_counter()
                values = await self.scheduler.run(compute, block, lane=request_id)
                log.debug(
                    "block index=%d rows=%d cols=%d seconds=%.4f request_id=%s",
                    block.index,
                    block.rows,
                    block.cols,
                    time.perf_counter() - start,
                    request_id,
                )
                if self.on_block is not None:
                    self.on_block(plan.entries(block))
                yield block, values
        finally:
            task = asyncio.get_running_loop().create_task(
                self._release(request_id, computer, ticket)
            )
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, request_id: str, computer: KernelComputer, ticket: Ticket) -> None:
        """Free a request's device memory once the device is done with its last block.

        A cancelled request's block may still be running; the device thread runs one item at
        a time, so an item queued now runs after it, and only then is the memory returned.
        """
        try:
            await self.scheduler.run(self._free, computer, lane=request_id)
        except Exception:  # shutting down: the worker is gone, nothing runs any more
            computer.release()
        finally:
            ticket.release()
            self.active_requests.discard(request_id)

    def _free(self, computer: KernelComputer) -> None:
        computer.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def kernel_array(self, job: KernelJob) -> tuple[np.ndarray, str]:
        """The whole kernel assembled in memory (for predictions); returns (K, method)."""
        run = await self.kernel(job)
        out = np.empty(run.plan.shape, dtype=job.dtype)
        async for block, values in run.blocks:
            place_block(out, block, values, run.plan.batch_diagonal)
        return out, run.method

    # Linearised predictions ----------------------------------------------------------------

    async def predict(
        self,
        model_id: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray | None,
        t: list[float],
        *,
        learning_rate: float,
        diag_reg: float,
        diag_reg_absolute: bool,
        layout: str,
        method: str,
        dtype: str,
    ) -> tuple[list[np.ndarray], np.ndarray, str]:
        """([f_t(x_test) per t], f0(x_test), method); each (N_test, O) float64."""
        model = await self.model(model_id, dtype)
        self.check_inputs(model, x_train, "x_train")
        if x_test is not None:
            self.check_inputs(model, x_test, "x_test")
        o = model.net.output_size
        if y_train.shape != (x_train.shape[0], o):
            raise InvalidArgument(
                f"shape {list(y_train.shape)} must be (N, O) = ({x_train.shape[0]}, {o})",
                field="y_train.shape",
                value=list(y_train.shape),
            )
        if layout not in ("trace", "full"):
            raise InvalidArgument(
                f"must be TRACE or FULL for predictions, got {layout}", field="layout"
            )
        if not t:
            t = [math.inf]
        big = 1 << 62  # in-process assembly: no message limit applies
        request_id = uuid.uuid4().hex[:12]
        common = dict(
            layout=layout, method=method, dtype=dtype, max_message_bytes=big, assemble=True
        )
        k_tt, used = await self.kernel_array(
            KernelJob(model_id, x_train, None, request_id=f"{request_id}-train", **common)
        )
        if x_test is None:
            k_st, x_eval = k_tt, x_train
        else:
            k_st, _ = await self.kernel_array(
                KernelJob(model_id, x_test, x_train, request_id=f"{request_id}-test", **common)
            )
            x_eval = x_test

        def solve():
            f0_train = model.net.apply(model.params, self._tensor(x_train, dtype))
            f0_test = model.net.apply(model.params, self._tensor(x_eval, dtype))
            preds = gradient_descent_mse(
                torch.as_tensor(k_tt, device=self.device),
                torch.as_tensor(k_st, device=self.device),
                self._tensor(y_train, "float64"),
                f0_train.detach(),
                f0_test.detach(),
                t,
                learning_rate=learning_rate,
                diag_reg=diag_reg,
                diag_reg_absolute=diag_reg_absolute,
                layout=layout,
            )
            f0 = f0_test.detach().to(torch.float64).cpu().numpy()
            return [p.cpu().numpy() for p in preds], f0

        # The solve holds both kernels and an eigendecomposition of K(X, X): about 4 copies.
        solve_bytes = (k_tt.nbytes + k_st.nbytes) * 4 + (0 if x_test is None else x_test.nbytes)
        ticket = self.admission.reserve(request_id, solve_bytes, "prediction")
        try:
            await ticket.wait()
            with torch.no_grad():
                preds, f0 = await self.scheduler.run(solve, lane=request_id)
        finally:
            ticket.release()
        return preds, f0, used

    async def evaluate(
        self, model_id: str, x: np.ndarray, dw: Mapping[str, np.ndarray], dtype: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(f(x; w0), f_lin(x; w0 + dw)), each (N, O)."""
        model = await self.model(model_id, dtype)
        self.check_inputs(model, x, "x")
        shapes = model.net.param_shapes
        for name, value in dw.items():
            if name not in shapes:
                raise InvalidArgument(
                    f"unknown parameter {name!r}; parameters are {sorted(shapes)}",
                    field=f"dw[{name!r}]",
                )
            if tuple(value.shape) != shapes[name]:
                raise InvalidArgument(
                    f"shape {list(value.shape)} does not match {list(shapes[name])}",
                    field=f"dw[{name!r}].shape",
                )

        def run():
            deltas = {k: self._tensor(v, dtype) for k, v in dw.items()}
            f0, flin = evaluate_linearized(model.net, model.params, self._tensor(x, dtype), deltas)
            if not (torch.isfinite(f0).all() and torch.isfinite(flin).all()):
                raise InvalidArgument(
                    f"f or f_lin has non-finite entries: the inputs, weights or dw overflow "
                    f"{dtype}; rescale them or use float64",
                    field="x",
                )
            return f0.cpu().numpy(), flin.cpu().numpy()

        # A jvp over all N examples at once: about one NTK-vector-product block of N x 1.
        itemsize = torch.finfo(DTYPES[dtype]).bits // 8
        request_id = uuid.uuid4().hex[:12]
        estimate = (
            estimate_memory_bytes(
                model.net, "ntk_vector_products", x.shape[0], 1, "trace", itemsize, x.shape[0], 1
            )
            + 2 * x.size * itemsize
        )
        ticket = self.admission.reserve(request_id, estimate, "evaluation")
        try:
            await ticket.wait()
            return await self.scheduler.run(run, lane=request_id)
        finally:
            ticket.release()


def symmetrize(block: torch.Tensor) -> torch.Tensor:
    """Average a diagonal block of a Gram matrix with its transpose, so K == K^T exactly.

    The two triangles come from different reduction orders and may differ in the last bit.
    """
    swapped = block.transpose(0, 1)
    if block.dim() == 4:  # full layout: K[j, i, b, a] pairs with K[i, j, a, b]
        swapped = swapped.transpose(2, 3)
    return 0.5 * (block + swapped)
