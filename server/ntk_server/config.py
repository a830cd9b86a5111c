"""Server configuration: one frozen dataclass, built once from flags and the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_GRACE_PERIOD_S = 20.0
DEFAULT_QUEUE_LIMIT = 256


@dataclass(frozen=True)
class ServerConfig:
    address: str = DEFAULT_ADDRESS
    registry: Path = Path("./registry")
    device: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    allow_tf32: bool = False
    port_file: Path | None = None
    memory_budget_bytes: int = 0  # 0: a share of the device's memory (admission.py)


# flag name -> (environment variable, type, help)
_OPTIONS = {
    "address": ("NTK_ADDRESS", str, "host:port to listen on (port 0 picks a free port)"),
    "registry": ("NTK_REGISTRY", Path, "registry directory (models and datasets)"),
    "device": ("NTK_DEVICE", str, "auto, cpu, cuda or cuda:N"),
    "log_level": ("NTK_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    "log_format": ("NTK_LOG_FORMAT", str, "text or json"),
    "max_message_bytes": ("NTK_MAX_MESSAGE_BYTES", int, "largest gRPC message sent or received"),
    "grace_period_s": ("NTK_GRACE_PERIOD_S", float, "SIGTERM drain time for in-flight streams"),
    "queue_limit": ("NTK_QUEUE_LIMIT", int, "device work items that may wait"),
    "allow_tf32": ("NTK_ALLOW_TF32", bool, "allow TF32 matmuls on Ampere+ GPUs (less precise)"),
    "port_file": ("NTK_PORT_FILE", Path, "write the bound address here once listening"),
    "memory_budget_bytes": (
        "NTK_MEMORY_BUDGET_BYTES",
        int,
        "device memory that admitted requests may use (0: 85%% of a GPU, 50%% of host RAM)",
    ),
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntk-server",
        description="Serve empirical neural tangent kernels over gRPC.",
        epilog="Every flag can also be set by the environment variable shown in its help.",
    )
    for name, (env, kind, text) in _OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=f"{text} [{env}]")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{text} [{env}]")
    return p


def load_config(argv: list[str] | None = None, environ: dict | None = None) -> ServerConfig:
    """Flags win over environment variables, which win over defaults."""
    environ = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    values = {}
    for name, (env, kind, _) in _OPTIONS.items():
        value = getattr(args, name)
        if value is None and env in environ:
            raw = environ[env]
            value = _parse_bool(raw) if kind is bool else kind(raw)
        if value is not None:
            values[name] = value
    config = ServerConfig(**values)
    if config.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, got {config.log_format!r}")
    if config.max_message_bytes < 1 << 20:
        raise ValueError(f"max_message_bytes must be >= 1 MiB, got {config.max_message_bytes}")
    if config.memory_budget_bytes < 0:
        raise ValueError(f"memory_budget_bytes must be >= 0, got {config.memory_budget_bytes}")
    if config.grace_period_s < 0:
        raise ValueError(f"grace_period_s must be >= 0, got {config.grace_period_s}")
    return config
