"""The Python client: numpy in, numpy out, no torch needed."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from ntk_client import codec
from ntk_client import spec as spec_codec
from ntk_client._proto.ntk.v1 import (
    kernel_pb2,
    model_pb2,
    predict_pb2,
    service_pb2,
    service_pb2_grpc,
)
from ntk_client.assemble import RetryPolicy, assemble
from ntk_client.progress import ProgressCallback, progress_for
from ntk_client.safetensors_io import dump_safetensors
from ntk_client.transport import open_channel

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
LAYOUTS = {"full": kernel_pb2.FULL, "trace": kernel_pb2.TRACE, "diagonal": kernel_pb2.DIAGONAL}
METHODS = {
    "auto": kernel_pb2.AUTO,
    "jacobian_contraction": kernel_pb2.JACOBIAN_CONTRACTION,
    "ntk_vector_products": kernel_pb2.NTK_VECTOR_PRODUCTS,
    "structured": kernel_pb2.STRUCTURED,
}
METHOD_NAMES = {v: k for k, v in METHODS.items()}
# Codes after which the same request may succeed (server restarting, connection dropped).
RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
RETRYABLE_KEY = "ntk-retryable"  # trailing metadata the server sets on retryable refusals
MESSAGE_SIZE_HINT = (
    "; raise the message limit on the client (Client(max_message_bytes=...), ntk "
    "--max-message-bytes) and the server (--max-message-bytes / NTK_MAX_MESSAGE_BYTES), or "
    "upload the inputs with upload_dataset and pass the dataset id"
)


class NTKError(Exception):
    """Any failed call: `code` is the grpc.StatusCode, `details` the server's message.

    `retryable`: the same request may succeed later (queue full, server draining or gone).
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, retryable: bool = False):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retryable = retryable

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> NTKError:
        code, details = exc.code(), exc.details() or ""
        try:
            trailers = exc.trailing_metadata() or ()
        except Exception:  # errors raised before a call existed carry no trailers
            trailers = ()
        flagged = any(key == RETRYABLE_KEY for key, _ in trailers)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
            details += MESSAGE_SIZE_HINT  # gRPC's own text names both sizes but no option
        return cls(code, details, retryable=flagged or code in RETRYABLE_CODES)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    parameter_count: int
    input_shape: tuple[int, ...]
    output_size: int
    spec: dict
    parameters: dict[str, tuple[int, ...]]
    created_at: str

    @classmethod
    def from_proto(cls, msg: model_pb2.Model) -> ModelInfo:
        return cls(
            id=msg.id,
            parameter_count=msg.parameter_count,
            input_shape=tuple(msg.input_shape),
            output_size=msg.output_size,
            spec=spec_codec.from_proto(msg.spec),
            parameters={p.name: tuple(p.shape) for p in msg.parameters},
            created_at=msg.created_at,
        )


@dataclass(frozen=True)
class KernelBlock:
    """Rows [row_offset, +rows) x columns [col_offset, +cols) of a kernel.

    values: (rows, cols, ...) in the kernel's layout, or (rows, ...) for batch_diagonal.
    mirror: an off-diagonal block of a symmetric kernel; its transpose belongs at (col, row).
    """

    index: int
    row_offset: int
    col_offset: int
    rows: int
    cols: int
    values: np.ndarray
    mirror: bool


@dataclass
class KernelStream:
    """Iterate for KernelBlocks; `header` is set once the stream starts, `summary` at its end."""

    _responses: Iterator = field(repr=False)
    header: kernel_pb2.KernelHeader | None = None
    summary: kernel_pb2.KernelSummary | None = None

    def __post_init__(self):
        try:
            first = next(self._responses)
        except grpc.RpcError as exc:
            raise NTKError.from_rpc(exc) from None
        except StopIteration:
            detail = "the kernel stream ended without a header"
            raise NTKError(grpc.StatusCode.UNKNOWN, detail) from None
        self.header = first.header

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.header.shape)

    @property
    def method(self) -> str:
        return METHOD_NAMES.get(self.header.method, "unknown")

    def __iter__(self) -> Iterator[KernelBlock]:
        try:
            for msg in self._responses:
                part = msg.WhichOneof("part")
                if part == "block":
                    b = msg.block
                    yield KernelBlock(
                        b.index,
                        b.row_offset,
                        b.col_offset,
                        b.rows,
                        b.cols,
                        codec.from_proto(b.values, "block.values", finite=False),
                        b.mirror,
                    )
                elif part == "summary":
                    self.summary = msg.summary
        except grpc.RpcError as exc:
            raise NTKError.from_rpc(exc) from None

    def cancel(self) -> None:
        self._responses.cancel()


