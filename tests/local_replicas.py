"""Several `python -m ntk_server` processes on 127.0.0.1:0 sharing one registry directory.

Used by the replica tests and by bench/replicas.py. Every process is started here and stopped
here, by its own pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
POLL_S = 0.05


class LocalReplicas:
    """`count` servers sharing `registry`, each with its own port file and log file.

    threads: torch threads per replica (OMP_NUM_THREADS), so that N replicas on one machine
    do not each assume they own every core.
    """

    def __init__(
        self,
        workdir: Path,
        count: int,
        *,
        registry: Path | None = None,
        threads: int = 1,
        extra_args: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.registry = registry or self.workdir / "registry"
        self.count = count
        self.threads = threads
        self.extra_args = extra_args
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self._logs: list = []

    def start(self) -> LocalReplicas:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
        }
        port_files = []
        try:
            for i in range(self.count):
                port_file = self.workdir / f"replica-{i}.port"
                port_file.unlink(missing_ok=True)
                log = open(self.workdir / f"replica-{i}.log", "w")  # closed in stop()
                self._logs.append(log)
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "ntk_server",
                            "--address",
                            "127.0.0.1:0",
                            "--registry",
                            str(self.registry),
                            "--port-file",
                            str(port_file),
                            "--grace-period-s",
                            "1",
                            *self.extra_args,
                        ],
                        cwd=ROOT,  # so a relative PYTHONPATH (client:server) still applies
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                port_files.append(port_file)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            for i, (proc, port_file) in enumerate(zip(self.procs, port_files, strict=True)):
                while not port_file.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"replica {i} did not start:\n{self.log(i)}")
                    time.sleep(POLL_S)
                self.addresses.append(port_file.read_text())
        except BaseException:
            self.stop()
            raise
        return self

    def log(self, i: int) -> str:
        self._logs[i].flush()
        return (self.workdir / f"replica-{i}.log").read_text()

    def kill(self, i: int) -> None:
        """SIGKILL replica i: no drain, no goodbye, as when a node dies."""
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()

    def __enter__(self) -> LocalReplicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
