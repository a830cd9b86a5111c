"""gRPC servicer: protobuf <-> domain objects, and the one table from errors to status codes.

No math here: requests are decoded, handed to the Runtime / Registry, and answers encoded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid

import grpc
from ntk_client import codec
from ntk_client import spec as spec_codec
from ntk_client._proto.ntk.v1 import (
    kernel_pb2,
    model_pb2,
    predict_pb2,
    service_pb2,
    service_pb2_grpc,
)

from ntk_server import auth, datasets
from ntk_server.errors import (
    Draining,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ntk_server.registry import ModelRecord, Registry, parse_safetensors
from ntk_server.runtime import KernelJob, Runtime

log = logging.getLogger(__name__)

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    codec.TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
LAYOUT_NAMES = {
    kernel_pb2.LAYOUT_UNSPECIFIED: "trace",
    kernel_pb2.TRACE: "trace",
    kernel_pb2.FULL: "full",
    kernel_pb2.DIAGONAL: "diagonal",
}
LAYOUT_ENUMS = {"trace": kernel_pb2.TRACE, "full": kernel_pb2.FULL, "diagonal": kernel_pb2.DIAGONAL}
METHOD_NAMES = {
    kernel_pb2.METHOD_UNSPECIFIED: "auto",
    kernel_pb2.AUTO: "auto",
    kernel_pb2.JACOBIAN_CONTRACTION: "jacobian_contraction",
    kernel_pb2.NTK_VECTOR_PRODUCTS: "ntk_vector_products",
    kernel_pb2.STRUCTURED: "structured",
}
METHOD_ENUMS = {v: k for k, v in METHOD_NAMES.items() if k != kernel_pb2.METHOD_UNSPECIFIED}
DTYPE_NAMES = {0: "float32", 1: "float32", 2: "float64"}
DEFAULT_CLIENT_MESSAGE_BYTES = 4 << 20
# Trailing metadata on errors worth retrying unchanged (queue full, draining): the client's
# resume and retry logic reads it.
RETRYABLE_KEY = "ntk-retryable"


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return None


def _enum(table: dict, value: int, field: str, enum_name: str):
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {enum_name} enum value {value}", field=field) from None


def handle_errors(method):
    """Turn typed errors into status codes; anything else is INTERNAL, logged once here."""

    async def _abort(context, exc):
        code = status_for(exc)
        if code is None and isinstance(exc, OSError):
            # The registry volume failed (full, read-only, gone): the server itself is fine.
            request_id = uuid.uuid4().hex[:12]
            log.exception("storage error in %s request_id=%s", method.__name__, request_id)
            reason = exc.strerror or type(exc).__name__
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"storage error on the server ({reason}); retry later (request_id={request_id})",
            )
        if code is None:
            request_id = uuid.uuid4().hex[:12]
            log.exception("internal error in %s request_id=%s", method.__name__, request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request_id={request_id})"
            )
        retry = ((RETRYABLE_KEY, "true"),) if getattr(exc, "retryable", False) else ()
        await context.abort(code, str(exc), trailing_metadata=retry)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                self._enter()
                try:
                    async for item in method(self, request, context):
                        yield item
                finally:
                    self.inflight -= 1
            except Exception as exc:  # CancelledError is a BaseException and passes through
                await _abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            self._enter()
            try:
                return await method(self, request, context)
            finally:
                self.inflight -= 1
        except Exception as exc:
            await _abort(context, exc)

    return unary


def model_to_proto(record: ModelRecord) -> model_pb2.Model:
    return model_pb2.Model(
        id=record.id,
        spec=spec_codec.to_proto(record.spec),
        parameter_count=record.parameter_count,
        input_shape=list(record.input_shape),
        output_size=record.output_size,
        parameters=[model_pb2.ParameterInfo(name=n, shape=list(s)) for n, s in record.parameters],
        created_at=record.created_at,
    )


class NTKServicer(service_pb2_grpc.NTKServiceServicer):
    """`draining` (set by Server.stop) refuses new calls; `inflight` counts running ones.

    max_message_bytes: the server's own send limit, which caps the block size of every stream.
    """

    def __init__(self, registry: Registry, runtime: Runtime, *, max_message_bytes: int = 64 << 20):
        self.registry = registry
        self.runtime = runtime
        self.max_message_bytes = max_message_bytes
        self.draining = False
        self.inflight = 0

    def _enter(self) -> None:
        if self.draining:
            raise Draining("the server is draining (shutting down); retry on another replica")
        self.inflight += 1

    # Inputs -------------------------------------------------------------------------------

    async def _inputs(self, msg: kernel_pb2.Inputs, field: str, *, targets=False):
        """Decode an Inputs message: (x, y or None). y is only loaded from datasets."""
        source = msg.WhichOneof("source")
        if source == "tensor":
            return codec.from_proto(msg.tensor, f"{field}.tensor"), None
        if source == "dataset_id":
            x, y = await asyncio.to_thread(
                self.registry.load_dataset, msg.dataset_id, f"{field}.dataset_id"
            )
            return x, (y if targets else None)
        raise InvalidArgument("needs a tensor or a dataset_id", field=field)

    # Models -------------------------------------------------------------------------------

    @handle_errors
    async def RegisterModel(self, request, context):
        spec = spec_from_proto(request.spec)
        weights = parse_safetensors(request.safetensors) if request.safetensors else None
        # Seeded initialisation is torch work: on the device thread (NOTE(one torch thread)).
        record, created = await self.runtime.scheduler.run(
            self.registry.register_model, spec, weights, auth.current_owner()
        )
        return model_pb2.RegisterModelResponse(model=model_to_proto(record), created=created)

    @handle_errors
    async def GetModel(self, request, context):
        return model_to_proto(await asyncio.to_thread(self.registry.get_model, request.model_id))

    @handle_errors
    async def ListModels(self, request, context):
        records = await asyncio.to_thread(self.registry.list_models)
        return model_pb2.ListModelsResponse(models=[model_to_proto(r) for r in records])

    @handle_errors
    async def DeleteModel(self, request, context):
        await asyncio.to_thread(self.registry.delete_model, request.model_id)
        self.runtime.forget(request.model_id)
        return model_pb2.DeleteModelResponse()

    # Datasets -----------------------------------------------------------------------------

    @handle_errors
    async def UploadDataset(self, request_iterator, context):
        record = await datasets.receive(self.registry, request_iterator)
        return dataset_to_proto(record)

    @handle_errors
    async def GetDataset(self, request, context):
        record = await asyncio.to_thread(self.registry.get_dataset, request.dataset_id)
        return dataset_to_proto(record)

    # Kernels ------------------------------------------------------------------------------

    @handle_errors
    async def ComputeKernel(self, request, context):
        start = time.perf_counter()
        x1, _ = await self._inputs(request.x1, "x1")
        x2 = (await self._inputs(request.x2, "x2"))[0] if request.HasField("x2") else None
        if request.max_message_bytes < 0:
            raise InvalidArgument(
                f"must be >= 0, got {request.max_message_bytes}", field="max_message_bytes"
            )
        request_id = uuid.uuid4().hex[:12]
        job = KernelJob(
            model_id=request.model_id,
            x1=x1,
            x2=x2,
            layout=_enum(LAYOUT_NAMES, request.layout, "layout", "Layout"),
            method=_enum(METHOD_NAMES, request.method, "method", "Method"),
            dtype=_enum(DTYPE_NAMES, request.dtype, "dtype", "DType"),
            batch_diagonal=request.batch_diagonal,
            block_rows=request.block_rows,
            block_cols=request.block_cols,
            block_indices=tuple(request.block_indices),
            max_message_bytes=min(
                request.max_message_bytes or DEFAULT_CLIENT_MESSAGE_BYTES, self.max_message_bytes
            ),
            request_id=request_id,
        )
        run = await self.runtime.kernel(job)
        plan = run.plan
        yield kernel_pb2.KernelResponse(
            header=kernel_pb2.KernelHeader(
                model_id=job.model_id,
                n1=plan.n1,
                n2=plan.n2,
                output_size=plan.output_size,
                layout=LAYOUT_ENUMS[job.layout],
                method=METHOD_ENUMS[run.method],
                method_reason=run.reason,
                dtype=codec.dtype_enum(job.dtype),
                symmetric=plan.symmetric,
                batch_diagonal=plan.batch_diagonal,
                shape=list(plan.shape),
                block_rows=plan.block_rows,
                block_cols=plan.block_cols,
                grid_rows=plan.grid_rows,
                grid_cols=plan.grid_cols,
                blocks_total=len(plan.blocks),
                request_id=request_id,
            )
        )
        entries = 0
        async for block, values in run.blocks:
            entries += plan.entries(block)
            yield kernel_pb2.KernelResponse(
                block=kernel_pb2.KernelBlock(
                    index=block.index,
                    row_offset=block.row_offset,
                    col_offset=block.col_offset,
                    rows=block.rows,
                    cols=block.cols,
                    values=codec.to_proto(values, job.dtype),
                    mirror=block.mirror,
                )
            )
        seconds = time.perf_counter() - start
        log.info(
            "kernel done request_id=%s model=%s n1=%d n2=%d layout=%s method=%s blocks=%d s=%.3f",
            request_id,
            job.model_id,
            plan.n1,
            plan.n2,
            job.layout,
            run.method,
            len(plan.blocks),
            seconds,
        )
        yield kernel_pb2.KernelResponse(
            summary=kernel_pb2.KernelSummary(
                blocks=len(plan.blocks), entries=entries, seconds=seconds
            )
        )

    # Predictions --------------------------------------------------------------------------

    @handle_errors
    async def Predict(self, request, context):
        start = time.perf_counter()
        x_train, y_from_dataset = await self._inputs(request.x_train, "x_train", targets=True)
        if request.HasField("y_train"):
            y_train = codec.from_proto(request.y_train, "y_train")
        elif y_from_dataset is not None:
            y_train = y_from_dataset
        else:
            raise InvalidArgument(
                "needs y_train, or an x_train dataset with targets", field="y_train"
            )
        x_test = (
            (await self._inputs(request.x_test, "x_test"))[0]
            if request.HasField("x_test")
            else None
        )
        learning_rate = request.learning_rate if request.HasField("learning_rate") else 1.0
        preds, f0, method = await self.runtime.predict(
            request.model_id,
            x_train,
            y_train,
            x_test,
            list(request.t),
            learning_rate=learning_rate,
            diag_reg=request.diag_reg,
            diag_reg_absolute=request.diag_reg_absolute,
            layout=_enum(LAYOUT_NAMES, request.layout, "layout", "Layout"),
            method=_enum(METHOD_NAMES, request.method, "method", "Method"),
            dtype=_enum(DTYPE_NAMES, request.dtype, "dtype", "DType"),
        )
        times = list(request.t) or [float("inf")]
        return predict_pb2.PredictResponse(
            predictions=[
                predict_pb2.Prediction(t=t, f=codec.to_proto(p, "float64"))
                for t, p in zip(times, preds, strict=True)
            ],
            f0=codec.to_proto(f0, "float64"),
            seconds=time.perf_counter() - start,
            method=METHOD_ENUMS[method],
        )

    @handle_errors
    async def Evaluate(self, request, context):
        x, _ = await self._inputs(request.x, "x")
        dw = {name: codec.from_proto(t, f"dw[{name!r}]") for name, t in request.dw.items()}
        dtype = _enum(DTYPE_NAMES, request.dtype, "dtype", "DType")
        f0, flin = await self.runtime.evaluate(request.model_id, x, dw, dtype)
        return predict_pb2.EvaluateResponse(
            f0=codec.to_proto(f0, dtype), f_lin=codec.to_proto(flin, dtype)
        )


def spec_from_proto(msg: model_pb2.ArchitectureSpec) -> dict:
    """Decode a spec, rejecting unset layers and unknown enum values with the field named."""
    spec = spec_codec.from_proto(msg)
    for i, layer in enumerate(spec["layers"]):
        _check_layer(layer, msg.layers[i], f"spec.layers[{i}]")
    if msg.parameterization not in spec_codec.PARAMETERIZATIONS.values() and msg.parameterization:
        raise InvalidArgument(
            f"unknown Parameterization enum value {msg.parameterization}",
            field="spec.parameterization",
        )
    return spec


def _check_layer(layer: dict, msg: model_pb2.Layer, where: str) -> None:
    if layer["type"] is None:
        raise InvalidArgument("no layer kind set (dense, conv, activation, ...)", field=where)
    if str(layer["type"]).startswith("enum:"):
        raise InvalidArgument(
            f"unknown ActivationKind enum value {msg.activation.kind}",
            field=f"{where}.activation.kind",
        )
    if layer["type"] == "residual":
        for j, inner in enumerate(layer["layers"]):
            _check_layer(inner, msg.residual.layers[j], f"{where}.layers[{j}]")


def dataset_to_proto(record) -> service_pb2.Dataset:
    return service_pb2.Dataset(
        id=record.id,
        dtype=codec.dtype_enum(record.dtype),
        x_shape=list(record.x_shape),
        y_shape=list(record.y_shape),
        size_bytes=record.size_bytes,
    )