@dataclass(frozen=True)
class Predictions:
    """Linearised predictions: f[k] is f_t(x_test) at t[k], shape (N_test, O); f0 at t = 0."""

    t: tuple[float, ...]
    f: np.ndarray  # (len(t), N_test, O)
    f0: np.ndarray  # (N_test, O)
    method: str
    seconds: float

    def at(self, t: float) -> np.ndarray:
        return self.f[self.t.index(t)]


def place_block(out: np.ndarray, block, values: np.ndarray, batch_diagonal: bool) -> None:
    """Write a block's values, and their mirror for symmetric kernels, into `out`.

    `block` is anything with row_offset, col_offset, rows, cols and mirror (a KernelBlock).
    """
    r, c = block.row_offset, block.col_offset
    if batch_diagonal:
        out[r : r + block.rows] = values
        return
    out[r : r + block.rows, c : c + block.cols] = values
    if block.mirror:
        swapped = np.swapaxes(values, 0, 1)
        if values.ndim == 4:  # full layout: K(x_j, x_i)[b, a] = K(x_i, x_j)[a, b]
            swapped = np.swapaxes(swapped, 2, 3)
        out[c : c + block.cols, r : r + block.rows] = swapped


def _inputs(x) -> kernel_pb2.Inputs:
    if isinstance(x, str):
        return kernel_pb2.Inputs(dataset_id=x)
    return kernel_pb2.Inputs(tensor=codec.to_proto(x))


def _model_id(model) -> str:
    return model.id if isinstance(model, ModelInfo) else str(model)


