"""One server interceptor for everything that wraps a request without being part of it.

For each ntk.v1.NTKService call, in order: authenticate the bearer token, check the role, hide
other tokens' models (owner-only mode), count the call against its token's concurrency quota,
then run the servicer with the caller in `auth.current()`; at the end, one log line and the
request metrics. grpc.health.v1 passes untouched (probes carry no token); any other service
(reflection) needs a valid token when authentication is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from ntk_client._proto.ntk.v1 import model_pb2

from ntk_server import auth
from ntk_server.errors import ServiceError, Unauthenticated
from ntk_server.metrics import Metrics
from ntk_server.ownership import Ownership
from ntk_server.service import status_for

log = logging.getLogger(__name__)

DEADLINE_SLACK_S = 0.25

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


@dataclass
class _Call:
    """What the log line and the metrics of one request need."""

    method: str
    peer: str
    start: float
    principal: auth.Principal | None = None
    model: str = ""
    request_bytes: int = 0
    response_bytes: int = 0
    responses: int = 0
    counted: bool = False  # holds a concurrency slot and the in-flight gauge
    finished: bool = False


def _handler(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced, keeping its kind and (de)serializers."""
    _, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: grpc.RpcMethodHandler):
    attribute, _ = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, attribute)


def _denying(handler: grpc.RpcMethodHandler, exc: ServiceError) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(status_for(exc), str(exc))

    return _handler(handler, deny)


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, authorization, quotas, ownership, request logs and request metrics.

    tokens None: authentication is off and every caller is `auth.anonymous(default_quotas)`.
    """

    def __init__(
        self,
        *,
        service_name: str,
        tokens: auth.TokenTable | None,
        default_quotas: auth.Quotas,
        metrics: Metrics | None = None,
        ownership: Ownership | None = None,
    ):
        self.service_prefix = f"/{service_name}/"
        self.health_prefix = f"/{health.SERVICE_NAME}/"
        self.tokens = tokens
        self.anonymous = auth.anonymous(default_quotas)
        self.metrics = metrics
        self.ownership = ownership
        self.limiter = auth.ConcurrencyLimiter()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or path.startswith(self.health_prefix):
            return handler
        if not path.startswith(self.service_prefix):
            if self.tokens is not None:
                try:
                    self.tokens.authenticate(handler_call_details.invocation_metadata or ())
                except Unauthenticated as exc:
                    return _denying(handler, exc)
            return handler
        return self._wrap(handler, path[len(self.service_prefix) :])

    # Admission -----------------------------------------------------------------------------

    async def _admit(self, call: _Call, request, context) -> None:
        """Authenticate, authorize, check visibility and take a concurrency slot, or raise."""
        if self.tokens is None:
            call.principal = self.anonymous
        else:
            call.principal = self.tokens.authenticate(context.invocation_metadata() or ())
            auth.authorize(call.principal, call.method)
        call.model = getattr(request, "model_id", "") if request is not None else ""
        if self.ownership is not None and call.model:
            await self.ownership.check(call.principal, call.model)
        self.limiter.acquire(call.principal)
        call.counted = True
        if self.metrics is not None:
            self.metrics.inflight.inc()

    async def _begin(self, call: _Call, handler, request_or_iterator, context):
        """Admit the call or abort it; returns (request or None, what the servicer gets)."""
        if handler.request_streaming:
            request, argument = None, _counting(request_or_iterator, call)
        else:
            request = argument = request_or_iterator
            call.request_bytes = request.ByteSize()
        try:
            await self._admit(call, request, context)
        except ServiceError as exc:
            await context.abort(status_for(exc), str(exc))
        return request, argument

    async def _unary(self, call: _Call, request, argument, behavior, context):
        """Run a unary-response servicer method, or answer for it (owner-only DeleteModel)."""
        response = None
        if self.ownership is not None and call.method == "DeleteModel":
            if await self.ownership.release(call.principal, request.model_id):
                response = model_pb2.DeleteModelResponse()  # co-owners keep the model
        if response is None:
            response = await behavior(argument, context)
        if self.ownership is not None and call.method == "ListModels":
            response = await self.ownership.filter(call.principal, response)
        if response is not None:  # None: the servicer set a status without a message
            call.responses = 1
            call.response_bytes = response.ByteSize()
        return response

    def _finish(self, call: _Call, code: grpc.StatusCode) -> None:
        """Release the call's slot, count it and log it; once per call."""
        if call.finished:
            return
        call.finished = True
        if call.counted:
            self.limiter.release(call.principal)
            if self.metrics is not None:
                self.metrics.inflight.dec()
        seconds = time.perf_counter() - call.start
        if self.metrics is not None:
            self.metrics.request_done(call.method, code, seconds)
        principal = call.principal
        fields = {
            "method": call.method,
            "model": call.model or "-",
            "code": code.name,
            "seconds": round(seconds, 6),
            "request_bytes": call.request_bytes,
            "response_bytes": call.response_bytes,
            "responses": call.responses,
            "token": "-" if principal is None or principal.anonymous else principal.name,
            "peer": call.peer,
        }
        log.info(
            "request method=%s model=%s code=%s s=%.3f request_bytes=%d response_bytes=%d "
            "responses=%d token=%s peer=%s",
            *fields.values(),
            extra={"fields": fields},
        )

    # Wrapping ------------------------------------------------------------------------------

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = _behavior(handler)
        # A streaming method written as a coroutine that calls context.write() (none in
        # NTKService today) still passes admission and is counted, though its bytes are not.
        streaming = handler.response_streaming and inspect.isasyncgenfunction(behavior)

        async def unary_response(request_or_iterator, context):
            call = _Call(method, context.peer(), time.perf_counter())
            context = _RecordingContext(context, lambda code: self._finish(call, code))
            try:
                request, argument = await self._begin(call, handler, request_or_iterator, context)
                with _as_caller(call.principal):
                    try:
                        response = await self._unary(call, request, argument, behavior, context)
                    except ServiceError as exc:  # raised here, not in the servicer
                        await context.abort(status_for(exc), str(exc))
                self._finish(call, _code(context.code()) or grpc.StatusCode.OK)
                return response
            except BaseException as exc:
                self._finish(call, _code_of(exc, context))
                raise

        async def stream_response(request_or_iterator, context):
            call = _Call(method, context.peer(), time.perf_counter())
            context = _RecordingContext(context, lambda code: self._finish(call, code))
            try:
                _, argument = await self._begin(call, handler, request_or_iterator, context)
                with _as_caller(call.principal):
                    async for response in behavior(argument, context):
                        size = response.ByteSize()
                        call.responses += 1
                        call.response_bytes += size
                        if self.metrics is not None:
                            self.metrics.stream_bytes.inc(size)
                        yield response
                self._finish(call, _code(context.code()) or grpc.StatusCode.OK)
            except BaseException as exc:
                self._finish(call, _code_of(exc, context))
                raise

        return _handler(handler, stream_response if streaming else unary_response)


