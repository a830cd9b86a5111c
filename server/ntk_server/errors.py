"""Typed errors raised below the servicer; service.py maps each to one gRPC status code."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class. `field` names the offending request field (dotted path) where there is one.

    `retryable`: the same request may succeed later (the client is told so in the trailers).
    """

    retryable = False

    def __init__(self, message: str, *, field: str | None = None, value: Any = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(ServiceError):
    """A request field that can never be served as given (shape, dtype, spec, values)."""


class NotFound(ServiceError):
    """An unknown model or dataset id."""


class ResourceExhausted(ServiceError):
    """Over a size, memory, queue or quota limit; the message names the limit."""


class Unauthenticated(ServiceError):
    """No bearer token, a malformed one, or one the server does not know."""


class PermissionDenied(ServiceError):
    """A known token whose role does not allow the method."""


class Unavailable(ServiceError):
    """The server is draining or a dependency is not ready."""


class QueueFull(ResourceExhausted):
    """The admission or device queue is full; the same request may succeed later."""

    retryable = True


class Draining(Unavailable):
    """The server is shutting down; the same request may succeed on another replica."""

    retryable = True


def short(value: Any, limit: int = 80) -> str:
    """repr() of a value, cut to `limit` characters for error details."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