class Client:
    """A connection to an NTK server.

    Args:
      target: "host:port" (or any gRPC target such as "dns:///name:port").
      max_message_bytes: the largest message this client accepts; the server sizes kernel blocks
        to fit it.
      timeout: default deadline in seconds for unary calls (None: no deadline).
      token: bearer token sent with every call (None: the NTK_TOKEN environment variable).
      tls, tls_ca, tls_cert, tls_key, tls_server_name: TLS and mutual TLS, see
        ntk_client.transport.open_channel.
      retry: retries and backoff for kernels whose stream breaks (default RetryPolicy()).
    """

    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.target = target
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self._channel = open_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
            channel=channel,
        )
        self._stub = service_pb2_grpc.NTKServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, **kwargs):
        try:
            return method(request, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except grpc.RpcError as exc:
            raise NTKError.from_rpc(exc) from None

    # Models -------------------------------------------------------------------------------

    def register_model(
        self,
        spec: Mapping | Any,
        weights: Mapping[str, np.ndarray] | bytes | None = None,
        *,
        input_shape: Sequence[int] | None = None,
    ) -> ModelInfo:
        """Register an architecture and its initial weights.

        Args:
          spec: a spec dict (see ntk_client.spec), or a torch nn.Sequential of supported layers
            (then `input_shape` is required and its current weights are uploaded).
          weights: optional initial weights by parameter name ("0.weight", "0.bias", ...), or
            the bytes of a safetensors file; absent: the server initialises them from
            spec["init"]["seed"].
        """
        if not isinstance(spec, Mapping):
            from ntk_client.torch_convert import from_sequential

            if input_shape is None:
                raise ValueError("input_shape is required when registering a torch module")
            spec, weights = from_sequential(spec, input_shape)
        request = model_pb2.RegisterModelRequest(spec=spec_codec.to_proto(dict(spec)))
        if isinstance(weights, bytes):
            request.safetensors = weights  # a safetensors file as it is
        elif weights is not None:
            request.safetensors = dump_safetensors(weights)
        response = self._call(self._stub.RegisterModel, request)
        return ModelInfo.from_proto(response.model)

    def get_model(self, model) -> ModelInfo:
        return ModelInfo.from_proto(
            self._call(self._stub.GetModel, model_pb2.GetModelRequest(model_id=_model_id(model)))
        )

    def models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, model_pb2.ListModelsRequest())
        return [ModelInfo.from_proto(m) for m in response.models]

    def delete_model(self, model) -> None:
        self._call(self._stub.DeleteModel, model_pb2.DeleteModelRequest(model_id=_model_id(model)))

    # Datasets -----------------------------------------------------------------------------

    def upload_dataset(self, x, y=None, *, chunk_bytes: int = 1 << 20) -> service_pb2.Dataset:
        """Upload inputs (and targets) once; use the returned `.id` in place of arrays."""
        x = np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        y = None if y is None else np.ascontiguousarray(y, dtype=x.dtype)

        def chunks() -> Iterable[service_pb2.DatasetChunk]:
            yield service_pb2.DatasetChunk(
                dtype=codec.dtype_enum(x.dtype.name),
                x_shape=list(x.shape),
                y_shape=[] if y is None else list(y.shape),
            )
            for name, arr in (("x_data", x), ("y_data", y)):
                if arr is None:
                    continue
                data = memoryview(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).cast("B")
                for start in range(0, len(data), chunk_bytes):
                    yield service_pb2.DatasetChunk(
                        **{name: bytes(data[start : start + chunk_bytes])}
                    )

        return self._call(self._stub.UploadDataset, chunks())

    # Kernels ------------------------------------------------------------------------------

    def _kernel_request(self, model, x1, x2, layout, method, dtype, batch_diagonal, block_shape):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        rows, cols = block_shape or (0, 0)
        request = kernel_pb2.KernelRequest(
            model_id=_model_id(model),
            x1=_inputs(x1),
            layout=LAYOUTS[layout],
            method=METHODS[method],
            dtype=codec.dtype_enum(dtype),
            batch_diagonal=batch_diagonal,
            block_rows=rows,
            block_cols=cols,
            max_message_bytes=self.max_message_bytes,
        )
        if x2 is not None:
            request.x2.CopyFrom(_inputs(x2))
        return request

    def kernel_blocks(
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
        block_indices: Sequence[int] = (),
        timeout: float | None = None,
    ) -> KernelStream:
        """Stream the blocks of K(x1, x2) for callers that place blocks themselves.

        x2 None: the Gram matrix of x1; only blocks on or above the diagonal arrive, those off
        the diagonal with `mirror` set.
        """
        request = self._kernel_request(
            model, x1, x2, layout, method, dtype, batch_diagonal, block_shape
        )
        request.block_indices.extend(block_indices)
        try:
            responses = self._stub.ComputeKernel(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise NTKError.from_rpc(exc) from None
        return KernelStream(responses)

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
        out: np.ndarray | str | os.PathLike | None = None,
        timeout: float | None = None,
        progress: bool | ProgressCallback | None = None,
        retry: RetryPolicy | None = None,
    ) -> np.ndarray:
        """The empirical NTK K(x1, x2) as one array.

        Shape, with N1 = len(x1), N2 = len(x2) (N1 when x2 is None), O = output size:
          full (N1, N2, O, O), trace (N1, N2) (the MEAN over a of K[i, j, a, a]),
          diagonal (N1, N2, O); with batch_diagonal only K(x1_i, x1_i): (N1, ...).

        A stream that breaks is resumed from the blocks already held (see assemble.py), up to
        `retry` (default: the client's) attempts; the result equals an unbroken run's exactly.

        Args:
          x1, x2: arrays (N, *input_shape) in any memory order, or uploaded dataset ids.
          out: an array of the right shape to write into (e.g. a numpy memmap), or a path: the
            kernel is written block by block into an .npy memmap there (PATH.partial until it
            is complete), so it may be far larger than memory. Returns that memmap.
          timeout: deadline in seconds for the whole kernel, retries included.
          progress: None shows a bar on stderr when it is a terminal; True always, False never;
            or a callable(blocks_done, blocks_total, entries_done, entries_total).
        """
        request = self._kernel_request(
            model, x1, x2, layout, method, dtype, batch_diagonal, block_shape
        )

        def open_stream(block_indices, header, remaining_s):
            again = kernel_pb2.KernelRequest()
            again.CopyFrom(request)
            if header is not None:
                # Same grid and method as the first stream: identical blocks, bit for bit.
                again.block_rows, again.block_cols = header.block_rows, header.block_cols
                again.method = header.method
                again.block_indices.extend(block_indices)
            try:
                return KernelStream(self._stub.ComputeKernel(again, timeout=remaining_s))
            except grpc.RpcError as exc:
                raise NTKError.from_rpc(exc) from None

        bar = progress_for(progress)
        try:
            return assemble(
                open_stream,
                place_block,
                out,
                dtype=dtype,
                retry=retry or self.retry,
                progress=bar,
                timeout=timeout,
            )
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()

    # Linearised networks --------------------------------------------------------------------

    def predict(
        self,
        model,
        x_train,
        y_train=None,
        x_test=None,
        *,
        t: Sequence[float] = (math.inf,),
        learning_rate: float = 1.0,
        diag_reg: float = 0.0,
        diag_reg_absolute: bool = False,
        layout: str = "trace",
        method: str = "auto",
        dtype: str = "float32",
        timeout: float | None = None,
    ) -> Predictions:
        """Predictions of the linearised network after gradient descent on the MSE.

        loss = 1 / (2 N O) sum ||f(x_i) - y_i||^2; f_t = f0 + K* K^-1 (I - exp(-eta K t / (N O)))
        (Y - f0(X)). t may contain math.inf. diag_reg adds diag_reg * mean(diag K) to K's
        diagonal (diag_reg itself with diag_reg_absolute). layout "trace" treats outputs as
        independent (K x I); "full" uses the O x O output blocks.
        """
        if layout not in ("trace", "full"):
            raise ValueError(f"layout must be 'trace' or 'full' for predictions, got {layout!r}")
        request = predict_pb2.PredictRequest(
            model_id=_model_id(model),
            x_train=_inputs(x_train),
            t=list(t),
            learning_rate=learning_rate,
            diag_reg=diag_reg,
            diag_reg_absolute=diag_reg_absolute,
            layout=LAYOUTS[layout],
            method=METHODS[method],
            dtype=codec.dtype_enum(dtype),
        )
        if y_train is not None:
            request.y_train.CopyFrom(codec.to_proto(y_train, "float64"))
        if x_test is not None:
            request.x_test.CopyFrom(_inputs(x_test))
        response = self._call(self._stub.Predict, request, timeout=timeout or self.timeout)
        # Results are not re-checked for finiteness: the server refuses non-finite outcomes.
        f = np.stack([codec.from_proto(p.f, "f", finite=False) for p in response.predictions])
        return Predictions(
            t=tuple(p.t for p in response.predictions),
            f=f,
            f0=codec.from_proto(response.f0, "f0", finite=False),
            method=METHOD_NAMES.get(response.method, "unknown"),
            seconds=response.seconds,
        )

    def evaluate(
        self, model, x, dw: Mapping[str, np.ndarray] | None = None, *, dtype: str = "float64"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(f(x; w0), f_lin(x; w0 + dw)), each (N, O); f_lin = f0 + J(x) dw by a jvp."""
        request = predict_pb2.EvaluateRequest(
            model_id=_model_id(model), x=_inputs(x), dtype=codec.dtype_enum(dtype)
        )
        for name, value in (dw or {}).items():
            request.dw[name].CopyFrom(codec.to_proto(value, dtype))
        response = self._call(self._stub.Evaluate, request)
        return (
            codec.from_proto(response.f0, "f0", finite=False),
            codec.from_proto(response.f_lin, "f_lin", finite=False),
        )