class _RecordingContext:
    """The servicer context, finishing the call's bookkeeping before an abort sends the status.

    context.abort() sends the status at once, before the exception it raises reaches the
    interceptor; recording first means a client that has its answer also finds it in the
    metrics, and its concurrency slot free again.
    """

    def __init__(self, context: grpc.aio.ServicerContext, on_abort):
        self._context = context
        self._on_abort = on_abort

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self._on_abort(code)
        await self._context.abort(code, details, trailing_metadata)


@contextlib.contextmanager
def _as_caller(principal: auth.Principal):
    token = auth.set_current(principal)
    try:
        yield
    finally:
        try:
            auth.reset_current(token)
        except ValueError:
            pass  # a stream closed from another context; that context never saw the value


async def _counting(requests: AsyncIterator, call: _Call) -> AsyncIterator:
    async for message in requests:
        call.request_bytes += message.ByteSize()
        yield message


def _code(value) -> grpc.StatusCode | None:
    """context.code() may hold a StatusCode, a raw integer, or None when never set."""
    if value is None or isinstance(value, grpc.StatusCode):
        return value
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return None


def _code_of(exc: BaseException, context) -> grpc.StatusCode:
    """The status an exception leaving the servicer ends the call with."""
    if isinstance(exc, grpc.aio.AbortError):
        return _code(context.code()) or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        # gRPC cancels the handler both when the client goes away and when the deadline passes.
        # The client's timer usually fires first (the server's deadline also counts the request's
        # time in transit), so a cancel just before the deadline is the client's deadline.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception it did not expect
