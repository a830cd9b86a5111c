"""TLS and mutual TLS for the gRPC port, from PEM files named in the configuration."""

from __future__ import annotations

from pathlib import Path

import grpc

PEM_MARKER = b"-----BEGIN "


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {str(path)!r}: {exc.strerror}") from None
    if PEM_MARKER not in data:
        raise ValueError(f"{setting} {str(path)!r}: not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS from a certificate chain and its key; with client_ca, clients must present a
    certificate signed by that CA (mutual TLS)."""
    chain = _read_pem(cert, "tls_cert")
    private_key = _read_pem(key, "tls_key")
    roots = None if client_ca is None else _read_pem(client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )
