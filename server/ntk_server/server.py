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

from ntk_server import __version__
from ntk_server.admission import Admission, default_memory_budget_bytes
from ntk_server.config import ServerConfig
from ntk_server.registry import Registry
from ntk_server.runtime import Runtime, resolve_device
from ntk_server.scheduler import Scheduler
from ntk_server.service import NTKServicer

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["NTKService"].full_name


class Server:
    """One serving process. `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        self.registry = Registry(config.registry)
        self.scheduler = Scheduler(config.queue_limit)
        budget = config.memory_budget_bytes or default_memory_budget_bytes(self.device)
        self.admission = Admission(budget, config.queue_limit)
        self.runtime = Runtime(self.registry, self.scheduler, self.device, self.admission)
        self.servicer = NTKServicer(
            self.registry, self.runtime, max_message_bytes=config.max_message_bytes
        )
        self.health = health.aio.HealthServicer()
        self.address: str | None = None
        limit = config.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ]
        )
        service_pb2_grpc.add_NTKServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> str:
        host, _, port = self.config.address.rpartition(":")
        bound = self._server.add_insecure_port(self.config.address)
        if bound == 0:
            raise RuntimeError(f"could not bind {self.config.address}")
        self.address = f"{host}:{bound}"
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.port_file:
            tmp = Path(str(self.config.port_file) + ".tmp")
            tmp.write_text(self.address)
            tmp.replace(self.config.port_file)
        log.info(
            "serving address=%s device=%s registry=%s memory_budget_bytes=%d version=%s",
            self.address,
            self.device,
            self.config.registry,
            self.admission.budget_bytes,
            __version__,
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ntk-server", daemon=True
        )

    def start(self) -> BackgroundServer:
        self._thread.start()

        async def boot():
            self.server = Server(self.config)
            return await self.server.start()

        self.address = asyncio.run_coroutine_threadsafe(boot(), self._loop).result()
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
