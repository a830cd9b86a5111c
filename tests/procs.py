"""Servers in their own processes (`python -m ntk_server`), for tests that kill, signal or
memory-limit them. Every process started here is stopped by its pid in `stop`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_S = 90
ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict:
    """The environment for child processes: this checkout's packages first on the path."""
    path = os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": path + (os.pathsep + old if old else ""), **extra}


class ServerProcess:
    """`python -m ntk_server` on 127.0.0.1 (port 0 unless given) with its output in a file."""

    def __init__(
        self,
        registry: Path,
        workdir: Path,
        *extra: str,
        address: str = "127.0.0.1:0",
        env: dict | None = None,
    ):
        self.registry, self.workdir = registry, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        runs = len(list(workdir.glob("server-*.log")))
        self.log_path = workdir / f"server-{runs}.log"
        self.port_file = workdir / f"port-{runs}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ntk_server",
                "--address",
                address,
                "--registry",
                str(registry),
                "--port-file",
                str(self.port_file),
                "--device",
                "cpu",
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(**(env or {})),
        )
        self.address: str | None = None

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.05)
        self.address = self.port_file.read_text()
        return self

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def terminate(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()


def health(address: str, timeout_s: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        return stub.Check(request, timeout=timeout_s).status
