"""Assemble and run the gRPC server: servicer, health, reflection, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ntk_client._proto.ntk.v1 import service_pb2, service_pb2_grpc

from ntk_server import __version__, auth, tls
from ntk_server.admission import Admission, default_memory_budget_bytes
from ntk_server.config import ServerConfig, check_security
from ntk_server.interceptors import RequestInterceptor
from ntk_server.metrics import Metrics
from ntk_server.ownership import Ownership
from ntk_server.registry import Registry
from ntk_server.runtime import Runtime, resolve_device
from ntk_server.scheduler import Scheduler
from ntk_server.service import NTKServicer

log = logging.getLogger(__name__)

SERVICE = service_pb2.DESCRIPTOR.services_by_name["NTKService"]
SERVICE_NAME = SERVICE.full_name
DRAIN_POLL_S = 0.05


def access_tokens(config: ServerConfig) -> auth.TokenTable | None:
    """The token table, or None when authentication is off; refuses unsafe combinations."""
    check_security(config)
    tokens = None
    if config.tokens_file is not None or config.tokens:
        defaults = auth.Quotas(config.quota_concurrent_requests, config.quota_kernel_entries)
        tokens = auth.TokenTable.load(config.tokens_file, config.tokens, defaults)
        if not len(tokens):
            # An empty file must not quietly switch authentication off.
            raise ValueError(f"tokens_file {str(config.tokens_file)!r} holds no tokens")
    host = config.address.rpartition(":")[0]
    if tokens is None and not auth.is_loopback(host) and not config.allow_insecure_public:
        raise ValueError(
            f"refusing to listen on {config.address} without bearer tokens: set "
            f"NTK_TOKENS_FILE (name:token lines) or NTK_TOKENS, listen on 127.0.0.1, or pass "
            f"--allow-insecure-public to let anyone who reaches the address use the server"
        )
    return tokens


class Server:
    """One serving process. `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        self.tokens = access_tokens(config)
        self.registry = Registry(config.registry)
        self.scheduler = Scheduler(config.queue_limit)
        self.metrics = None
        if config.metrics_port is not None:
            self.metrics = Metrics(
                self.device,
                queue_depth=lambda: self.scheduler.queue_depth,
                queue_limit=config.queue_limit,
                models_registered=self.registry.count_models,
                methods=frozenset(SERVICE.methods_by_name),
            )
        on_block = None if self.metrics is None else self.metrics.kernel_block
        budget = config.memory_budget_bytes or default_memory_budget_bytes(self.device)
        self.admission = Admission(budget, config.queue_limit)
        self.runtime = Runtime(
            self.registry, self.scheduler, self.device, self.admission, on_block=on_block
        )
        self.servicer = NTKServicer(
            self.registry, self.runtime, max_message_bytes=config.max_message_bytes
        )
        self.health = health.aio.HealthServicer()
        self.address: str | None = None
        self.metrics_address: str | None = None
        interceptor = RequestInterceptor(
            service_name=SERVICE_NAME,
            tokens=self.tokens,
            default_quotas=auth.Quotas(
                config.quota_concurrent_requests, config.quota_kernel_entries
            ),
            metrics=self.metrics,
            ownership=Ownership(self.registry) if config.owner_only else None,
        )
        limit = config.max_message_bytes
        self._server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                # Without this a second server on a busy port starts and shares it.
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_NTKServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> str:
        host, _, port = self.config.address.rpartition(":")
        config = self.config
        if config.tls_cert is not None:
            credentials = tls.server_credentials(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            bound = self._server.add_secure_port(config.address, credentials)
        else:
            bound = self._server.add_insecure_port(config.address)
        if bound == 0:
            raise RuntimeError(f"could not bind {config.address}: is the port in use?")
        self.address = f"{host}:{bound}"
        if self.metrics is not None:
            try:
                metrics_port = self.metrics.serve(host, config.metrics_port)
            except OSError as exc:
                raise RuntimeError(
                    f"could not serve metrics on {host}:{config.metrics_port}: {exc.strerror}"
                ) from None
            self.metrics_address = f"{host}:{metrics_port}"
        try:
            await self._server.start()
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
            raise
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.port_file:
            tmp = Path(str(self.config.port_file) + ".tmp")
            tmp.write_text(self.address)
            tmp.replace(self.config.port_file)
        log.info(
            "serving address=%s device=%s registry=%s memory_budget_bytes=%d version=%s "
            "metrics=%s tls=%s",
            self.address,
            self.device,
            self.config.registry,
            self.admission.budget_bytes,
            __version__,
            self.metrics_address or "off",
            "mutual" if config.tls_client_ca else ("on" if config.tls_cert else "off"),
        )
        log.info(
            "auth tokens=%s owner_only=%s quota_concurrent_requests=%d quota_kernel_entries=%d",
            ",".join(self.tokens.names) if self.tokens is not None else "off",
            config.owner_only,
            config.quota_concurrent_requests,
            config.quota_kernel_entries,
        )
        return self.address

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get `grace_s`."""
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        log.info("draining grace_s=%.1f inflight=%d", grace_s, self.servicer.inflight)
        self.servicer.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # The listener stays open meanwhile, so probes see NOT_SERVING and callers a clear
        # UNAVAILABLE rather than a refused connection.
        deadline = time.monotonic() + grace_s
        while self.servicer.inflight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.servicer.inflight:
            log.warning("grace period over, cancelling inflight=%d", self.servicer.inflight)
        await self._server.stop(max(0.0, deadline - time.monotonic()))
        await asyncio.to_thread(self.scheduler.close)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        log.info("stopped")

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain for the grace period."""
    server = Server(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop()


class BackgroundServer:
    """A server on its own event loop thread, for examples, tests and notebooks.

    >>> with BackgroundServer(ServerConfig(address="127.0.0.1:0", registry=path)) as srv:
    ...     client = Client(srv.address)
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.server: Server | None = None
        self.address: str | None = None
        self.metrics_address: str | None = None  # host:port of /metrics when metrics_port is set
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ntk-server", daemon=True
        )

    def start(self) -> BackgroundServer:
        self._thread.start()

        async def boot():
            self.server = Server(self.config)
            return await self.server.start()

        try:
            self.address = asyncio.run_coroutine_threadsafe(boot(), self._loop).result()
        except BaseException:
            self.server = None  # a server that failed to start has nothing to drain
            self.stop()
            raise
        self.metrics_address = self.server.metrics_address
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop).result()
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
