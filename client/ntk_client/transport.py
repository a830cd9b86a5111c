"""Channels to an NTK server: plaintext or TLS (with a client certificate for mTLS), and a
bearer token sent as `authorization: Bearer <token>` metadata on every call."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import grpc

TOKEN_ENV = "NTK_TOKEN"
AUTH_METADATA_KEY = "authorization"
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: a valid metadata value


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call. An interceptor rather than call credentials, which gRPC
    only sends over TLS or local channels: a plaintext cluster network needs tokens too."""

    def __init__(self, token: str):
        self._metadata = (AUTH_METADATA_KEY, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != AUTH_METADATA_KEY]
        return _CallDetails(
            details.method,
            details.timeout,
            (*metadata, self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _read(path: str | os.PathLike, argument: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{argument} {str(path)!r}: {exc.strerror}") from None


def check_token(token: str) -> str:
    """The token, or ValueError if it cannot travel as metadata (the message hides it)."""
    if not _TOKEN.match(token):
        raise ValueError("token must be non-empty printable ASCII without whitespace")
    return token


def open_channel(
    target: str,
    *,
    options: Sequence[tuple[str, object]] = (),
    token: str | None = None,
    tls: bool = False,
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    tls_server_name: str | None = None,
    channel: grpc.Channel | None = None,
) -> grpc.Channel:
    """A channel to `target`.

    Args:
      token: bearer token; None reads NTK_TOKEN from the environment (unset: no token).
      tls: use TLS, trusting the system's root CAs unless tls_ca is given. Implied by any of
        tls_ca, tls_cert, tls_key.
      tls_ca: PEM file of the CA that signed the server's certificate.
      tls_cert, tls_key: PEM client certificate and key, for servers that require mutual TLS.
      tls_server_name: the name to check the server's certificate against, when it differs
        from the host in `target` (e.g. connecting by IP address).
      channel: an existing channel to use instead (TLS arguments are then not allowed); the
        token is still added.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError(f"tls_cert and tls_key go together, got {tls_cert=} {tls_key=}")
    tls = tls or any(p is not None for p in (tls_ca, tls_cert, tls_key))
    if channel is not None and (tls or tls_server_name):
        raise ValueError("pass either channel or TLS arguments; a given channel has its own")
    if channel is None:
        options = list(options)
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=None if tls_ca is None else _read(tls_ca, "tls_ca"),
                private_key=None if tls_key is None else _read(tls_key, "tls_key"),
                certificate_chain=None if tls_cert is None else _read(tls_cert, "tls_cert"),
            )
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(check_token(token)))
    return channel
