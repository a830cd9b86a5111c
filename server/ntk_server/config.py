"""Server configuration: one frozen dataclass, built once from flags and the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_GRACE_PERIOD_S = 20.0
DEFAULT_QUEUE_LIMIT = 256
MAX_PORT = 65535
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    metrics_port: int | None = None
    tokens_file: Path | None = None
    # NTK_TOKENS only (a flag would show the secrets in `ps`); kept out of repr() and logs.
    tokens: str | None = field(default=None, repr=False)
    allow_insecure_public: bool = False
    owner_only: bool = False
    quota_concurrent_requests: int = 0
    quota_kernel_entries: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
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
    "metrics_port": (
        "NTK_METRICS_PORT",
        int,
        "serve Prometheus /metrics on this port, on the gRPC address's host (0: a free port)",
    ),
    "tokens_file": ("NTK_TOKENS_FILE", Path, "bearer tokens, name:token[:role][:quota=N] lines"),
    "allow_insecure_public": (
        "NTK_ALLOW_INSECURE_PUBLIC",
        bool,
        "listen on a non-loopback address without tokens (anyone who reaches it may use it)",
    ),
    "owner_only": (
        "NTK_OWNER_ONLY",
        bool,
        "models visible only to the tokens that registered them",
    ),
    "quota_concurrent_requests": (
        "NTK_QUOTA_CONCURRENT_REQUESTS",
        int,
        "default per-token limit on requests in flight (0: unlimited)",
    ),
    "quota_kernel_entries": (
        "NTK_QUOTA_KERNEL_ENTRIES",
        int,
        "default per-token limit on kernel entries one request computes (0: unlimited)",
    ),
    "tls_cert": ("NTK_TLS_CERT", Path, "PEM certificate chain: serve gRPC over TLS"),
    "tls_key": ("NTK_TLS_KEY", Path, "PEM private key of tls_cert"),
    "tls_client_ca": ("NTK_TLS_CLIENT_CA", Path, "PEM CA: require client certificates (mTLS)"),
    "memory_budget_bytes": (
        "NTK_MEMORY_BUDGET_BYTES",
        int,
        "device memory that admitted requests may use (0: 85%% of a GPU, 50%% of host RAM)",
    ),
}
TOKENS_ENV = "NTK_TOKENS"


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
        epilog="Every flag can also be set by the environment variable shown in its help. "
        f"{TOKENS_ENV} adds comma-separated name:token entries to the tokens file's.",
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
    if environ.get(TOKENS_ENV):
        values["tokens"] = environ[TOKENS_ENV]
    config = ServerConfig(**values)
    host, sep, port = config.address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= MAX_PORT:
        raise ValueError(
            f"address must be host:port with a port in 0..{MAX_PORT}, got {config.address!r}"
        )
    if config.log_level.upper() not in LOG_LEVELS:
        raise ValueError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}"
        )
    if config.queue_limit < 1:
        raise ValueError(f"queue_limit must be >= 1, got {config.queue_limit}")
    if config.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, got {config.log_format!r}")
    if config.max_message_bytes < 1 << 20:
        raise ValueError(f"max_message_bytes must be >= 1 MiB, got {config.max_message_bytes}")
    check_security(config)
    if config.memory_budget_bytes < 0:
        raise ValueError(f"memory_budget_bytes must be >= 0, got {config.memory_budget_bytes}")
    if config.grace_period_s < 0:
        raise ValueError(f"grace_period_s must be >= 0, got {config.grace_period_s}")
    return config


def check_security(config: ServerConfig) -> None:
    """Settings that only make sense together; raises ValueError naming them."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError(
            f"tls_cert and tls_key go together, got tls_cert={config.tls_cert} "
            f"tls_key={config.tls_key}"
        )
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if config.owner_only and not (config.tokens_file or config.tokens):
        raise ValueError(f"owner_only needs bearer tokens (tokens_file or {TOKENS_ENV})")
    if config.metrics_port is not None and not 0 <= config.metrics_port <= 65535:
        raise ValueError(f"metrics_port must be in 0..65535, got {config.metrics_port}")
    for name in ("quota_concurrent_requests", "quota_kernel_entries"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: unlimited), got {getattr(config, name)}")
